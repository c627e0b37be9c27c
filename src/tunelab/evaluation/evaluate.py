"""Evaluation stage: measure a base or tuned model (loss, perplexity, generated-text metrics) and compare several.

    result = evaluate("runs/my-run", "data/heldout.jsonl")          # EvalResult, prints as a table
    print(compare_models(["HuggingFaceTB/SmolLM2-135M-Instruct", "runs/my-run"], "data/heldout.jsonl"))

The model is loaded by the inference engine (tunelab.inference.hf), which prompts with the chat template recorded
in the run; the loss uses the same model, template, tokenizer and encoder as training (loss.py).
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataConfig, EvalConfig
from tunelab.data.types import Conversation
from tunelab.errors import TunelabError
from tunelab.evaluation.examples import (
    EvalExample,
    as_specs,
    build_examples,
    build_preference_examples,
    is_ranking,
    load_eval_conversations,
    load_preference_pairs,
    validation_conversations,
    validation_pairs,
)
from tunelab.evaluation.metrics import (
    MODEL_METRICS,
    PREFERENCE_METRIC,
    aggregate,
    check_metric_names,
    make_checks,
    metric_info,
    score_predictions,
)
from tunelab.evaluation.results import ComparisonResult, EvalResult, PredictionRecord
from tunelab.inference.engine import EngineOptions
from tunelab.runs.rundir import ADAPTER_CONFIG, RunDir

log = logging.getLogger(__name__)


def open_engine(model: str, adapter: str | None = None, options: EngineOptions | None = None):
    """Load a model for evaluation with the same loader and options chat and serving use (an rm run: its value
    head); `options.quantize` int8/nf4 loads its base through bitsandbytes (models/quantized.py)."""
    from tunelab.inference.hf import load_engine
    from tunelab.runs.rundir import is_run_dir

    options = options or EngineOptions()
    if adapter is None and is_run_dir(Path(model)):
        from tunelab.evaluation.preference import load_reward_engine, run_stage
        from tunelab.runs.read import read_run_config

        if run_stage(read_run_config(Path(model))) == "rm":
            if options.quantize != "none":
                raise TunelabError(f"{model}: a reward model (stage rm) is evaluated in full precision; drop "
                                   f"model.quantize={options.quantize}")
            return load_reward_engine(Path(model), device=options.device, dtype=options.dtype)
    return load_engine(model, adapter, options)


def run_data_config(engine) -> DataConfig:
    """The data settings training used (cutoff, train_on, system prompt), or the defaults for a plain model."""
    artifact = getattr(engine, "artifact", None)
    run_config = getattr(artifact, "run_config", None)
    return run_config.data if run_config is not None else DataConfig()


def load_examples(data: Any, cfg: EvalConfig, engine, preference: bool = False) -> tuple[list[EvalExample], str]:
    """(examples, a label for reports) from `data`, else cfg.datasets, else the run's validation split.

    Preference data (chosen/rejected pairs) is read as pairs when `preference` is set, the engine's run is an
    alignment run (stage other than sft), or a dataset is a ranking one (see examples.is_ranking)."""
    data_cfg = run_data_config(engine)
    need_answer = needs_generation(cfg)
    preference = preference or run_stage(engine) != "sft"
    if isinstance(data, Sequence) and data and all(isinstance(d, Conversation) for d in data):
        return build_examples(data, data_cfg.system, cfg.max_samples, need_answer), f"{len(data)} conversations"
    if isinstance(data, Sequence) and data and all(hasattr(d, "rejected") and hasattr(d, "prompt") for d in data):
        return build_preference_examples(data, data_cfg.system, cfg.max_samples), f"{len(data)} preference pairs"
    if data is not None:
        specs = as_specs(data)
    elif cfg.datasets:
        specs = list(cfg.datasets)
    elif preference:
        held_out = validation_pairs(_validation_config(data_cfg), engine.template, engine.tokenizer)
        if not held_out:
            raise TunelabError("the run's validation split is empty; pass --data FILE")
        return build_preference_examples(held_out, data_cfg.system, cfg.max_samples), "validation split of the run"
    else:
        return validation_examples(cfg, data_cfg, engine)
    label = ", ".join(str(s.path or s.name) for s in specs)
    if preference or any(is_ranking(s, data_cfg.dataset_dir) for s in specs):
        pairs = load_preference_pairs(specs, data_cfg)
        return build_preference_examples(pairs, data_cfg.system, cfg.max_samples), label
    conversations = load_eval_conversations(specs, data_cfg)
    return build_examples(conversations, data_cfg.system, cfg.max_samples, need_answer), label


def _validation_config(data_cfg: DataConfig) -> DataConfig:
    if not data_cfg.datasets or not data_cfg.val_size:
        raise TunelabError("no evaluation data: pass --data FILE of chosen/rejected pairs, set eval.datasets, or "
                           "evaluate a run trained with data.val_size > 0")
    return data_cfg


def run_stage(engine) -> str:
    """The training stage of the engine's run (sft, dpo, orpo, simpo, kto, rm); sft for anything else."""
    from tunelab.evaluation.preference import run_stage as stage_of

    return stage_of(getattr(getattr(engine, "artifact", None), "run_config", None))


def needs_generation(cfg: EvalConfig) -> bool:
    return bool(cfg.checks) or any(metric_info(m).needs_generation for m in cfg.metrics)


def validation_examples(cfg: EvalConfig, data_cfg: DataConfig, engine) -> tuple[list[EvalExample], str]:
    """The held-out split training made (data.val_size, data.seed), re-derived from the run's datasets."""
    if not data_cfg.datasets or not data_cfg.val_size:
        raise TunelabError("no evaluation data: pass --data FILE (any format `tunelab data` reads), set "
                           "eval.datasets, or evaluate a run trained with data.val_size > 0")
    held_out = validation_conversations(data_cfg, engine.template, engine.tokenizer)
    if not held_out:
        raise TunelabError("the run's validation split is empty; pass --data FILE")
    examples = build_examples(held_out, data_cfg.system, cfg.max_samples, needs_generation(cfg))
    return examples, "validation split of the run"


def generation_params(cfg: EvalConfig, stop: Sequence[str] = ()):
    from tunelab.inference.engine import GenerationParams

    return GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature if cfg.do_sample else 0.0,
                            top_p=cfg.top_p if cfg.do_sample else 1.0, stop=list(stop),
                            seed=0 if cfg.do_sample else None)


def generate_all(engine, prompts: list[str], params, batch_size: int) -> list:
    """Completions in prompt order; prompts of similar length are batched together (less left padding)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, completion in zip(chunk, engine.generate([prompts[i] for i in chunk], params)):
            out[i] = completion
    return out


def evaluate_engine(engine, examples: list[EvalExample], cfg: EvalConfig, *, name: str | None = None,
                    data_label: str = "") -> EvalResult:
    """Evaluate a loaded engine on examples: loss metrics first (one forward per batch), then generation."""
    check_metric_names(cfg.metrics)
    if getattr(engine, "reward_model", False):  # a value head scores pairs; it has no text to generate or loss
        cfg = cfg.model_copy(update={"metrics": [PREFERENCE_METRIC], "checks": []})
    checks = make_checks(cfg.checks)
    info: dict[str, Any] = {"model": name or engine.name, "data": data_label, "num_examples": len(examples),
                            "template": getattr(engine.template, "name", "?"), "date": _now()}
    model_cfg = getattr(getattr(engine, "artifact", None), "model_cfg", None)
    if getattr(model_cfg, "quantize", "none") != "none":  # the scores are the bitsandbytes-quantized model's
        info["quantize"] = model_cfg.quantize
    metrics: dict[str, float] = {}
    preference = _measure_preference(engine, examples, cfg, info)
    if preference is not None:
        metrics.update(preference.metrics)
    elif PREFERENCE_METRIC in cfg.metrics:
        raise TunelabError("eval.metrics has `preference`, but the evaluation data has no chosen/rejected pairs")
    loss = _measure_loss(engine, examples, cfg, info) if set(cfg.metrics) & set(MODEL_METRICS) else None
    if loss is not None:
        metrics.update({k: v for k, v in loss.metrics().items() if k in cfg.metrics or k == "eval_tokens"})
    prompts = [engine.render(e.messages, tools=e.tools, add_generation_prompt=True) if e.messages
               else e.conversation.text or "" for e in examples]
    completions: list = [None] * len(examples)
    scores: list[dict] = [{} for _ in examples]
    if needs_generation(cfg):
        completions = _generate_timed(engine, prompts, cfg, info)
    # A generation cut by max_new_tokens can end inside a multi-byte character (decoded as U+FFFD): not text.
    texts = [c.text.rstrip("\ufffd") if c is not None else "" for c in completions]
    if needs_generation(cfg):
        scores = score_predictions(texts, [e.reference for e in examples], cfg.metrics, checks,
                                   [e.source for e in examples])
        metrics.update(aggregate(scores))
    if preference is not None:
        scores = [{**s, **pair_scores} for s, pair_scores in zip(scores, preference.per_example)]
    if loss is not None:
        scores = [{**s, "loss": nll} if nll is not None else s for s, nll in zip(scores, loss.per_example)]
    records = [_record(i, e, p, t, c, s) for i, (e, p, t, c, s) in
               enumerate(zip(examples, prompts, texts, completions, scores))]
    return EvalResult(name or engine.name, metrics, records, info, run_dir=_run_dir(engine))


def _measure_loss(engine, examples: list[EvalExample], cfg: EvalConfig, info: dict):
    """Loss with the run's own cutoff_len and train_on, so the scored tokens are the trained ones."""
    from tunelab.data.encode import EncodeSettings
    from tunelab.evaluation.loss import compute_loss

    data_cfg = run_data_config(engine)
    t0 = time.perf_counter()
    settings = EncodeSettings(data_cfg.cutoff_len, data_cfg.train_on)
    loss = compute_loss(engine.model, engine.tokenizer, engine.template, [e.conversation for e in examples],
                        settings, batch_size=cfg.batch_size)
    info.update(loss_s=round(time.perf_counter() - t0, 3), cutoff_len=data_cfg.cutoff_len, train_on=data_cfg.train_on)
    return loss


def _generate_timed(engine, prompts: list[str], cfg: EvalConfig, info: dict) -> list:
    params = generation_params(cfg, getattr(engine.template, "stop_strings", ()))
    t0 = time.perf_counter()
    completions = generate_all(engine, prompts, params, cfg.batch_size)
    elapsed = time.perf_counter() - t0
    info.update(generation_s=round(elapsed, 3), examples_per_s=round(len(prompts) / elapsed, 3),
                max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, batch_size=cfg.batch_size)
    return completions


def _record(i, example: EvalExample, prompt: str, text: str, completion, scores: dict) -> PredictionRecord:
    return PredictionRecord(i, example.source, example.messages, prompt, example.reference, text, scores,
                            getattr(completion, "finish_reason", None), getattr(completion, "completion_tokens", None),
                            example.rejected)


def _measure_preference(engine, examples: list[EvalExample], cfg: EvalConfig, info: dict):
    """Pairwise scores of every example that carries a preference pair (None when none does)."""
    from tunelab.evaluation.preference import measure_preference

    if not any(e.pair is not None for e in examples):
        return None
    t0 = time.perf_counter()
    result = measure_preference(engine, [e.pair for e in examples], run_data_config(engine).cutoff_len,
                                cfg.batch_size)
    info.update(preference_s=round(time.perf_counter() - t0, 3), **result.info)
    return result


def _run_dir(engine) -> Path | None:
    return getattr(getattr(engine, "artifact", None), "run_dir", None)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_output_dir(engine_or_model, base: str | Path = "eval") -> Path:
    """<run>/eval for a run, else eval/<model name> under the current folder."""
    run_dir = _run_dir(engine_or_model) if not isinstance(engine_or_model, str) else None
    if run_dir is not None:
        return RunDir(run_dir).eval_dir
    name = engine_or_model if isinstance(engine_or_model, str) else engine_or_model.name
    return Path(base) / slug(name)


def slug(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", Path(str(name)).name or str(name)).strip("_") or "model"


@dataclass
class LoadOptions:
    """How evaluate() and compare_models() load models given by name: an adapter (evaluate only) and the engine
    options `tunelab chat` takes (device, dtype, template, quantize...)."""

    adapter: str | None = None  # a PEFT adapter applied on the model (evaluate only)
    engine: EngineOptions = field(default_factory=EngineOptions)

    def open(self, model, adapter: bool = True):
        if not isinstance(model, (str, Path)):
            return model  # already loaded
        return open_engine(model, self.adapter if adapter else None, self.engine)


def evaluate(model, data: Any = None, cfg: EvalConfig | None = None, load: LoadOptions | None = None, *,
             output_dir: str | Path | None = None, write: bool = True) -> EvalResult:
    """Evaluate `model` (a run dir, adapter, merged/HF folder, hub id, GGUF, or a loaded engine) on `data`.

    Reports go to `output_dir` (default eval.output_dir, else <run>/eval or eval/<model>) unless write=False.
    """
    cfg = cfg or EvalConfig()
    check_metric_names(cfg.metrics)  # config mistakes fail before anything is loaded
    make_checks(cfg.checks)
    engine = (load or LoadOptions()).open(model)
    examples, label = load_examples(data, cfg, engine)
    result = evaluate_engine(engine, examples, cfg, data_label=label)
    if write:
        from tunelab.evaluation.report import write_reports

        write_reports(result, output_dir or cfg.output_dir or default_output_dir(engine))
    return result


def compare_models(models: Sequence[Any], data: Any = None, cfg: EvalConfig | None = None,
                   load: LoadOptions | None = None, *, output_dir: str | Path | None = None,
                   base: int | None = None) -> ComparisonResult:
    """Evaluate every model on the same examples and line the results up against the base model (`base`: its
    index; by default `reference_index(models)`: the base model of a run or adapter among them, else the only
    model that is neither, else the first). Changes are always other minus base, whatever the order.

    Without `data` and eval.datasets, the examples are the validation split of the first run among `models`
    (so `compare_models([base, run])` scores the base on the run's held-out data). Models are loaded one at a
    time (as `load` says; its adapter is not used here: pass adapter or run folders). Prints as a side-by-side
    table; with `output_dir`, writes each model's reports in a subfolder and comparison.json/.md/.html.
    """
    if len(models) < 2:
        raise TunelabError("compare needs at least two models (e.g. the base model and the tuned run)")
    cfg = cfg or EvalConfig()
    check_metric_names(cfg.metrics)
    make_checks(cfg.checks)  # a bad check fails before any model is loaded
    first = _examples_source(models)  # a run among them sets how examples are asked (its data.system...)
    results: dict[int, EvalResult] = {}
    examples, label = None, ""
    for i in [first, *(j for j in range(len(models)) if j != first)]:
        model = models[i]
        engine = (load or LoadOptions()).open(model, adapter=False)
        if examples is None:
            examples, label = load_examples(data, cfg, engine)
        results[i] = evaluate_engine(engine, examples, cfg, name=engine.name, data_label=label)
        log.info("evaluated %s (%d/%d)", engine.name, len(results), len(models))
        close = getattr(engine, "close", None)
        if close is not None:
            close()  # its generation thread ends here, not at interpreter exit (which can abort the process)
        del engine
        gc.collect()  # free one model before loading the next
    ordered = [results[i] for i in range(len(models))]
    for k, result in enumerate(ordered):
        result.model = _unique_name(result.model, [r.model for r in ordered[:k]])
    base = reference_index(models) if base is None else base
    if not 0 <= base < len(models):
        raise TunelabError(f"compare: base index {base} is not one of the {len(models)} models")
    comparison = ComparisonResult(ordered, base=base)
    if output_dir is not None:
        from tunelab.evaluation.report import write_comparison, write_reports

        for k, result in enumerate(ordered):
            write_reports(result, Path(output_dir) / f"{k + 1}-{slug(result.model)}")
        write_comparison(comparison, output_dir)
    return comparison


def reference_index(models: Sequence[Any]) -> int:
    """Which of `models` is the reference the others are measured against: a model that another one (a run or an
    adapter folder) was trained from; else the only model that is not a run or adapter; else the first."""
    from tunelab.runs.rundir import is_run_dir

    names = [str(m) if isinstance(m, (str, Path)) else None for m in models]
    tuned_from = [_trained_from(Path(n)) if n else set() for n in names]
    for j, name in enumerate(names):
        if name and any(i != j and _same_model(name, bases) for i, bases in enumerate(tuned_from)):
            return j
    plain = [j for j, name in enumerate(names)
             if name and not is_run_dir(Path(name)) and not (Path(name) / "adapter_config.json").is_file()]
    return plain[0] if len(plain) == 1 and len(models) > 1 else 0


def _trained_from(path: Path) -> set[str]:
    """The base model names/paths a run folder or adapter folder records."""
    import json

    run = RunDir(path)
    found: set[str] = set()
    for file, keys in ((run.run_json, ("model", "model_path", "init_from")),  # init_from: SFT -> DPO chain
                       (path / ADAPTER_CONFIG, ("base_model_name_or_path",)),
                       (run.final / ADAPTER_CONFIG, ("base_model_name_or_path",))):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.update(str(data[k]) for k in keys if data.get(k))
    return found


def _same_model(name: str, candidates: set[str]) -> bool:
    for other in candidates:
        if name == other or name.rstrip("/") == other.rstrip("/"):
            return True
        try:
            if Path(name).exists() and Path(other).exists() and Path(name).resolve() == Path(other).resolve():
                return True
        except OSError:
            continue
    return False


def _examples_source(models: Sequence[Any]) -> int:
    """Index of the first run (directory, or engine loaded from one): its validation split is the shared data."""
    from tunelab.runs.rundir import is_run_dir

    for i, model in enumerate(models):
        if isinstance(model, (str, Path)) and is_run_dir(Path(model)) or _run_dir(model) is not None:
            return i
    return 0


def _unique_name(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"
