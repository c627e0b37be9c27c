"""`tunelab validate CFG [a.b=c ...]`: print the resolved config, or every error at once."""

from __future__ import annotations

import argparse

from tunelab.cli.common import add_config_arguments, config_from_args
from tunelab.config import dump_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(dump_config(cfg), end="")
    return 0
