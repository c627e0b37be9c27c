"""`tunelab eval MODEL_OR_RUN [--data FILE] [--compare A B ...]`: evaluate a model or run, or compare several."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.cli.common import (
    LOADING,
    Setting,
    add_override_argument,
    add_settings,
    comma_list,
    config_from_args,
    is_override,
)

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.config.schema import EvalConfig
    from tunelab.inference.engine import EngineOptions


SETTINGS = (
    Setting("--metrics", "eval.metrics", parse=comma_list, metavar="LIST", note="comma-separated"),
    Setting("--max-samples", "eval.max_samples"),
    Setting("--batch-size", "eval.batch_size"),
    Setting("--max-new-tokens", "eval.max_new_tokens"),
    Setting("--output", "eval.output_dir", metavar="DIR"),
    *LOADING,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="run directory, adapter, merged/HF folder, hub id or .gguf")
    add_override_argument(parser)
    parser.add_argument("--data", action="append", metavar="FILE",
                        help="evaluation data in any format `tunelab data` reads (repeatable); default: eval.datasets "
                             "of the config, else the run's validation split")
    parser.add_argument("--compare", nargs="+", metavar="MODEL",
                        help="evaluate these models too (after MODEL, if given) on the same data, side by side")
    parser.add_argument("--adapter", help="PEFT adapter folder to apply on MODEL")
    parser.add_argument("--config", help="run config YAML whose eval section gives the defaults "
                                         "(default: the run's own config.yaml when MODEL is a run)")
    add_settings(parser, SETTINGS)
    parser.add_argument("--check", action="append", default=[], metavar="KIND:PATTERN",
                        help="extra pass/fail check per prediction, e.g. contains:Paris or regex:^\\d+$ (repeatable; "
                             "added to eval.checks)")
    parser.add_argument("--template", help="override the recorded chat template (a name or a .jinja file)")
    parser.add_argument("--lm-eval", metavar="TASKS",
                        help="instead: run lm-evaluation-harness tasks (comma-separated)")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAMLs (local data)")
    parser.add_argument("--lm-eval-limit", type=float, help="lm-eval: examples per task (or a fraction)")


def run_config(args: argparse.Namespace):
    """--config, else the run's config.yaml when MODEL is a run, else the defaults; then flags and overrides."""
    take_overrides(args)
    return config_from_args(args, args.model)


def take_overrides(args: argparse.Namespace) -> None:
    """`a.b=c` words that argparse gave to MODEL or --compare (nargs) are overrides."""
    if args.model and is_override(args.model):
        args.overrides, args.model = [args.model, *args.overrides], None
    if args.compare:
        args.overrides += [c for c in args.compare if is_override(c)]
        args.compare = [c for c in args.compare if not is_override(c)]


def eval_config(args: argparse.Namespace, cfg: RunConfig | None = None) -> EvalConfig:
    """The eval section of the command's config (run_config), with --check added to eval.checks."""
    from tunelab.config.schema import CheckConfig
    from tunelab.errors import TunelabError

    cfg = (cfg or run_config(args)).eval
    for spec in args.check:
        kind, sep, pattern = spec.partition(":")
        if not sep or kind not in ("contains", "regex") or not pattern:
            raise TunelabError(f"--check {spec!r}: expected contains:TEXT or regex:PATTERN")
        cfg.checks = [*cfg.checks, CheckConfig(kind=kind, pattern=pattern)]
    return cfg


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError
    from tunelab.inference.hf import inference_threads

    run_cfg = run_config(args)
    models = ([args.model] if args.model else []) + (args.compare or [])
    if not models:
        raise TunelabError("name a model or run to evaluate: tunelab eval MODEL_OR_RUN [--data FILE]")
    if args.lm_eval:
        return _run_lm_eval(args, models, run_cfg)
    cfg = eval_config(args, run_cfg)
    # the engines made below run with this thread count (the same setting and default as training)
    inference_threads(run_cfg.train.threads, models[0])
    data = args.data
    if args.compare:
        if args.adapter:
            raise TunelabError("--adapter applies to one model; with --compare pass adapter or run folders instead")
        return _run_compare(args, models, data, run_cfg, cfg)
    from tunelab.evaluation.evaluate import LoadOptions, evaluate

    result = evaluate(args.model, data, cfg, LoadOptions(args.adapter, engine_options(args, run_cfg)))
    print(result.table())
    _print_speed(result.info)
    print(f"\nReports: {result.output_dir} (report.html, report.md, predictions.jsonl, metrics.json)")
    return 0


def _run_compare(args: argparse.Namespace, models: list[str], data, run_cfg: RunConfig, cfg: EvalConfig) -> int:
    from tunelab.evaluation.evaluate import LoadOptions, compare_models, slug

    default = Path("eval") / ("compare-" + "-vs-".join(slug(m) for m in models))
    out = Path(cfg.output_dir) if cfg.output_dir else default
    cfg.output_dir = None  # each model's reports go in a subfolder of `out`
    comparison = compare_models(models, data, cfg, LoadOptions(None, engine_options(args, run_cfg)), output_dir=out)
    print(comparison.table())
    key = comparison.differences()[0]["score"] if comparison.results[0].predictions else None
    counts = comparison.example_counts(key) if key else None
    if counts:
        print(f"\nPer example ({key}): {counts['better']} better, {counts['worse']} worse, {counts['same']} unchanged "
              f"({comparison.models[comparison.tuned]} vs the base {comparison.base_model})")
    print(f"\nReports: {out} (comparison.html, comparison.md, comparison.json, one folder per model)")
    return 0


def engine_options(args: argparse.Namespace, cfg: RunConfig) -> EngineOptions:
    """The engine settings eval loads models with: the same keys and flags as `tunelab chat`."""
    from tunelab.inference.engine import EngineOptions

    return EngineOptions(device=cfg.model.device, dtype=cfg.model.dtype, template=args.template,
                         quantize=cfg.model.quantize)


def _print_speed(info: dict) -> None:
    if "examples_per_s" in info:
        print(f"\ngeneration: {info['num_examples']} examples in {info['generation_s']:.1f} s "
              f"({info['examples_per_s']:.2f} examples/s, batch {info['batch_size']})")


def _run_lm_eval(args: argparse.Namespace, models: list[str], cfg: RunConfig) -> int:
    import json

    from tunelab.errors import TunelabError
    from tunelab.evaluation.harness import harness_table, run_lm_eval

    if len(models) != 1 or args.adapter:
        raise TunelabError("--lm-eval runs on one model (a run, adapter or merged folder), without --compare")
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    limit = args.lm_eval_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = run_lm_eval(models[0], tasks, limit=limit, batch_size=cfg.eval.batch_size,
                          include=args.lm_eval_include)
    print(harness_table(results))
    if cfg.eval.output_dir:
        out = Path(cfg.eval.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nWritten: {out / 'lm_eval.json'}")
    return 0
