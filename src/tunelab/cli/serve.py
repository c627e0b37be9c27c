"""`tunelab serve MODEL`: an OpenAI-compatible REST API on 127.0.0.1 (see tunelab.serving)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, adapter folder, merged/exported folder, hub id or .gguf file")
    parser.add_argument("--adapter", help="LoRA (or other PEFT) adapter folder to apply to MODEL")
    parser.add_argument("--config", help="run config YAML whose `serve:` section gives the defaults")
    parser.add_argument("--host", help="bind address (default 127.0.0.1; another host needs an API key)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                        help="accepted bearer token (repeatable); TUNELAB_API_KEY may hold more, comma-separated")
    parser.add_argument("--model-name", help="name clients send as `model` (default: the model's name)")
    parser.add_argument("--max-batch-size", type=int, help="requests generated together (default 8)")
    parser.add_argument("--max-queue", type=int, help="waiting requests before answering 503 (default 64)")
    parser.add_argument("--max-new-tokens", type=int, help="default and ceiling of max_tokens (default 512)")
    parser.add_argument("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN",
                        help="allow browser calls from this origin (repeatable; none by default)")
    parser.add_argument("--allow-no-auth", action="store_true",
                        help="allow a non-loopback --host without an API key (anyone on the network can use it)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for generation (default: --config's train.threads, a run's train.threads, "
                        "else one per usable core, as training)")
    from tunelab.inference.engine import engine_kinds, known_engines

    parser.add_argument("--engine", choices=known_engines(), default=known_engines()[0],
                        help="; ".join(f"{e.name}: {e.description}" for e in engine_kinds()))
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds requests in flight get to finish on Ctrl+C/SIGTERM (default 30)")


def serve_config(args: argparse.Namespace):
    from tunelab.config import load_config
    from tunelab.config.schema import ServeConfig

    base = load_config(args.config).serve if args.config else ServeConfig()
    changes = {k: getattr(args, k) for k in ("host", "port", "model_name", "max_batch_size", "max_queue",
                                             "max_new_tokens", "cors_origins") if getattr(args, k) is not None}
    if args.api_keys:
        changes["api_keys"] = [*base.api_keys, *args.api_keys]
    return ServeConfig.model_validate({**base.model_dump(), **changes})


def thread_setting(args: argparse.Namespace) -> int | None:
    """--threads, else the train.threads of --config (the same key training reads); None: decided at load."""
    if getattr(args, "threads", None) is not None:
        return args.threads
    if getattr(args, "config", None):
        from tunelab.config import load_config

        return load_config(args.config).train.threads
    return None


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tunelab.errors import TunelabError
    from tunelab.serving.server import serve

    try:
        cfg = serve_config(args)
    except ValidationError as e:
        raise TunelabError(f"invalid serve option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from e
    serve(args.model, adapter=args.adapter, cfg=cfg, allow_no_auth=args.allow_no_auth,
          shutdown_timeout_s=args.shutdown_timeout, threads=thread_setting(args), engine=args.engine)
    return 0
