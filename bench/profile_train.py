"""Where a tunelab training step spends its time (issue 17): torch.profiler over a few steps of bench/train.py's
data and LoRA, after the first step (set-up), per op and per region of the step.

    python bench/profile_train.py --steps 6 --overrides train.mixed_precision=no

Prints a table of the top ops by self CPU time and a breakdown by region (forward, loss, backward, optimizer,
data collation); writes nothing to the repo.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train as bench  # (bench/train.py: the same data, LoRA and hyperparameters)


def profiler_callback(skip: int, prof_holder: dict):
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        """Profile every step after the first `skip`; record per-step wall time for all of them."""

        def __init__(self):
            self.times, self.prof, self.started = [], None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == skip and self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   record_shapes=False)
                self.prof.__enter__()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

        def on_train_end(self, args, state, control, **kwargs):
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                prof_holder["prof"] = self.prof
            prof_holder["times"] = self.times

    return Profile()


def regions(prof) -> dict[str, float]:
    """Seconds in the top-level regions the Trainer and autograd record (self time of everything beneath)."""
    events = prof.key_averages()
    wanted = {"forward": "## forward ##", "backward": "## backward ##", "optimizer": "Optimizer.step",
              "collate": "enumerate(DataLoader)", "zero_grad": "Optimizer.zero_grad"}
    found = {}
    for label, prefix in wanted.items():
        total = sum(e.cpu_time_total for e in events if e.key.startswith(prefix))
        if total:
            found[label] = total / 1e6
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=1, help="steps run before profiling starts (set-up)")
    parser.add_argument("--overrides", default="train.mixed_precision=no", help="';'-separated tunelab overrides")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    from tunelab.training.sft import train

    with tempfile.TemporaryDirectory(prefix="tunelab-profile-") as tmp:
        work = Path(tmp)
        import os

        os.environ["TUNELAB_DATA_CACHE"] = str(work / "data-cache")
        spec = bench.prepare(bench.parse_args(["--steps", str(args.steps)]), work)
        holder: dict = {}
        overrides = [o for o in args.overrides.split(";") if o]
        cfg = bench.tunelab_config(spec, overrides=overrides)
        train(cfg, echo=False, callbacks=[profiler_callback(args.skip, holder)])
    prof = holder["prof"]
    print(f"step times (s): {', '.join(f'{t:.2f}' for t in holder['times'])}; profiled steps {args.skip + 1}.."
          f"{args.steps}; tokens {spec['tokens']} in {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    for name, seconds in regions(prof).items():
        print(f"region {name}: {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
