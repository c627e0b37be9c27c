"""The whole pipeline on one config, as `make demo` runs it: data -> base answers -> train -> tuned answers ->
base-vs-tuned evaluation on held-out data -> export -> one question to the exported model."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import RunConfig, load_config
from tunelab.hardware import bf16_features, cpu_info

QUESTIONS = ("Who are you?", "你是谁？", "Reverse the order of these words: lemon violin harbor")

# Training tokens per second per GFLOP/s of the matmul probe (`measure_matmul_gflops`, in the dtype training
# computes in), per training precision; where two machines disagree the smaller value is kept, so estimates err
# long. bf16: ~270 tokens/s at a ~600 GFLOP/s probe (2-core AMD EPYC with AVX-512 BF16) and ~220 tokens/s at a
# ~725 GFLOP/s probe (2-core Intel Xeon with AMX). fp32 (train.mixed_precision=no, the fp32 path of issue 17):
# ~207 tokens/s at a ~320 GFLOP/s probe on that Xeon, 2 threads (0.65, before issue 17's fp32 work), and after it
# 145-194 tokens/s at a ~162 GFLOP/s probe on the AMD EPYC (0.9-1.2, the small profile's training; bench/train.py
# --isa avx2, AVX2 kernels: 149-162 tokens/s, ~0.95); 0.83 keeps a ~15% margin under the lowest. An AVX2-only CPU is
# assumed to reach the same share of its probe (README, "Sized for the CPU it finds"): not measured on one; the
# issue 12 reporter measured 0.45 there before issue 17's fp32 work.
TOKENS_PER_GFLOP = {"bf16": 0.30, "fp32": 0.83}
# The whole demo on a slow CPU should end within 10 minutes; this leaves a margin for the estimate's error.
DEMO_BUDGET_S = 540.0
# Everything but training (data, base and tuned answers, base-vs-tuned evaluation, export with its table) took 91 s
# on the Xeon above in fp32. Only a small part of it is matmul work that slows down with the probe: ~6,000 token
# forwards of the 135M model (~2,000 GFLOP, ~6 s there); the rest (loading, decoding overhead, writing and
# converting files) is taken as the same on any CPU. A projection, not a measurement on a slow CPU.
OTHER_STAGES_FIXED_S = 85.0
OTHER_STAGES_GFLOP = 2000.0
MIN_TRAIN_BUDGET_S = 120.0
# The demo on hardware too slow for the full schedule (an AVX2-only CPU training in fp32 gets ~10,000 tokens into
# its budget): more updates per token (batch 4, a higher peak lr, LoRA alpha 64), no LoRA dropout, the short identity
# set (16 of the 58 identity records, all answering "I am {name} ... trained by {author}") so most tokens go to the
# reversal task that the held-out exact match scores, and 48 more Chinese reversals over other words (most held-out
# misses were Chinese characters copied wrongly). Chosen by the trials in README ("Sized for the CPU it finds"):
# alpha 32 without the extra data gave EM 0.767 / 0.667 on two seeds at 42 x 4; this profile at 47 x 4 (what a
# 32 GFLOP/s CPU gets) 0.700-0.833 on six seeds (mean 0.744), at 37 and 60 steps 0.667-0.867 on six more.
# Batch 2 learned as much per token but ran at 0.69x the tokens/s of batch 4 (fp32).
DEMO_DATASETS = ("identity", "reverse_en_train", "reverse_zh_train")
SMALL_DATASETS = ({"name": "identity_short"}, {"name": "reverse_en_train"},
                  {"name": "reverse_zh_train"}, {"name": "reverse_zh_extra"})
SMALL_PROFILE = {"train.batch_size": 4, "train.lr": 2e-3, "method.dropout": 0.0, "method.alpha": 64,
                 "data.datasets": json.dumps(SMALL_DATASETS)}  # JSON is YAML: the override reads it back
SMALL_MIN_STEPS = 16  # below this the held-out reversal is not learned reliably


@dataclass
class DemoPlan:
    """How the demo trains on this machine, and how long that should take (printed before training)."""

    precision: str  # "bf16" or "fp32": what the training matmuls run in
    gflops: float  # measured (or assumed, --gflops) matmul speed in that precision
    tokens_per_step: float
    steps: int
    overrides: list[str] = field(default_factory=list)  # applied to the config; empty = the config as written
    note: str = ""
    other_s: float = 0.0  # estimated time of the stages other than training
    cpu: str = ""

    @property
    def tokens_per_s(self) -> float:
        return TOKENS_PER_GFLOP[self.precision] * self.gflops

    @property
    def estimate_s(self) -> float:
        return self.steps * self.tokens_per_step / max(self.tokens_per_s, 1e-9)

    def describe(self) -> str:
        lines = [(f"hardware: {self.cpu or 'this CPU'}; training in {self.precision}, {self.precision} matmul "
                  f"{self.gflops:.0f} GFLOP/s -> ~{self.tokens_per_s:.0f} training tokens/s expected"),
                 (f"estimated training time: {_minutes(self.estimate_s)} ({self.steps} steps x "
                  f"~{self.tokens_per_step:.0f} tokens); the whole demo ~{_minutes(self.estimate_s + self.other_s)}")]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s"


def cpu_description() -> str:
    """The CPU's model name and which of the fast bf16 instructions training's `auto` looks for it has."""
    cpu = cpu_info()
    return f"{cpu.name}, {bf16_features(cpu.flags)}"


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


def small_profile_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with SMALL_PROFILE applied (what the demo trains on slow hardware), steps not yet chosen."""
    from tunelab.config.schema import DatasetSpec

    method = cfg.method
    if _lora_family(cfg):
        method = method.model_copy(update={"dropout": SMALL_PROFILE["method.dropout"],
                                           "alpha": SMALL_PROFILE["method.alpha"]})
    train = cfg.train.model_copy(update={"batch_size": SMALL_PROFILE["train.batch_size"],
                                         "lr": SMALL_PROFILE["train.lr"]})
    data = cfg.data
    if uses_demo_data(cfg):
        data = data.model_copy(update={"datasets": [DatasetSpec(**spec) for spec in SMALL_DATASETS]})
    return cfg.model_copy(update={"train": train, "method": method, "data": data})


def _lora_family(cfg: RunConfig) -> bool:
    """LoRA, DoRA or QLoRA: the methods with the alpha and dropout SMALL_PROFILE sets."""
    return hasattr(cfg.method, "dropout")


def uses_demo_data(cfg: RunConfig) -> bool:
    """The config trains the bundled demo data (whose folder also registers the short identity set)."""
    return tuple(d.name for d in cfg.data.datasets) == DEMO_DATASETS


def small_overrides(cfg: RunConfig, steps: int) -> list[str]:
    keep = {k: v for k, v in SMALL_PROFILE.items()
            if (k != "data.datasets" or uses_demo_data(cfg)) and (_lora_family(cfg) or not k.startswith("method."))}
    return [f"{k}={v}" for k, v in keep.items()] + [f"train.max_steps={steps}"]


def plan_demo(cfg: RunConfig, data, budget_s: float | None = None, adapt: bool = True,
              gflops: float | None = None, small_data=None) -> DemoPlan:
    """Measure this CPU, estimate the demo's time, and when the config's schedule would take the whole demo past
    DEMO_BUDGET_S switch to SMALL_PROFILE with as many steps as fit (at least SMALL_MIN_STEPS). `budget_s` is the
    training budget (default: DEMO_BUDGET_S less the estimated other stages); `gflops` replaces both probes (to
    see how the demo sizes itself for a slower CPU). The precision is the one training will choose
    (`train.mixed_precision: auto`: bf16 autocast on CPUs with AVX-512 BF16 or AMX, else fp32). `small_data`: the
    prepared data of the small profile (built when needed), whose example lengths the small estimate counts."""
    import torch

    from tunelab.models.load import pick_device
    from tunelab.training.sft import plan_precision

    device = pick_device(cfg.model.device)
    precision = "bf16" if plan_precision(cfg, device).autocast == "bf16" else "fp32"
    probe = gflops or measure_matmul_gflops(torch.bfloat16 if precision == "bf16" else torch.float32)
    fp32 = probe if precision == "fp32" else (gflops or measure_matmul_gflops(torch.float32))
    mean_length = float((data.stats.get("length") or {}).get("mean") or 64)
    examples = int(data.stats.get("train_examples") or len(data.train))
    per_step = mean_length * cfg.train.batch_size * cfg.train.grad_accum
    other_s = OTHER_STAGES_FIXED_S + OTHER_STAGES_GFLOP / max(fp32, 1e-9)
    if budget_s is None:
        budget_s = max(MIN_TRAIN_BUDGET_S, DEMO_BUDGET_S - other_s)
    plan = DemoPlan(precision, probe, per_step, planned_steps(cfg, examples), other_s=other_s,
                    cpu=cpu_description())
    if device != "cpu" or not adapt or plan.estimate_s <= budget_s:
        return plan
    small_cfg = small_profile_config(cfg)
    if small_data is None:
        from tunelab.data.build import build_sft_data

        small_data = build_sft_data(small_cfg)
    small_mean = float((small_data.stats.get("length") or {}).get("mean") or mean_length)
    small_examples = int(small_data.stats.get("train_examples") or len(small_data.train))
    small_per_step = small_mean * small_cfg.train.batch_size * small_cfg.train.grad_accum
    fit = int(budget_s * plan.tokens_per_s / small_per_step)
    steps = max(SMALL_MIN_STEPS, min(fit, planned_steps(small_cfg, small_examples)))
    small = DemoPlan(precision, probe, small_per_step, steps,
                     small_overrides(cfg, steps),
                     other_s=other_s, cpu=plan.cpu)
    small.note = (f"sized for this hardware: the full schedule ({plan.steps} steps) would take "
                  f"~{plan.estimate_s / 60:.0f} min here, so the demo trains {steps} steps of batch "
                  f"{SMALL_PROFILE['train.batch_size']} at lr {SMALL_PROFILE['train.lr']:g} on the short identity "
                  f"set and the extra Chinese reversals ({small_examples} examples, mean {small_mean:.1f} tokens) "
                  f"to end within ~{DEMO_BUDGET_S / 60:.0f} min (tunelab demo --full keeps the config as written)")
    if small.estimate_s > budget_s:
        small.note += f"; even so training exceeds its {budget_s / 60:.0f} min budget on this CPU"
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


def ask(model: str, questions: tuple[str, ...] = QUESTIONS, max_new_tokens: int = 48,
        system: str | None = None) -> list[str]:
    """Greedy answers of `model` (hub id, run dir or exported folder) to each question, rendered by its template
    after `system` (the run's data.system, so base and tuned models are asked as training framed the data)."""
    from tunelab.inference.engine import GenerationParams
    from tunelab.inference.hf import load_engine

    engine = load_engine(model)
    head = [{"role": "system", "content": system}] if system else []
    prompts = [engine.render([*head, {"role": "user", "content": q}]) for q in questions]
    answers = [c.text.strip() for c in engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens))]
    engine.close()  # its generation thread ends here, not while the interpreter exits
    del engine
    gc.collect()
    return answers


def _stage(title: str) -> float:
    print(f"\n\033[1m== {title}\033[0m", flush=True)
    return time.perf_counter()


def run_demo(config: str | Path, overrides: list[str] | None = None, size_for_hardware: bool = True,
             train_budget_s: float | None = None, gflops: float | None = None) -> DemoResult:
    """The whole pipeline. With `size_for_hardware`, the training schedule is fitted to `train_budget_s` (default:
    what the 10-minute demo leaves for training) on this machine (measured matmul speed, or `gflops`; see
    `plan_demo`) unless the overrides set the schedule themselves."""
    cfg = load_config(config, overrides)
    result = DemoResult(name=cfg.data.variables.get("name", ""), author=cfg.data.variables.get("author", ""))
    start = time.perf_counter()

    t = _stage("1/6 data: load, validate, template, tokenize, mask, pack")
    data = _show_data(cfg)
    result.timings["data"] = time.perf_counter() - t
    schedule_set = any(o.split("=", 1)[0] in ("train.max_steps", "train.epochs", "train.batch_size")
                       for o in overrides or [])
    result.plan = plan_demo(cfg, data, train_budget_s, adapt=size_for_hardware and not schedule_set, gflops=gflops)
    print(result.plan.describe(), flush=True)
    if result.plan.overrides:
        cfg = load_config(config, [*(overrides or []), *result.plan.overrides])

    t = _stage(f"2/6 base model {cfg.model.name}: before tuning")
    result.base_answers = ask(cfg.model.name, system=cfg.data.system)
    _print_answers(result.base_answers)
    result.timings["base answers"] = time.perf_counter() - t

    t = _stage(f"3/6 train: {cfg.method.name} on {cfg.model.name}")
    from tunelab.training.sft import train

    run = train(cfg)
    result.run_dir = run.run_dir
    result.timings["train"] = time.perf_counter() - t

    t = _stage("4/6 tuned model: the same questions")
    result.tuned_answers = ask(str(run.run_dir), system=cfg.data.system)
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
    # the run first: the shared examples are rendered with its data settings (data.system), as it was trained
    comparison = compare_models([str(run_dir), cfg.model.name], eval_cfg.datasets or None, eval_cfg,
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
    for problem in exported.template_problems + exported.modelfile_problems:
        print(f"  WARNING: the exported chat template renders differently from training: {problem}")
    answer = ask(str(exported.out_dir), QUESTIONS[:1], system=cfg.data.system)[0]
    print(f"  exported model, Q: {QUESTIONS[0]}  A: {answer[:160]!r}")
    return exported.out_dir, answer


def _print_summary(result: DemoResult) -> None:
    print("\n\033[1m== summary\033[0m")
    for stage, seconds in result.timings.items():
        print(f"  {stage:<14} {seconds:7.1f} s")
    if result.plan is not None and "train" in result.timings:
        print(f"  training took {result.timings['train']:.0f} s, estimated {result.plan.estimate_s:.0f} s "
              f"({result.plan.steps} steps, {result.plan.precision}); the whole demo {result.timings['total']:.0f} s, "
              f"estimated {result.plan.estimate_s + result.plan.other_s:.0f} s")
    verdict = "yes" if result.learned_identity else "NO"
    print(f"  learned identity ({result.name} / {result.author}): {verdict}")
    print(f"  run: {result.run_dir}\n  export: {result.export_dir}")
    print(f"  next: tunelab chat {result.run_dir}   |   tunelab serve {result.export_dir}")
