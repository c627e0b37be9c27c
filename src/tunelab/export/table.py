"""Export, report: one table per export so users can choose an artifact: size, perplexity, generation speed.

Perplexity is measured like `tunelab eval` (evaluation/loss.py: the run's template, cutoff and trained tokens) on
the run's validation split, or on a held-out slice of its data when the run kept none. Every row is loaded with
transformers: the merged folder and the --quantize copy as saved, the GPTQ/AWQ folders through gptqmodel (a row
says why instead of numbers where that load is impossible here), GGUF files with gguf_file= dequantized to fp32 (the
perplexity is that of the quantized weights). Tokens/s is measured in the runtime each artifact is meant for and
the table names it: transformers for the folders; for GGUF files llama.cpp (llama-cpp-python's binding over the
libraries `make llama-cpp` built, in a subprocess: llamacpp_speed.py) when that runtime is there, else none (the
fp32 transformers load of a GGUF says nothing about its speed). Written to <out>/export_table.md and
export_table.json, and printed.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    runtime: str | None = None  # what measured tokens_per_s: "transformers" or "llama.cpp"
    note: str | None = None  # why a number is missing (e.g. the artifact cannot be loaded here)


@dataclass
class Artifacts:
    """What one export wrote, as the table needs it (pipeline.ExportResult's fields)."""

    out_dir: Path  # the merged folder
    gguf: dict[str, Path] = field(default_factory=dict)
    quantized: dict | None = None  # the --quantize copy (quantize.py)
    weight_quant: dict[str, dict] = field(default_factory=dict)  # gptq/awq -> info (gptq.py)
    llama_cpp: Path | None = None  # a llama-cpp-python runtime folder (llamacpp_build.python_runtime) for GGUF speed


@dataclass
class _Candidate:
    path: Path
    load: Callable[[], object] | None  # None: not loadable here, `note` says why
    speed: str | None  # "transformers" (timed after loading), "llama.cpp" (the GGUF file itself), None
    note: str | None = None
    may_fail: bool = False  # a GPTQ/AWQ folder: a failed load or forward becomes the row's note


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


def build_table(artifacts: Artifacts, conversations: list, template, data_cfg) -> list[TableRow]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifacts.out_dir)
    rows = []
    for c in _candidates(artifacts):
        rows.append(_measure(c, artifacts, tokenizer, (template, conversations, data_cfg)))
        gc.collect()
    return rows


def _candidates(artifacts: Artifacts) -> list[_Candidate]:
    from transformers import AutoModelForCausalLM, GgufConfig

    out_dir = artifacts.out_dir
    found = [_Candidate(out_dir, lambda: AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto"), "transformers")]
    if artifacts.quantized:
        folder = out_dir / artifacts.quantized["method"]
        found.append(_Candidate(folder, lambda: AutoModelForCausalLM.from_pretrained(folder), "transformers"))
    for method in artifacts.weight_quant:
        folder = out_dir / method
        refusal = weight_quant_refusal(method)
        load = None if refusal else (lambda f=folder: AutoModelForCausalLM.from_pretrained(f, dtype="auto",
                                                                                           device_map="cpu"))
        found.append(_Candidate(folder, load, "transformers", refusal, may_fail=True))
    speed = "llama.cpp" if artifacts.llama_cpp is not None else None
    for path in artifacts.gguf.values():
        found.append(_Candidate(path, lambda p=path: AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)), speed,
            None if speed else NO_LLAMA_CPP))
    return found


NO_LLAMA_CPP = "tokens/s needs the llama.cpp runtime (make test-llamacpp builds it)"


def weight_quant_refusal(method: str) -> str | None:
    """Why a GPTQ/AWQ folder cannot be loaded with transformers in this process (None: it can be tried)."""
    import importlib.util

    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        return (f"not loaded: transformers needs {' and '.join(missing)} to load a {method.upper()} folder "
                "(pip install 'tunelab[gptq]')")
    if method == "awq":  # the table measures every row on the CPU, even on a machine with a GPU
        return "not loaded: the table measures on the CPU and gptqmodel 7.6 has no CPU AWQ kernel"
    return None


def _measure(c: _Candidate, artifacts: Artifacts, tokenizer, scoring: tuple) -> TableRow:
    """One row: load, perplexity, tokens/s. A GPTQ/AWQ folder that fails to load or run gets its reason instead."""
    template, conversations, data_cfg = scoring
    row = TableRow(_name(c.path, artifacts.out_dir), _size(c.path), None, None, note=c.note)
    if c.load is None:
        return row
    try:
        model = c.load()
        if conversations:
            row.perplexity = _perplexity(model, tokenizer, template, conversations, data_cfg)
        if c.speed == "transformers":
            row.tokens_per_s, row.runtime = _tokens_per_s(model, tokenizer), c.speed
        del model
    except Exception as e:  # gptqmodel's kernels may refuse this machine: the row says why
        if not c.may_fail:
            raise
        row.perplexity, row.tokens_per_s, row.runtime = None, None, None
        row.note = f"not loaded here: {_reason(e)}"
        return row
    if c.speed == "llama.cpp":
        _llama_cpp_speed(row, c.path, artifacts.llama_cpp, tokenizer)
    return row


def _llama_cpp_speed(row: TableRow, gguf: Path, runtime: Path, tokenizer) -> None:
    from tunelab.export.llamacpp_speed import LlamaCppSpeedError, measure_tokens_per_s

    try:
        row.tokens_per_s = measure_tokens_per_s(runtime, gguf, speed_prompt_ids(tokenizer), torch.get_num_threads())
        row.runtime = "llama.cpp"
    except LlamaCppSpeedError as e:
        row.note = f"llama.cpp speed not measured: {e}"


def write_table(out_dir: Path, rows: list[TableRow], data_label: str, notes: list[str] = ()) -> str:
    """`notes`: lines under the table (e.g. whether the k-quants used an importance matrix)."""
    text = "\n".join([format_table(rows, data_label), *notes])
    (out_dir / "export_table.md").write_text(text + "\n", encoding="utf-8")
    (out_dir / "export_table.json").write_text(json.dumps({"data": data_label, "rows": [asdict(r) for r in rows],
                                                           "notes": list(notes)}, indent=2), encoding="utf-8")
    return text


def format_table(rows: list[TableRow], data_label: str) -> str:
    lines = ["| artifact | size | perplexity | tokens/s | note |", "|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r.perplexity:.3f}" if r.perplexity is not None else "-"
        speed = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}" + (f" ({r.runtime})" if r.runtime else "")
        lines.append(f"| {r.artifact} | {r.size_bytes / 1e6:.1f} MB | {ppl} | {speed} | {r.note or ''} |")
    return "\n".join(lines) + f"\n\nperplexity (in transformers) on: {data_label}"


def _perplexity(model, tokenizer, template, conversations, data_cfg) -> float:
    from tunelab.data.encode import EncodeSettings
    from tunelab.evaluation.loss import compute_loss

    settings = EncodeSettings(data_cfg.cutoff_len, data_cfg.train_on) if data_cfg is not None else None
    return compute_loss(model, tokenizer, template, conversations, settings).perplexity


def _tokens_per_s(model, tokenizer, max_new_tokens: int = 32) -> float:
    """Greedy decoding speed of one chat answer, forced to `max_new_tokens` (after a 2-token warm-up)."""
    ids = torch.tensor([speed_prompt_ids(tokenizer)])
    kwargs = {"do_sample": False, "min_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, **kwargs | {"min_new_tokens": 2})
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **kwargs)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def _reason(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def speed_prompt_ids(tokenizer) -> list[int]:
    """SPEED_PROMPT's token ids, the same in every runtime (the exported tokenizer's chat template)."""
    return list(tokenizer.apply_chat_template(SPEED_PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"])


def _name(path: Path, out_dir: Path) -> str:
    return "merged (safetensors)" if path == out_dir else str(path.relative_to(out_dir))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    files = path.iterdir()
    return sum(p.stat().st_size for p in files if p.is_file() and p.suffix in (".safetensors", ".bin"))
