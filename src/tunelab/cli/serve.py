"""`tunelab serve MODEL`: an OpenAI-compatible REST API on 127.0.0.1 (see tunelab.serving)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tunelab.cli.common import Setting, add_override_argument, add_settings, config_from_args

if TYPE_CHECKING:
    from tunelab.inference.engine import EngineOptions

SETTINGS = (
    Setting("--host", "serve.host", note="another host needs an API key"),
    Setting("--port", "serve.port"),
    Setting("--api-key", "serve.api_keys", extend=True, metavar="KEY",
            note="repeatable, added to the config's; the variable named by serve.api_key_env may hold more"),
    Setting("--model-name", "serve.model_name"),
    Setting("--max-batch-size", "serve.max_batch_size"),
    Setting("--max-queue", "serve.max_queue"),
    Setting("--max-new-tokens", "serve.max_new_tokens"),
    Setting("--cors-origin", "serve.cors_origins", metavar="ORIGIN", note="repeatable"),
    Setting("--threads", "train.threads", note="also a run's own train.threads when MODEL is a run"),
    Setting("--allow-no-auth", "serve.allow_no_auth"),
    Setting("--shutdown-timeout", "serve.shutdown_timeout_s", metavar="S"),
    Setting("--device", "model.device"),
    Setting("--dtype", "model.dtype"),
    Setting("--quantize", "model.quantize", note="engine hf"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, adapter folder, merged/exported folder, hub id or .gguf file")
    add_override_argument(parser)
    parser.add_argument("--adapter", help="LoRA (or other PEFT) adapter folder to apply to MODEL")
    parser.add_argument("--config", help="run config YAML whose serve section (and train.threads) gives the defaults "
                                         "(default: the run's own config.yaml when MODEL is a run)")
    from tunelab.inference.engine import engine_kinds

    engines = "; ".join(f"{e.name}: {e.description}" for e in engine_kinds())  # plugins may register more
    add_settings(parser, (*SETTINGS, Setting("--engine", "serve.engine", metavar="NAME", note=engines)))


def run_config(args: argparse.Namespace):
    """--config, else the run's config.yaml when MODEL is a run, else the defaults; then flags and overrides."""
    return config_from_args(args, args.model)


def serve_config(args: argparse.Namespace):
    """The serve section of the command's config (run_config)."""
    return run_config(args).serve


def thread_setting(args: argparse.Namespace) -> int | None:
    """--threads / train.threads=N / the config's train.threads (the key training reads); None: one per usable
    core, decided at load."""
    return run_config(args).train.threads


def engine_options(cfg) -> EngineOptions:
    """How the served model loads: model.device/dtype/quantize and train.threads, as `tunelab chat` reads them."""
    from tunelab.inference.engine import EngineOptions

    return EngineOptions(device=cfg.model.device, dtype=cfg.model.dtype, threads=cfg.train.threads,
                         quantize=cfg.model.quantize)


def run(args: argparse.Namespace) -> int:
    from tunelab.serving.server import serve

    cfg = run_config(args)  # a bad flag or override is a ConfigError naming the key (exit 2)
    if cfg.model.quantize != "none" and cfg.serve.engine != "hf":  # bitsandbytes base: models/quantized.py
        from tunelab.errors import TunelabError

        raise TunelabError(f"--quantize / model.quantize={cfg.model.quantize} is bitsandbytes in the hf engine; "
                           f"engine {cfg.serve.engine} serves quantized checkpoints itself (e.g. a GPTQ/AWQ export)")
    serve(args.model, args.adapter, cfg.serve, engine_options(cfg))
    return 0
