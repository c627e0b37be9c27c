"""Arguments shared by commands that take a run config."""

from __future__ import annotations

import argparse

from tunelab.config import RunConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("config", nargs=None if required else "?", help="run config YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as train.lr=1e-4")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", None))
