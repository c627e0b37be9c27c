"""Benchmark: evaluation generation throughput, batched (left padding + KV cache) vs one prompt at a time.

Both modes run in the same process on the same prompts with greedy decoding, through the same engine and the same
`generate_all` that `tunelab eval` uses, so the only difference is the batch size. Prints a table and JSON.

    .venv/bin/python bench/eval_generation.py                     # embedded SmolLM2-135M, 32 prompts
    .venv/bin/python bench/eval_generation.py --n 64 --batch-size 16 --max-new-tokens 48 --model runs/my-run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "Reverse the order of these words: apple river stone",
    "What is the capital of France? Answer in one sentence.",
    "Give one synonym of 'happy'.",
    "Translate to French: good morning",
    "法国的首都是哪里？请用一句话回答。",
    "Name three primary colors.",
    "用一句话介绍长城。",
    "What is 12 plus 30?",
    "Write a haiku about autumn.",
    "Reverse the order of these words: blue green red yellow",
    "List two fruits that are red.",
    "请把这句话翻译成英文：今天天气很好。",
    "Explain what a noun is in one sentence.",
    "What color is the sky on a clear day?",
    "Summarize in five words: The cat slept all afternoon in the warm sun by the window.",
    "给出三个以“春”开头的词语。",
]


def run_mode(engine, prompts: list[str], params, batch_size: int) -> tuple[float, list[str], int]:
    from tunelab.evaluation.evaluate import generate_all

    start = time.perf_counter()
    completions = generate_all(engine, prompts, params, batch_size)
    elapsed = time.perf_counter() - start
    return elapsed, [c.text for c in completions], sum(c.completion_tokens for c in completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--n", type=int, default=32, help="prompts (the built-in 16 repeated)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    import torch

    from tunelab.config.schema import EvalConfig
    from tunelab.evaluation.evaluate import generation_params, open_engine
    from tunelab.inference.engine import EngineOptions

    engine = open_engine(args.model, None, EngineOptions(device=args.device))
    prompts = [engine.render([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True)
               for i in range(args.n)]
    params = generation_params(EvalConfig(max_new_tokens=args.max_new_tokens),
                               getattr(engine.template, "stop_strings", ()))
    run_mode(engine, prompts[:2], params, 2)  # warm-up: first-call allocations and kernel selection
    rows = {}
    for label, bs in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        elapsed, texts, tokens = run_mode(engine, prompts, params, bs)
        rows[label] = {"batch_size": bs, "seconds": round(elapsed, 2), "examples_per_s": round(args.n / elapsed, 3),
                       "tokens_per_s": round(tokens / elapsed, 1), "texts": texts}
    (one, batched) = rows.values()
    same = sum(a == b for a, b in zip(one["texts"], batched["texts"]))
    result = {
        "model": engine.name, "device": str(engine.device), "dtype": str(next(engine.model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "prompts": args.n, "max_new_tokens": args.max_new_tokens,
        "modes": {k: {f: v for f, v in r.items() if f != "texts"} for k, r in rows.items()},
        "speedup": round(batched["examples_per_s"] / one["examples_per_s"], 2),
        "identical_outputs": f"{same}/{args.n}",
    }
    print(f"{'mode':<16}{'seconds':>9}{'examples/s':>12}{'tokens/s':>10}")
    for label, r in result["modes"].items():
        print(f"{label:<16}{r['seconds']:>9}{r['examples_per_s']:>12}{r['tokens_per_s']:>10}")
    print(f"speed-up {result['speedup']}x; identical greedy outputs {result['identical_outputs']}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
