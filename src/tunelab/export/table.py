"""Export, report: one table per export so users can choose an artifact: size, perplexity, generation speed.

Perplexity is measured like `tunelab eval` (evaluation/loss.py: the run's template, cutoff and trained tokens) on
the run's validation split, or on a held-out slice of its data when the run kept none. GGUF files are scored after
loading them with transformers (gguf_file=, dequantized to fp32): the perplexity is that of the quantized weights,
but the speed of such a load is the fp32 model's, not llama.cpp's, so GGUF rows show no tokens/s (the opt-in
llama.cpp check measures it). Written to <out>/export_table.md and export_table.json, and printed.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_EXAMPLES = 32
SPEED_PROMPT = [{"role": "user", "content": "Write two sentences about the sea."}]


@dataclass
class TableRow:
    artifact: str  # path relative to the export folder
    size_bytes: int
    perplexity: float | None
    tokens_per_s: float | None


def held_out_conversations(art, template, tokenizer) -> tuple[list, str]:
    """The run's validation split (or the last 10% of its data, at most MAX_EXAMPLES) and where it came from."""
    if art.run_config is None:
        return [], "no run data (exported a plain adapter or model)"
    from tunelab.data.pipeline import load_all
    from tunelab.evaluation.examples import validation_conversations

    data_cfg = art.run_config.data
    try:
        held_out = validation_conversations(data_cfg, template, tokenizer) if data_cfg.val_size else []
        if held_out:
            return held_out[:MAX_EXAMPLES], f"validation split ({min(len(held_out), MAX_EXAMPLES)} examples)"
        conversations, _, _ = load_all(data_cfg)
    except Exception as e:  # noqa: BLE001 - the data may have moved since training: the table says so
        return [], f"run data not readable ({type(e).__name__}: {e})"
    tail = conversations[-max(1, min(MAX_EXAMPLES, len(conversations) // 10)):] if conversations else []
    return tail, f"last {len(tail)} examples of the training data (the run kept no validation split)"


def build_table(out_dir: Path, gguf: dict[str, Path], quantized: dict | None, conversations: list, template,
                data_cfg) -> list[TableRow]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    loaders = [(out_dir, lambda: AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto"), True)]
    if quantized:
        folder = out_dir / quantized["method"]
        loaders.append((folder, lambda: AutoModelForCausalLM.from_pretrained(folder), True))
    for path in gguf.values():
        loaders.append((path, lambda p=path: AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)), False))
    rows = []
    for path, load, timed in loaders:
        model = load()
        ppl = _perplexity(model, tokenizer, template, conversations, data_cfg) if conversations else None
        speed = _tokens_per_s(model, tokenizer) if timed else None
        rows.append(TableRow(_name(path, out_dir), _size(path), ppl, speed))
        del model
        gc.collect()
    return rows


def write_table(out_dir: Path, rows: list[TableRow], data_label: str, notes: list[str] = ()) -> str:
    """`notes`: lines under the table (e.g. whether the k-quants used an importance matrix)."""
    text = "\n".join([format_table(rows, data_label), *notes])
    (out_dir / "export_table.md").write_text(text + "\n", encoding="utf-8")
    (out_dir / "export_table.json").write_text(json.dumps({"data": data_label, "rows": [asdict(r) for r in rows],
                                                           "notes": list(notes)}, indent=2), encoding="utf-8")
    return text


def format_table(rows: list[TableRow], data_label: str) -> str:
    lines = ["| artifact | size | perplexity | tokens/s |", "|---|---|---|---|"]
    for r in rows:
        ppl = f"{r.perplexity:.3f}" if r.perplexity is not None else "-"
        speed = f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "- (llama.cpp runtime)"
        lines.append(f"| {r.artifact} | {r.size_bytes / 1e6:.1f} MB | {ppl} | {speed} |")
    return "\n".join(lines) + f"\n\nperplexity on: {data_label}"


def _perplexity(model, tokenizer, template, conversations, data_cfg) -> float:
    from tunelab.data.encode import EncodeSettings
    from tunelab.evaluation.loss import compute_loss

    settings = EncodeSettings(data_cfg.cutoff_len, data_cfg.train_on) if data_cfg is not None else None
    return compute_loss(model, tokenizer, template, conversations, settings).perplexity


def _tokens_per_s(model, tokenizer, max_new_tokens: int = 32) -> float:
    """Greedy decoding speed of one chat answer, forced to `max_new_tokens` (after a 2-token warm-up)."""
    ids = tokenizer.apply_chat_template(SPEED_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    kwargs = {"do_sample": False, "min_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, **kwargs | {"min_new_tokens": 2})
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **kwargs)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def _name(path: Path, out_dir: Path) -> str:
    return "merged (safetensors)" if path == out_dir else str(path.relative_to(out_dir))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    files = path.iterdir()
    return sum(p.stat().st_size for p in files if p.is_file() and p.suffix in (".safetensors", ".bin"))
