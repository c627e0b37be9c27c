"""Data-stage benchmark: records/s of `prepare_data` vs the plain Hugging Face way, in the same run.

Synthetic Alpaca records (English and Chinese) are written to a temporary JSON file. Both ways start from that
file and end with input_ids + labels (prompt masked, reply + end-of-turn trained) for every record:

- plain: `datasets.load_dataset("json")` + `Dataset.map` of a per-record function that formats the prompt with
  `apply_chat_template` and tokenizes prompt and reply separately (the recipe in the project seeds);
- tunelab: `prepare_data` (load, validate, clean, render, tokenize in batches, mask, split, save to its cache).

Usage: python bench/data_prepare.py [--records 100000] [--model NAME]. Writes results to bench/results/
(git-ignored) and nothing else into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS_EN = ["apple", "banana", "cherry", "river", "mountain", "cloud", "window", "garden", "yellow", "quiet", "rapid",
            "silver", "forest", "candle", "pencil", "market", "winter", "summer", "ocean", "bridge", "lantern",
            "violin", "planet", "rocket", "marble", "copper", "tiger"]
WORDS_ZH = ["苹果", "香蕉", "橙子", "河流", "高山", "白云", "窗户", "花园", "黄色", "安静", "快速", "银色", "森林", "蜡烛",
            "铅笔", "市场", "冬天", "夏天", "海洋", "桥梁"]
TASKS = ("Reverse the order of these words: {w}", "Sort these words alphabetically: {w}",
         "把这些词倒过来排列：{w}", "Count the words in: {w}", "请把下面的词连成一句话：{w}")


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        vocab = WORDS_ZH if i % 3 == 0 else WORDS_EN
        words = rng.sample(vocab, rng.randint(3, 8))
        task = rng.choice(TASKS)
        extra = f"Example {i}." if rng.random() < 0.3 else ""
        answer = " ".join(reversed(words)) + (f" ({len(words)} words, item {i})" if rng.random() < 0.5 else "")
        records.append({"instruction": task.format(w=" ".join(words)), "input": extra, "output": answer})
    return records


def plain_way(path: Path, tokenizer, cutoff_len: int) -> tuple[float, int, int]:
    """The seeds' recipe: datasets.map of a per-record tokenize function."""
    from datasets import disable_caching, load_dataset

    disable_caching()  # measure the work, not a cache hit of a previous run
    eos = tokenizer.eos_token_id

    def process(example):
        user = example["instruction"] + ("\n" + example["input"] if example["input"] else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [eos]
        input_ids = (prompt_ids + reply_ids)[:cutoff_len]
        labels = ([-100] * len(prompt_ids) + reply_ids)[:cutoff_len]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    start, cpu = time.perf_counter(), time.process_time()
    ds = load_dataset("json", data_files=str(path), split="train")
    ds = ds.map(process, remove_columns=ds.column_names)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, len(ds), sum(len(x) for x in ds["input_ids"])


def tunelab_way(path: Path, tokenizer, cutoff_len: int, cache: Path) -> tuple[float, float, int, int, dict]:
    from tunelab.config.schema import DataConfig
    from tunelab.data.pipeline import prepare_data
    from tunelab.data.templates import resolve_template

    cfg = DataConfig(datasets=[{"path": str(path)}], cutoff_len=cutoff_len, cache_dir=str(cache),
                     clean={"dedup": False})
    start, cpu = time.perf_counter(), time.process_time()
    template = resolve_template(cfg.template, tokenizer)
    prepared = prepare_data(cfg, tokenizer, template, force=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, prepared.stats["examples"], prepared.stats["tokens"], prepared.stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--model", default=None, help="model whose tokenizer is used (default: embedded SmolLM2)")
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    from tunelab.config.schema import ModelConfig
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=args.model) if args.model else ModelConfig())
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        path = Path(tmp) / "alpaca_synthetic.json"
        path.write_text(json.dumps(synthetic_records(args.records), ensure_ascii=False), encoding="utf-8")
        ours = tunelab_way(path, tokenizer, args.cutoff_len, Path(tmp) / "cache")
        plain = plain_way(path, tokenizer, args.cutoff_len)
    rows = [("plain datasets.map (seeds)", *plain), ("tunelab prepare_data", *ours[:4])]
    print(f"\n{args.records} synthetic Alpaca records, tokenizer {tokenizer.name_or_path}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}\n")
    print(f"| {'way':<28} | {'wall s':>7} | {'records/s':>9} | {'CPU s':>7} | {'examples':>8} | {'tokens':>10} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 12}|")
    for name, seconds, cpu, examples, tokens in rows:
        print(f"| {name:<28} | {seconds:>7.2f} | {args.records / seconds:>9.0f} | {cpu:>7.2f} | {examples:>8} | "
              f"{tokens:>10} |")
    speedup = plain[0] / ours[0]
    print(f"\ntunelab is {speedup:.2f}x the plain way; target >= 5000 records/s: "
          f"{'met' if args.records / ours[0] >= 5000 else 'NOT met'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"records": args.records, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0],
              "plain": {"seconds": plain[0], "cpu_seconds": plain[1], "records_per_s": args.records / plain[0]},
              "tunelab": {"seconds": ours[0], "cpu_seconds": ours[1], "records_per_s": args.records / ours[0]},
              "speedup": speedup,
              "tunelab_stats": {k: ours[4][k] for k in ("examples", "tokens", "trained_tokens", "length")}}
    (out / "data_prepare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"results: {out / 'data_prepare.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
