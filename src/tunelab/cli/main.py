"""The `tunelab` command: subcommands live in small modules imported only when used."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module under tunelab.cli, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole pipeline on the bundled example: data, train, evaluate, export, chat"),
    "validate": ("validate", "check a config and print it resolved, or every error at once"),
    "data": ("data", "prepare and preview training data"),
    "train": ("train", "fine-tune a model"),
    "eval": ("evaluate", "evaluate a model or run; compare several"),
    "runs": ("runs", "list and compare past runs"),
    "export": ("export", "merge an adapter and export safetensors, GGUF, Ollama"),
    "chat": ("chat", "chat with a model in the terminal"),
    "serve": ("serve", "serve an OpenAI-compatible REST API"),
    "webui": ("webui", "start the web UI"),
    "env": ("env", "print versions and devices, for bug reports"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune LLMs from data to deployment.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            mod = importlib.import_module(f"tunelab.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"tunelab.cli.{module}":
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv; `key=value` overrides may also come after options (`tunelab serve M --port 1 serve.host=::1`)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def quiet_third_party() -> None:
    """Keep the console for tunelab's own output: optional backends (torchao without its CUDA kernels, torch's
    pytree notices) and deprecation notices of libraries say nothing the user can act on. `-v` shows them."""
    import warnings

    for name in ("torchao", "torch", "torch.utils._pytree", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")


def main(argv: list[str] | None = None) -> int:
    from tunelab.config.load import ConfigError
    from tunelab.errors import TunelabError
    from tunelab.models.resolve import ModelNotFoundError
    from tunelab.plugins import load_plugins

    try:
        load_plugins()  # installed extensions register their methods, formats, ... before the parser lists them
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    if getattr(args, "_missing", False):
        print(f"tunelab {args.command}: not available in this version", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        quiet_third_party()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    module = importlib.import_module(f"tunelab.cli.{args._module}")
    try:
        return int(module.run(args) or 0)
    except (ConfigError, TunelabError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
