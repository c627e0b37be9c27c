"""Benchmark: generation time of chat/eval/serve under different torch thread counts (`--threads`, train.threads).

Each setting runs in a fresh interpreter (torch's thread pool is per process) without OMP_NUM_THREADS, so "torch"
really is torch's own default. A child loads the model through `load_engine` (the loader chat, eval, serve and the
web UI share), answers one warm-up prompt, then answers the prompts one at a time, greedy, as `tunelab chat -p`
does. Settings are interleaved over the repeats so a change in machine load hits all of them alike; the load
average before each child is recorded beside its figure.

    .venv/bin/python bench/threads.py                                  # 10 prompts x 12 tokens, 1 vs 2 vs torch
    .venv/bin/python bench/threads.py --settings 1,2,4,torch --repeats 3 --json threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Reverse the order of these words: apple river stone",
    "Give one synonym of 'happy'.",
    "法国的首都是哪里？请用一句话回答。",
    "Name three primary colors.",
    "用一句话介绍长城。",
    "What is 12 plus 30?",
    "Write a haiku about autumn.",
    "List two fruits that are red.",
    "Explain what a noun is in one sentence.",
]


def child(model: str, setting: str, n: int, max_new_tokens: int) -> dict:
    """Load the engine with `setting` threads ("torch": leave torch's default) and time the prompts."""
    import torch

    from tunelab.inference.engine import EngineOptions, GenerationParams
    from tunelab.inference.hf import load_engine

    threads = None if setting == "torch" else int(setting)
    if threads:
        torch.set_num_threads(threads)  # what inference_threads does for `--threads N`
    started = time.perf_counter()
    engine = load_engine(model, options=EngineOptions(threads=threads))
    load_s = time.perf_counter() - started
    params = GenerationParams(max_new_tokens=max_new_tokens)
    prompts = [engine.render([{"role": "user", "content": p}]) for p in (PROMPTS * n)[:n]]
    engine.generate(prompts[:1], params)  # warm-up: first-call allocations, not the setting, would dominate
    started = time.perf_counter()
    tokens = sum(engine.generate([p], params)[0].completion_tokens for p in prompts)
    elapsed = time.perf_counter() - started
    return {"setting": setting, "threads_in_force": engine.threads, "torch_default": torch.get_num_threads(),
            "load_s": round(load_s, 2), "seconds": round(elapsed, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1)}


def launch(args: argparse.Namespace, setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = os.getloadavg()
    cmd = [sys.executable, __file__, "--child", setting, "--model", args.model, "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    if proc.returncode != 0:
        return {"setting": setting, "error": proc.stderr.strip().splitlines()[-3:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "load_avg_before": [round(x, 2) for x in load_before]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--settings", default="1,2,torch", help="comma-separated thread counts; torch = its default")
    parser.add_argument("--n", type=int, default=10, help="prompts, answered one at a time")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.n, args.max_new_tokens)))
        return

    from tunelab.demo import cpu_description
    from tunelab.training.speed import usable_cores

    settings = args.settings.split(",")
    runs = [launch(args, s) for _ in range(args.repeats) for s in settings]
    print(f"{cpu_description()}, {usable_cores()} usable cores, "
          f"{args.n} prompts x {args.max_new_tokens} tokens, greedy, one prompt at a time")
    print(f"{'threads':>8} {'in force':>8} {'seconds (each repeat)':>28} {'median':>7} {'tokens/s':>9}  load avg before")
    for s in settings:
        mine = [r for r in runs if r["setting"] == s]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            print(f"{s:>8} error: {mine[0]['error']}")
            continue
        secs = [r["seconds"] for r in ok]
        print(f"{s:>8} {ok[0]['threads_in_force']:>8} {', '.join(f'{x:.1f}' for x in secs):>28} "
              f"{statistics.median(secs):>7.1f} {statistics.median(r['tokens_per_s'] for r in ok):>9.1f}  "
              f"{'; '.join(str(r['load_avg_before'][0]) for r in ok)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": runs, "cores": usable_cores(), "cpu": cpu_description(), "python": platform.python_version()}, f, indent=2)


if __name__ == "__main__":
    main()
