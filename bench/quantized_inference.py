"""bitsandbytes inference (model.quantize, issue 16): memory, decode speed and greedy agreement of fp32, int8, nf4.

Each variant loads the same model through `load_engine` (what `tunelab chat/eval/serve --quantize` do) in its own
subprocess, so its peak RSS is its own. Per variant: the weights' bytes (transformers' get_memory_footprint), peak
RSS after load and after generating, greedy decode tokens/s (one request, after a warm-up answer, the median of
--repeat answers of --tokens tokens), and the greedy answers of a few prompts. The fp32 answers are the reference:
"agreement" is the share of positions where a quantized model's greedy token equals fp32's, both (a) teacher forced
on fp32's answer tokens (the next-token choice at each position given the same prefix) and (b) free running (the
first differing token ends the identical prefix, reported as its mean length).

    python bench/quantized_inference.py                       # the embedded SmolLM2-135M-Instruct, 2 threads
    python bench/quantized_inference.py --model RUN_OR_FOLDER --threads 1

Results: a table on stdout and bench/results/quantized_inference.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write two sentences about the sea.",
    "List three fruits.",
    "Explain what a neural network is in one sentence.",
    "Reverse the order of these words: red green blue",
]
VARIANTS = ("none", "int8", "nf4")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: str, quantize: str, tokens: int, repeat: int, threads: int) -> dict:
    """One variant, in this process: load, answer PROMPTS greedily, time decoding."""
    import torch

    from tunelab.inference.engine import EngineOptions, GenerationParams
    from tunelab.inference.hf import inference_threads, load_engine

    inference_threads(threads)
    t0 = time.perf_counter()
    engine = load_engine(model, None, EngineOptions(quantize=quantize, max_batch_size=1, threads=threads))
    load_s = time.perf_counter() - t0
    out = {"quantize": quantize, "load_s": round(load_s, 2), "rss_after_load_mb": round(rss_mb()),
           "weight_bytes": engine.model.get_memory_footprint()}
    greedy = GenerationParams(max_new_tokens=32)
    prompts = [engine.render([{"role": "user", "content": p}]) for p in PROMPTS]
    out["answers"] = [engine.generate([p], greedy)[0].text for p in prompts]
    out["prompt_ids"] = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out["answer_ids"] = [greedy_ids(engine, ids, 32) for ids in out["prompt_ids"]]
    timed = GenerationParams(max_new_tokens=tokens)
    speeds = []
    for _ in range(repeat):
        t = time.perf_counter()
        [c] = engine.generate([prompts[1]], timed)
        speeds.append(c.completion_tokens / (time.perf_counter() - t))
    out["tokens_per_s"] = round(statistics.median(speeds), 2)
    out["rss_peak_mb"] = round(rss_mb())
    out["threads"] = torch.get_num_threads()
    return out, engine


def greedy_ids(engine, prompt: list[int], n: int) -> list[int]:
    """The first `n` greedy token ids after `prompt` (transformers' generate, eos ignored: same length for all)."""
    import torch

    with torch.no_grad():
        out = engine.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


def teacher_forced_agreement(engine, reference: dict) -> float:
    """Share of fp32's answer positions where this variant's greedy next token is fp32's token."""
    import torch

    same = total = 0
    for prompt, answer in zip(reference["prompt_ids"], reference["answer_ids"]):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            choice = engine.model(ids).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        same += sum(int(a == b) for a, b in zip(choice, answer))
        total += len(answer)
    return same / total if total else float("nan")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_child(args, quantize: str, reference: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", quantize, "--model", args.model, "--tokens", str(args.tokens),
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    if reference is not None:
        cmd += ["--reference", str(reference)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{quantize}: child failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from tunelab.config.schema import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per timed answer")
    parser.add_argument("--repeat", type=int, default=3, help="timed answers per variant (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result, engine = measure(args.model, args.child, args.tokens, args.repeat, args.threads)
        if args.reference:
            result["teacher_forced_agreement"] = teacher_forced_agreement(
                engine, json.loads(Path(args.reference).read_text()))
        print(json.dumps(result))
        return
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    results = []
    reference_file = out_dir / "quantized_inference_fp32.json"
    for quantize in args.variants.split(","):
        ref = reference_file if quantize != "none" and reference_file.exists() else None
        result = run_child(args, quantize, ref)
        if quantize == "none":
            reference_file.write_text(json.dumps(result))
        results.append(result)
    reference = results[0]
    print(f"model {args.model}, {reference['threads']} threads, load average {os.getloadavg()}")
    print("| variant | weights MB | peak RSS MB | load s | decode tokens/s | teacher-forced agreement | "
          "identical greedy prefix (tokens, of 32) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        prefix = statistics.mean(common_prefix(a, b) for a, b in zip(r["answer_ids"], reference["answer_ids"]))
        agreement = r.get("teacher_forced_agreement", 1.0)
        print(f"| {'fp32' if r['quantize'] == 'none' else r['quantize']} | {r['weight_bytes'] / 1e6:.1f} | "
              f"{r['rss_peak_mb']} | {r['load_s']} | {r['tokens_per_s']} | {agreement:.3f} | {prefix:.1f} |")
    for r in results:
        print(f"\n{r['quantize']}: " + " / ".join(a.replace("\n", " ")[:80] for a in r["answers"]))
    (out_dir / "quantized_inference.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
