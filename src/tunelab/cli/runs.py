"""`tunelab runs [DIR]` lists past runs; `tunelab runs compare RUN1 RUN2 ...` diffs configs, metrics and curves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="DIR | compare RUN...",
                        help="a runs folder to list (default: runs), or `compare` followed by two or more run folders")
    parser.add_argument("--output", metavar="DIR",
                        help="compare: where comparison.md and loss.png go (default: <runs folder>/_compare/A_vs_B)")
    parser.add_argument("--json", action="store_true", help="list: print the runs as JSON")


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError
    from tunelab.evaluation.runs import compare_runs, list_runs, runs_table

    if args.args and args.args[0] == "compare":
        dirs = [Path(d) for d in args.args[1:]]
        if len(dirs) < 2:
            raise TunelabError("compare needs at least two runs: tunelab runs compare RUN1 RUN2 ...")
        out = Path(args.output) if args.output else dirs[0].parent / "_compare" / "_vs_".join(d.name for d in dirs)
        comparison = compare_runs(dirs, output_dir=out)
        print(comparison)
        print(f"\nReport: {out / 'comparison.md'}")
        return 0
    if len(args.args) > 1:
        raise TunelabError(f"tunelab runs takes one folder, got {len(args.args)}; to compare: tunelab runs compare "
                           + " ".join(args.args))
    runs = list_runs(args.args[0] if args.args else "runs")
    if args.json:
        print(json.dumps([{"name": r.name, "path": str(r.path), "status": r.status, "started": r.started,
                           "method": r.method, "config": r.config, "metrics": r.metrics} for r in runs],
                         ensure_ascii=False, indent=2))
    elif not runs:
        print(f"no runs in {args.args[0] if args.args else 'runs'}")
    else:
        print(runs_table(runs))
    return 0
