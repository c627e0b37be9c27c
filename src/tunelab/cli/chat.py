"""`tunelab chat MODEL`: talk to a base model, run, adapter, exported folder or GGUF in the terminal.

Interactive on a terminal (streaming, /clear, /exit, Ctrl-C stops an answer); one-shot with `-p TEXT` (`-p -`
reads the whole of stdin as one prompt); with piped stdin and no -p, each line is one user turn.
"""

from __future__ import annotations

import argparse
import sys

from tunelab.cli.common import LOADING, Setting, add_override_argument, add_settings, config_from_args, is_override

HELP = "commands: /clear forget the conversation · /system TEXT set the system prompt · /exit quit (or Ctrl-D)"


SETTINGS = (
    Setting("--system", "data.system", note="a run's own data.system when MODEL is a run"),
    *LOADING,
)
# sampling: flags of the generation section (GenerationParams' fields), help and defaults from the schema
SAMPLING = (
    Setting("--temperature", "generation.temperature"),
    Setting("--top-p", "generation.top_p"),
    Setting("--top-k", "generation.top_k"),
    Setting("--repetition-penalty", "generation.repetition_penalty"),
    Setting("--max-new-tokens", "generation.max_new_tokens"),
    Setting("--seed", "generation.seed"),
    Setting("--stop", "generation.stop", extend=True, metavar="TEXT", note="repeatable, added to the config's"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="run folder, adapter, exported or HF folder, hub id or .gguf (default: SmolLM2-135M)")
    add_override_argument(parser)
    parser.add_argument("--adapter", help="PEFT adapter folder applied on MODEL")
    parser.add_argument("--config", help="run config YAML whose model/data/train sections give the defaults "
                                         "(default: the run's own config.yaml when MODEL is a run)")
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit ('-': read it from stdin)")
    parser.add_argument("--template", help="override the recorded chat template (name or .jinja path)")
    add_settings(parser, (*SETTINGS, *SAMPLING))
    parser.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the weights after loading")
    parser.add_argument("--stats", action="store_true", help="print tokens and tokens/s of each answer to stderr")


def params_from_config(cfg):
    """GenerationParams of the config's generation section (flags and generation.*=... overrides included)."""
    from tunelab.inference.engine import GenerationParams

    return GenerationParams(**cfg.generation.model_dump())


def chat_config(args: argparse.Namespace):
    """--config, else the run's config.yaml when MODEL is a run, else the defaults; then flags and overrides."""
    if args.model and is_override(args.model):
        args.overrides, args.model = [args.model, *args.overrides], None
    return config_from_args(args, args.model)


def run(args: argparse.Namespace) -> int:
    from tunelab.config.schema import DEFAULT_MODEL
    from tunelab.inference.chat import ChatSession
    from tunelab.inference.engine import EngineOptions
    from tunelab.inference.hf import inference_threads, load_engine

    cfg = chat_config(args)
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print(f"loading {args.model or DEFAULT_MODEL} ...", file=sys.stderr, flush=True)
    inference_threads(cfg.train.threads, args.model)
    options = EngineOptions(device=cfg.model.device, dtype=cfg.model.dtype, template=args.template, merge=args.merge,
                            quantize=cfg.model.quantize)
    engine = load_engine(args.model or DEFAULT_MODEL, args.adapter, options)
    session = ChatSession(engine, system=cfg.data.system, params=params_from_config(cfg))
    if args.prompt is not None:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        answer(session, text.strip(), args.stats)
        return 0
    if interactive:
        _enable_line_editing()
        print(f"chatting with {engine.name} (template {engine.template.name}). {HELP}")
    loop(session, interactive, args.stats)
    return 0


def loop(session, interactive: bool, stats: bool) -> None:
    while True:
        try:
            line = input("user> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            session.clear()
            if interactive:
                print("(conversation cleared)")
            continue
        if text.startswith("/system"):
            session.system = text[len("/system"):].strip() or None
            continue
        if text == "/help":
            print(HELP)
            continue
        if interactive:
            print("assistant> ", end="", flush=True)
        try:
            answer(session, text, stats)
        except KeyboardInterrupt:  # Ctrl-C stops this answer (generation ends after the current token)
            print("\n(stopped; this turn is not remembered)")


def answer(session, text: str, stats: bool) -> None:
    for event in session.ask_stream(text):
        if event.delta:
            print(event.delta, end="", flush=True)
    print(flush=True)
    if stats and session.last_stats:
        s = session.last_stats
        print(f"[{s['completion_tokens']} tokens in {s['seconds']:.2f} s, {s['tokens_per_s']:.1f} tokens/s, "
              f"first token after {s['first_token_s']:.2f} s]", file=sys.stderr, flush=True)


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (arrow keys and history for input())
    except ImportError:
        pass
