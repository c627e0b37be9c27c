"""The whole pipeline on one config, as `make demo` runs it: data -> base answers -> train -> tuned answers ->
base-vs-tuned evaluation on held-out data -> export -> one question to the exported model."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import RunConfig, load_config

QUESTIONS = ("Who are you?", "你是谁？", "Reverse the order of these words: lemon violin harbor")


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


def run_demo(config: str | Path, overrides: list[str] | None = None) -> DemoResult:
    cfg = load_config(config, overrides)
    result = DemoResult(name=cfg.data.variables.get("name", ""), author=cfg.data.variables.get("author", ""))
    start = time.perf_counter()

    t = _stage("1/6 data: load, validate, template, tokenize, mask, pack")
    _show_data(cfg)
    result.timings["data"] = time.perf_counter() - t

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


def _show_data(cfg: RunConfig) -> None:
    from tunelab.cli.data import prepare_from_config
    from tunelab.data.preview import preview, summary

    data, tokenizer = prepare_from_config(cfg, progress=True)[:2]
    print(summary(data.stats))
    print(preview(data.train, tokenizer, n=1))


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

    exported = export_model(str(run_dir), cfg.export, out=run_dir / "export")
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
    verdict = "yes" if result.learned_identity else "NO"
    print(f"  learned identity ({result.name} / {result.author}): {verdict}")
    print(f"  run: {result.run_dir}\n  export: {result.export_dir}")
    print(f"  next: tunelab chat {result.run_dir}   |   tunelab serve {result.export_dir}")
