"""`tunelab chat MODEL`: talk to a base model, run, adapter, exported folder or GGUF in the terminal.

Interactive on a terminal (streaming, /clear, /exit, Ctrl-C stops an answer); one-shot with `-p TEXT` (`-p -`
reads the whole of stdin as one prompt); with piped stdin and no -p, each line is one user turn.
"""

from __future__ import annotations

import argparse
import sys

HELP = "commands: /clear forget the conversation · /system TEXT set the system prompt · /exit quit (or Ctrl-D)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="run folder, adapter, exported or HF folder, hub id or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--adapter", help="PEFT adapter folder applied on MODEL")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit ('-': read it from stdin)")
    parser.add_argument("--template", help="override the recorded chat template (name or .jinja path)")
    add_sampling_arguments(parser)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the weights after loading")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for generation (default: a run's train.threads, else as training does)")
    parser.add_argument("--stats", action="store_true", help="print tokens and tokens/s of each answer to stderr")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def params_from_args(args: argparse.Namespace):
    from tunelab.inference.engine import GenerationParams

    return GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=list(args.stop),
                            seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from tunelab.config.schema import DEFAULT_MODEL
    from tunelab.inference.chat import ChatSession
    from tunelab.inference.hf import inference_threads, load_engine

    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print(f"loading {args.model or DEFAULT_MODEL} ...", file=sys.stderr, flush=True)
    inference_threads(getattr(args, "threads", None), args.model)
    engine = load_engine(args.model or DEFAULT_MODEL, args.adapter, device=args.device, dtype=args.dtype,
                         template=args.template, merge=args.merge)
    session = ChatSession(engine, system=args.system, params=params_from_args(args))
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
