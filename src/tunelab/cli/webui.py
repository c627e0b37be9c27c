"""`tunelab webui [--host 127.0.0.1] [--port 7860] [--password P]`: the browser UI (tunelab.webui)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default 127.0.0.1: this machine only; set --password before exposing it)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--password", default=None,
                        help="require this password on a login page (any user name); TUNELAB_WEBUI_PASSWORD also works")
    parser.add_argument("--runs-dir", default="runs", help="where runs are listed and started (default: runs)")
    parser.add_argument("--lang", choices=["en", "zh"], default="en", help="language at start (switchable in the page)")
    parser.add_argument("--model", default=None, help="model pre-filled in the forms (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the page's chat and evaluation (default: as training, one per usable "
                             "core unless OMP_NUM_THREADS is set); training runs use their config's train.threads")


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError

    try:
        from tunelab.webui.app import create_ui, launch_ui
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "gradio":
            raise TunelabError("the web UI needs gradio: pip install 'tunelab[webui]'") from None
        raise
    password = args.password or os.environ.get("TUNELAB_WEBUI_PASSWORD") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not password:
        print(f"warning: serving on {args.host} without --password: anyone who can reach it can train and run models")
    demo = create_ui(runs_dir=args.runs_dir, lang=args.lang, default_model=args.model, threads=args.threads)
    print(f"tunelab web UI on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch_ui(demo, host=args.host, port=args.port, password=password, block=True, quiet=True)
    return 0
