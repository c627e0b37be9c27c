"""`tunelab validate CFG [a.b=c ...]`: print the resolved config, or every error at once (schema, then data)."""

from __future__ import annotations

import argparse

from tunelab.cli.common import add_config_arguments, config_from_args
from tunelab.config import dump_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-data", action="store_true",
                        help="check only the schema, not data.datasets (for a config used only to serve or export)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not args.no_data:
        from tunelab.data.check import check_data

        check_data(cfg, args.config)  # an empty dataset list, a missing file, an unknown name: reported before any run starts
    print(dump_config(cfg), end="")
    return 0
