"""`tunelab data prepare CFG` and `tunelab data preview CFG -n 3`: the data stage from the command line."""

from __future__ import annotations

import argparse
import sys

from tunelab.cli.common import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = sub.add_parser("prepare", help="load, validate, clean, tokenize and cache the data; print a summary",
                             description="Load, validate, clean, tokenize and cache data.datasets; print a summary "
                                         "and write a token-length histogram.")
    add_config_arguments(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if a cached result exists")
    show = sub.add_parser("preview", help="print prepared examples with the trained tokens marked",
                          description="Print prepared examples; trained tokens are green in a terminal and "
                                      "[[bracketed]] when piped.")
    add_config_arguments(show)
    show.add_argument("-n", type=int, default=3, help="number of examples (default 3)")
    show.add_argument("--split", choices=("train", "validation"), default="train")
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto")


def run(args: argparse.Namespace) -> int:
    from tunelab.data.build import build_sft_data  # the data exactly as `tunelab train` builds it
    from tunelab.data.preview import preview, summary

    cfg = config_from_args(args)
    if args.data_command == "prepare":
        prepared = build_sft_data(cfg, progress=True, force=args.force)
        print(summary(prepared.stats))
        return 0
    prepared = build_sft_data(cfg, progress=True)
    tokenizer = prepared.tokenizer
    dataset = prepared.train if args.split == "train" else prepared.validation
    if dataset is None:
        print("no validation split: set data.val_size", file=sys.stderr)
        return 2
    color = {"always": True, "never": False}.get(args.color)
    print(f"template: {prepared.stats['template']['name']}; {len(dataset)} {args.split} examples\n")
    print(preview(dataset, tokenizer, n=args.n, color=color))
    return 0
