"""`tunelab demo [CFG]`: run the whole pipeline on the bundled example (what `make demo` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=str(Path("examples") / "demo" / "config.yaml"),
                        help="run config (default: examples/demo/config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as train.max_steps=10")
    parser.add_argument("--full", action="store_true",
                        help="train the config's schedule as written, even where this CPU is too slow for it to "
                             "finish in a few minutes (default: size the training to the measured hardware)")
    parser.add_argument("--gflops", type=float, metavar="N",
                        help="size the demo as if the matmul probe had measured N GFLOP/s (e.g. 32 to see what a "
                             "CPU with AVX2 only would run; training still runs at this machine's speed)")


def run(args: argparse.Namespace) -> int:
    from tunelab.demo import run_demo

    result = run_demo(args.config, args.overrides, size_for_hardware=not args.full, gflops=args.gflops)
    return 0 if result.learned_identity else 1
