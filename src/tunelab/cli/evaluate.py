"""`tunelab eval MODEL_OR_RUN [--data FILE] [--compare A B ...]`: evaluate a model or run, or compare several."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="run directory, adapter, merged/HF folder, hub id or .gguf")
    parser.add_argument("--data", action="append", metavar="FILE",
                        help="evaluation data in any format `tunelab data` reads (repeatable); default: eval.datasets "
                             "of the config, else the run's validation split")
    parser.add_argument("--compare", nargs="+", metavar="MODEL",
                        help="evaluate these models too (after MODEL, if given) on the same data, side by side")
    parser.add_argument("--adapter", help="PEFT adapter folder to apply on MODEL")
    parser.add_argument("--config", help="run config YAML whose eval section gives the defaults "
                                         "(default: the run's own config.yaml when MODEL is a run)")
    parser.add_argument("--metrics", help="comma-separated: loss,perplexity,bleu,rouge,exact_match,preference "
                                          "(preference alone: only the pairwise scores of chosen/rejected data)")
    parser.add_argument("--check", action="append", default=[], metavar="KIND:PATTERN",
                        help="extra pass/fail check per prediction, e.g. contains:Paris or regex:^\\d+$ (repeatable)")
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N examples")
    parser.add_argument("--batch-size", type=int, help="examples per forward/generate batch")
    parser.add_argument("--max-new-tokens", type=int, help="longest generated answer")
    parser.add_argument("--template", help="override the recorded chat template (a name or a .jinja file)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int,
                        help="CPU threads for generation (default: --config's or the run's train.threads, else as "
                        "training does)")
    parser.add_argument("--output", metavar="DIR", help="report folder (default: eval.output_dir, else <run>/eval, "
                                                        "else eval/<model>)")
    parser.add_argument("--lm-eval", metavar="TASKS",
                        help="instead: run lm-evaluation-harness tasks (comma-separated)")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAMLs (local data)")
    parser.add_argument("--lm-eval-limit", type=float, help="lm-eval: examples per task (or a fraction)")


def eval_config(args: argparse.Namespace):
    """The eval section of --config, else of the run's config.yaml, else the defaults; flags override it."""
    from tunelab.config import load_config
    from tunelab.config.schema import CheckConfig, EvalConfig
    from tunelab.errors import TunelabError
    from tunelab.evaluation.runs import is_run_dir

    if args.config:
        cfg = load_config(args.config).eval
    elif args.model and is_run_dir(Path(args.model)):
        cfg = load_config(Path(args.model) / "config.yaml").eval
    else:
        cfg = EvalConfig()
    if args.metrics:
        cfg.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for flag, field in (("max_samples", "max_samples"), ("batch_size", "batch_size"),
                        ("max_new_tokens", "max_new_tokens"), ("output", "output_dir")):
        if getattr(args, flag) is not None:
            setattr(cfg, field, getattr(args, flag))
    for spec in args.check:
        kind, sep, pattern = spec.partition(":")
        if not sep or kind not in ("contains", "regex") or not pattern:
            raise TunelabError(f"--check {spec!r}: expected contains:TEXT or regex:PATTERN")
        cfg.checks = [*cfg.checks, CheckConfig(kind=kind, pattern=pattern)]
    return cfg


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError

    models = ([args.model] if args.model else []) + (args.compare or [])
    if not models:
        raise TunelabError("name a model or run to evaluate: tunelab eval MODEL_OR_RUN [--data FILE]")
    if args.lm_eval:
        return _run_lm_eval(args, models)
    cfg = eval_config(args)
    _set_threads(args, models[0])
    data = args.data
    if args.compare:
        if args.adapter:
            raise TunelabError("--adapter applies to one model; with --compare pass adapter or run folders instead")
        return _run_compare(args, models, data, cfg)
    from tunelab.evaluation.evaluate import LoadOptions, evaluate

    result = evaluate(args.model, data, cfg, LoadOptions(args.adapter, args.template, args.device, args.dtype))
    print(result.table())
    _print_speed(result.info)
    print(f"\nReports: {result.output_dir} (report.html, report.md, predictions.jsonl, metrics.json)")
    return 0


def _set_threads(args: argparse.Namespace, model: str) -> None:
    """The engines made below run with the thread count set here (the same setting and default as training)."""
    from tunelab.config import load_config
    from tunelab.inference.hf import inference_threads

    threads = args.threads
    if threads is None and args.config:
        threads = load_config(args.config).train.threads
    inference_threads(threads, model)


def _run_compare(args: argparse.Namespace, models: list[str], data, cfg) -> int:
    from tunelab.evaluation.evaluate import LoadOptions, compare_models, slug

    default = Path("eval") / ("compare-" + "-vs-".join(slug(m) for m in models))
    out = Path(cfg.output_dir) if cfg.output_dir else default
    cfg.output_dir = None  # each model's reports go in a subfolder of `out`
    comparison = compare_models(models, data, cfg, LoadOptions(None, args.template, args.device, args.dtype),
                                output_dir=out)
    print(comparison.table())
    key = comparison.differences()[0]["score"] if comparison.results[0].predictions else None
    counts = comparison.example_counts(key) if key else None
    if counts:
        print(f"\nPer example ({key}): {counts['better']} better, {counts['worse']} worse, {counts['same']} unchanged "
              f"({comparison.models[comparison.tuned]} vs the base {comparison.base_model})")
    print(f"\nReports: {out} (comparison.html, comparison.md, comparison.json, one folder per model)")
    return 0


def _print_speed(info: dict) -> None:
    if "examples_per_s" in info:
        print(f"\ngeneration: {info['num_examples']} examples in {info['generation_s']:.1f} s "
              f"({info['examples_per_s']:.2f} examples/s, batch {info['batch_size']})")


def _run_lm_eval(args: argparse.Namespace, models: list[str]) -> int:
    import json

    from tunelab.errors import TunelabError
    from tunelab.evaluation.harness import harness_table, run_lm_eval

    if len(models) != 1 or args.adapter:
        raise TunelabError("--lm-eval runs on one model (a run, adapter or merged folder), without --compare")
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    limit = args.lm_eval_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = run_lm_eval(models[0], tasks, limit=limit, batch_size=args.batch_size or 8,
                          include=args.lm_eval_include)
    print(harness_table(results))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nWritten: {out / 'lm_eval.json'}")
    return 0
