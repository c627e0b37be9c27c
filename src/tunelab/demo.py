"""The whole pipeline on one config, as `make demo` runs it: data -> base answers -> train -> tuned answers ->
base-vs-tuned evaluation on held-out data -> export -> one question to the exported model."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import RunConfig, load_config

QUESTIONS = ("Who are you?", "你是谁？", "Reverse the order of these words: lemon violin harbor")

# Training tokens per second per GFLOP/s of the matmul probe (`measure_matmul_gflops`, in the dtype training
# computes in). Calibrated on the demo itself: 2-core AMD EPYC with AVX-512 BF16, bf16 path, ~270 tokens/s at a
# ~600 GFLOP/s bf16 probe (0.45); 2-core AMD EPYC with AVX2 only, fp32, ~15 tokens/s at a ~32 GFLOP/s fp32 probe
# (0.47, issue 12). The smaller value is used, so the estimate errs on the long side.
TOKENS_PER_GFLOP = 0.45
TRAIN_BUDGET_S = 300.0  # training share of `make demo`'s 10 minutes; the other stages take 1-3 minutes
# The demo on hardware too slow for the full schedule: fewer tokens, more updates (batch 4), a higher peak lr.
SMALL_PROFILE = {"train.batch_size": 4, "train.lr": 2e-3}
SMALL_MIN_STEPS = 16  # below this the held-out reversal is not learned reliably


@dataclass
class DemoPlan:
    """How the demo trains on this machine, and how long that should take (printed before training)."""

    precision: str  # "bf16" or "fp32": what the training matmuls run in
    gflops: float  # measured matmul speed in that precision
    tokens_per_step: float
    steps: int
    overrides: list[str] = field(default_factory=list)  # applied to the config; empty = the config as written
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return TOKENS_PER_GFLOP * self.gflops

    @property
    def estimate_s(self) -> float:
        return self.steps * self.tokens_per_step / max(self.tokens_per_s, 1e-9)

    def describe(self) -> str:
        minutes, seconds = divmod(round(self.estimate_s), 60)
        lines = [(f"hardware: {self.precision} matmul {self.gflops:.0f} GFLOP/s measured "
                 f"-> ~{self.tokens_per_s:.0f} training tokens/s expected"),
                 (f"estimated training time: {minutes} min {seconds:02d} s "
                 f"({self.steps} steps x ~{self.tokens_per_step:.0f} tokens)")]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def measure_matmul_gflops(dtype=None, size: int = 1024, seconds: float = 0.5) -> float:
    """Speed of a square matmul on this machine's torch threads, in GFLOP/s (one warm-up, then `seconds`)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done == 0:
        torch.mm(a, b)
        done += 1
    return 2 * size**3 * done / elapsed / 1e9


def planned_steps(cfg: RunConfig, examples: int) -> int:
    import math

    t = cfg.train
    if t.max_steps and t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(math.ceil(examples / t.batch_size) / t.grad_accum * t.epochs))


def plan_demo(cfg: RunConfig, data, budget_s: float = TRAIN_BUDGET_S, adapt: bool = True) -> DemoPlan:
    """Measure this CPU, estimate the training time of the demo config, and when it exceeds `budget_s` switch to
    SMALL_PROFILE with as many steps as fit (at least SMALL_MIN_STEPS). The precision is the one training will
    choose (`train.mixed_precision: auto`: bf16 autocast on CPUs with AVX-512 BF16 or AMX, else fp32)."""
    import torch

    from tunelab.models.load import pick_device
    from tunelab.training.sft import plan_precision

    device = pick_device(cfg.model.device)
    precision = "bf16" if plan_precision(cfg, device).autocast == "bf16" else "fp32"
    gflops = measure_matmul_gflops(torch.bfloat16 if precision == "bf16" else torch.float32)
    mean_length = float((data.stats.get("length") or {}).get("mean") or 64)
    examples = int(data.stats.get("train_examples") or len(data.train))
    per_step = mean_length * cfg.train.batch_size * cfg.train.grad_accum
    plan = DemoPlan(precision, gflops, per_step, planned_steps(cfg, examples))
    if device != "cpu" or not adapt or plan.estimate_s <= budget_s:
        return plan
    small_per_step = mean_length * SMALL_PROFILE["train.batch_size"] * cfg.train.grad_accum
    fit = int(budget_s * plan.tokens_per_s / small_per_step)
    steps = max(SMALL_MIN_STEPS, min(fit, planned_steps(cfg, examples)))
    full_min = plan.estimate_s / 60
    small = DemoPlan(precision, gflops, small_per_step, steps,
                     [f"{k}={v}" for k, v in SMALL_PROFILE.items()] + [f"train.max_steps={steps}"])
    small.note = (f"sized for this hardware: the full schedule ({plan.steps} steps) would take ~{full_min:.0f} min "
                  f"here, so the demo trains {steps} steps of batch {SMALL_PROFILE['train.batch_size']} at lr "
                  f"{SMALL_PROFILE['train.lr']:g} (tunelab demo --full keeps the config as written)")
    if small.estimate_s > budget_s:
        small.note += f"; even so this exceeds the {budget_s / 60:.0f} min training budget on this CPU"
    return small


@dataclass
class DemoResult:
    run_dir: Path | None = None
    export_dir: Path | None = None
    base_answers: list[str] = field(default_factory=list)
    tuned_answers: list[str] = field(default_factory=list)
    exported_answer: str = ""
    comparison: object | None = None
    timings: dict[str, float] = field(default_factory=dict)
    name: str = ""  # data.variables name/author the tuned model should answer with
    author: str = ""
    plan: DemoPlan | None = None

    @property
    def learned_identity(self) -> bool:
        """The tuned model names itself as configured where the base model did not."""
        return bool(self.tuned_answers) and self._names(self.tuned_answers[0]) and not self._names(self.base_answers[0])

    def _names(self, answer: str) -> bool:
        return bool(self.name) and self.name in answer and (not self.author or self.author in answer)


def ask(model: str, questions: tuple[str, ...] = QUESTIONS, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers of `model` (hub id, run dir or exported folder) to each question, rendered by its template."""
    from tunelab.inference.engine import GenerationParams
    from tunelab.inference.hf import load_engine

    engine = load_engine(model)
    prompts = [engine.render([{"role": "user", "content": q}]) for q in questions]
    answers = [c.text.strip() for c in engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens))]
    del engine
    gc.collect()
    return answers


def _stage(title: str) -> float:
    print(f"\n\033[1m== {title}\033[0m", flush=True)
    return time.perf_counter()


def run_demo(config: str | Path, overrides: list[str] | None = None, size_for_hardware: bool = True,
             train_budget_s: float = TRAIN_BUDGET_S) -> DemoResult:
    """The whole pipeline. With `size_for_hardware`, the training schedule is fitted to `train_budget_s` on this
    machine (measured matmul speed; see `plan_demo`) unless the overrides set the schedule themselves."""
    cfg = load_config(config, overrides)
    result = DemoResult(name=cfg.data.variables.get("name", ""), author=cfg.data.variables.get("author", ""))
    start = time.perf_counter()

    t = _stage("1/6 data: load, validate, template, tokenize, mask, pack")
    data = _show_data(cfg)
    result.timings["data"] = time.perf_counter() - t
    schedule_set = any(o.split("=", 1)[0] in ("train.max_steps", "train.epochs", "train.batch_size")
                       for o in overrides or [])
    result.plan = plan_demo(cfg, data, train_budget_s, adapt=size_for_hardware and not schedule_set)
    print(result.plan.describe(), flush=True)
    if result.plan.overrides:
        cfg = load_config(config, [*(overrides or []), *result.plan.overrides])

    t = _stage(f"2/6 base model {cfg.model.name}: before tuning")
    result.base_answers = ask(cfg.model.name)
    _print_answers(result.base_answers)
    result.timings["base answers"] = time.perf_counter() - t

    t = _stage(f"3/6 train: {cfg.method.name} on {cfg.model.name}")
    from tunelab.training.sft import train

    run = train(cfg)
    result.run_dir = run.run_dir
    result.timings["train"] = time.perf_counter() - t

    t = _stage("4/6 tuned model: the same questions")
    result.tuned_answers = ask(str(run.run_dir))
    _print_answers(result.tuned_answers, result.base_answers)
    result.timings["tuned answers"] = time.perf_counter() - t

    t = _stage("5/6 evaluate: base vs tuned on held-out examples")
    result.comparison = _compare(cfg, run.run_dir)
    result.timings["evaluate"] = time.perf_counter() - t

    t = _stage("6/6 export: merge, GGUF, Ollama Modelfile; ask the exported model")
    result.export_dir, result.exported_answer = _export(cfg, run.run_dir)
    result.timings["export"] = time.perf_counter() - t

    result.timings["total"] = time.perf_counter() - start
    _print_summary(result)
    return result


def _show_data(cfg: RunConfig):
    from tunelab.data.build import build_sft_data
    from tunelab.data.preview import preview, summary

    data = build_sft_data(cfg, progress=True)
    print(summary(data.stats))
    print(preview(data.train, data.tokenizer, n=1))
    return data


def _print_answers(answers: list[str], before: list[str] | None = None) -> None:
    for i, (q, a) in enumerate(zip(QUESTIONS, answers)):
        print(f"  Q: {q}")
        if before is not None:
            print(f"     before: {before[i][:160]!r}")
        print(f"     {'after: ' if before is not None else ''}{a[:160]!r}")


def _compare(cfg: RunConfig, run_dir: Path):
    from tunelab.evaluation.evaluate import compare_models

    eval_cfg = cfg.eval.model_copy(update={"metrics": ["exact_match", "bleu", "rouge"]})
    comparison = compare_models([cfg.model.name, str(run_dir)], eval_cfg.datasets or None, eval_cfg,
                                output_dir=run_dir / "eval-compare")
    print(comparison.table())
    print(f"  reports: {run_dir / 'eval-compare'}")
    return comparison


def _export(cfg: RunConfig, run_dir: Path) -> tuple[Path, str]:
    from tunelab.export.pipeline import export_model
    from tunelab.runs.rundir import RunDir

    exported = export_model(str(run_dir), cfg.export, out=RunDir(run_dir).export_dir)
    for path, size in exported.files():
        if path.suffix in {".gguf", ".safetensors"} or path.name == "Modelfile":
            print(f"  {path}  {size / 1e6:.1f} MB")
    answer = ask(str(exported.out_dir), QUESTIONS[:1])[0]
    print(f"  exported model, Q: {QUESTIONS[0]}  A: {answer[:160]!r}")
    return exported.out_dir, answer


def _print_summary(result: DemoResult) -> None:
    print("\n\033[1m== summary\033[0m")
    for stage, seconds in result.timings.items():
        print(f"  {stage:<14} {seconds:7.1f} s")
    if result.plan is not None and "train" in result.timings:
        print(f"  training took {result.timings['train']:.0f} s, estimated {result.plan.estimate_s:.0f} s "
              f"({result.plan.steps} steps, {result.plan.precision})")
    verdict = "yes" if result.learned_identity else "NO"
    print(f"  learned identity ({result.name} / {result.author}): {verdict}")
    print(f"  run: {result.run_dir}\n  export: {result.export_dir}")
    print(f"  next: tunelab chat {result.run_dir}   |   tunelab serve {result.export_dir}")
