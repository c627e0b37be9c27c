"""`tunelab env`: versions and devices, to paste into a bug report."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def environment() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    versions = {}
    for pkg in ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "gguf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    from tunelab.models.resolve import default_model_note

    info = {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "default_model": default_model_note()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0
