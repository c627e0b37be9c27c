"""`tunelab train CFG [a.b=c ...] [--resume] [--nproc N]`: fine-tune, then say where the result is and what next."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.config.schema import RunConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML, or a run folder (its config.yaml) to resume")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides such as train.lr=1e-4")
    parser.add_argument("--resume", action="store_true",
                        help="continue this config's run from its last complete checkpoint (optimizer, scheduler, "
                        "RNG and data position restored); to start a NEW run from an adapter use method.init_from")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine, launched with torchrun (gloo on CPU)")


def load_run_config(args: argparse.Namespace):
    from tunelab.config import load_config
    from tunelab.runs.rundir import run_folder_config

    path = Path(args.config)
    if path.is_dir():  # a run folder: its resolved config, and the same run name
        overrides = [f"train.output_dir={path.parent}", f"train.run_name={path.name}", *args.overrides]
        return load_config(run_folder_config(path), overrides)
    return load_config(path, args.overrides)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)
    if args.nproc < 1:
        raise TunelabError("--nproc must be at least 1")
    from tunelab.data.check import check_data

    check_data(cfg, args.config)  # every data problem at once, before a model loads or a process starts
    if args.nproc > 1:
        return launch(args, cfg)
    from tunelab.training.callbacks import StopBeforeTraining
    from tunelab.training.stages import get_stage

    with StopBeforeTraining():  # SIGTERM outside the training loop exits 130 too, like Ctrl-C
        result = get_stage(cfg.stage).run(cfg, resume=args.resume)  # sft, dpo, orpo, simpo, kto, rm
    if int(os.environ.get("RANK", "0")) == 0:
        print_next_steps(result, cfg)
    return 130 if result.status == "stopped" else 0  # 130: the shell's code for "stopped by Ctrl-C"


def print_next_steps(result, cfg: RunConfig) -> None:
    from tunelab.runs.rundir import RunDir

    if result.status == "stopped":
        step = result.metrics.get("global_step")
        print(f"\nstopped at step {step}; checkpoint saved in {RunDir(result.run_dir).checkpoints}")
        print(f"continue with: tunelab train {result.run_dir} --resume")
        return
    what = "adapter" if (result.final_dir / "adapter_config.json").is_file() else "model"
    metrics = result.metrics
    loss = metrics.get("final_loss")
    print(f"\ntraining done: {metrics.get('global_step')} steps" + (f", final loss {loss:.4f}" if loss else ""))
    print(f"{what}: {result.final_dir}")
    print(f"run folder: {result.run_dir} (metrics.jsonl, loss.png, tb/)")
    if cfg.stage == "rm":  # a value head scores replies; it does not chat
        print(f"next: tunelab eval {result.run_dir}")
        return
    print(f"next: tunelab chat {result.run_dir}")
    print(f"      tunelab eval {result.run_dir}")


def launch(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Re-run this command under torchrun with N processes (accelerate's --cpu would silently run one)."""
    from tunelab.runs.rundir import select_run_dir
    from tunelab.training.speed import usable_cores

    name = select_run_dir(cfg, args.resume).path.name  # decided once, so every rank writes the same folder
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "tunelab.cli.main", "train", args.config, *args.overrides, f"train.run_name={name}"]
    if args.resume:
        command.append("--resume")
    env = dict(os.environ)
    # torchrun pins every process to 1 thread unless told otherwise; share the cores between the processes
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // args.nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_workers(command, env, Path(cfg.train.output_dir).expanduser() / name)


def run_workers(command: list[str], env: dict, run_dir: Path) -> int:
    """Run torchrun and wait for it. Ctrl-C reaches every process of the terminal's group by itself; a SIGTERM
    sent to this process only is passed on to torchrun, which passes it to the workers (each finishes its step and
    saves). Exit code as for one process: 130 when the run stopped with a checkpoint."""
    import signal

    from tunelab.runs.read import RunInfo

    proc = subprocess.Popen(command, env=env)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = RunInfo.read(run_dir).status
    if status == "stopped" or (received and code != 0):
        return 130  # stopped by Ctrl-C or SIGTERM (with a checkpoint when status is "stopped")
    return code
