"""Check tunelab's GPU paths on a CUDA machine: bf16 LoRA, DoRA, QLoRA (bitsandbytes NF4), full, prefix.

Builds a random-weight model of a given size (speed does not depend on weight values) with a real tokenizer,
trains each method for a few steps on synthetic variable-length instruction data with tunelab's own recipe, and
prints tokens/s, peak GPU memory and first/last loss per method. Run:

    python bench/gpu_check.py --tokenizer TOKENIZER_DIR [--size 0.5b] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

SIZES = {  # Qwen2.5-like shapes
    "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2},
}
WORDS = ("alpha beta gamma delta model token train data loss layer weight value answer question river mountain "  # noqa: SIM905
         "数据 模型 训练 问题 答案 学习 语言 城市 河流 山").split()


def build_model(tokenizer_dir: Path, out: Path, size: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(vocab_size=(len(tok) + 63) // 64 * 64, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                      **SIZES[size])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def synthetic_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(3, 60)))
            a = " ".join(rng.choices(WORDS, k=int(rng.paretovariate(1.2) * 20) % 400 + 2))
            f.write(json.dumps({"instruction": q, "input": "", "output": a}, ensure_ascii=False) + "\n")
    return path


def run_method(method: dict, model_dir: Path, data: Path, out: Path, steps: int, batch: int) -> dict:
    import torch

    from tunelab.config import load_config
    from tunelab.training.sft import train

    cfg = load_config(None, [
        f"model.name={model_dir}", f"data.datasets=[{{path: {data}}}]", "data.cutoff_len=1024",
        f"train.output_dir={out}", f"train.run_name={method['name']}", f"train.max_steps={steps}",
        f"train.batch_size={batch}", "train.logging_steps=5", "train.report_to=[]", "train.save_steps=100000",
        *[f"method.{k}={v}" for k, v in method.items()],
    ])
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(cfg, echo=False)
    wall = time.perf_counter() - start
    losses = [json.loads(line).get("loss") for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    return {"method": method["name"], "wall_s": round(wall, 1), "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "tokens_per_s": result.metrics.get("train_tokens_per_second") or result.metrics.get("tokens_per_second")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", default="lora,dora,qlora,full,freeze,prefix")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir = build_model(args.tokenizer, work / "model", args.size)
    data = synthetic_alpaca(work / "data.jsonl", 2000)
    rows = []
    for name in args.methods.split(","):
        try:
            rows.append(run_method({"name": name}, model_dir, data, work / "runs", args.steps, args.batch))
        except Exception as e:  # noqa: BLE001 - report and go on: one broken path should not hide the others
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| method | wall s | tokens/s | peak GPU GiB | first loss | last loss |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error']} | | | | |")
        else:
            print(f"| {r['method']} | {r['wall_s']} | {r['tokens_per_s'] or '-'} | {r['peak_gpu_gb']:.2f} | "
                  f"{r['first_loss']} | {r['last_loss']} |")


if __name__ == "__main__":
    main()
