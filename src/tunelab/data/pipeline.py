"""prepare_data: the whole data stage in one call, cached on disk.

load (sources.py) -> validate (rejects) -> clean (clean.py) -> render + tokenize + mask (encode.py) -> split ->
save under a fingerprint of (file contents, data config, tokenizer, template), so the next run, or the other
ranks of a distributed run, reuse the result instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from tunelab.config.load import from_environment
from tunelab.config.schema import DataConfig
from tunelab.data.clean import clean_conversations
from tunelab.data.encode import EncodeSettings, encode_batch, flatten_examples
from tunelab.data.progress import Progress
from tunelab.data.sources import load_conversations, source_files
from tunelab.data.templates import ChatTemplate
from tunelab.data.types import Conversation, Message, Reject
from tunelab.errors import DataError
from tunelab.files import staged_folder

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when the processed format or the encoding rules change
_NOT_OUTPUT = {"cache_dir", "num_proc", "packing", "strict", "max_reject_ratio"}  # settings that change no token


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    validation: Any | None
    stats: dict
    fingerprint: str
    cache_dir: Path
    template: ChatTemplate | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)  # set by data.build.build_sft_data (carries the template)

    @property
    def template_jinja(self) -> str:
        return (self.cache_dir / "chat_template.jinja").read_text(encoding="utf-8")


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $TUNELAB_DATA_CACHE, else ~/.cache/tunelab/data (config/load.py's precedence rule)."""
    root = from_environment(cfg.cache_dir, "TUNELAB_DATA_CACHE") or Path.home() / ".cache" / "tunelab" / "data"
    return Path(root).expanduser()


# ---------------------------------------------------------------------------------------------------- fingerprint
def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        raw = backend.to_str()
    else:
        raw = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, sort_keys=True)
    return hashlib.sha256((raw + special + type(tokenizer).__name__).encode()).hexdigest()


def _file_digest(path: Path) -> list:
    """Size, mtime and a hash of the first and last MiB: content changes are caught without reading GBs."""
    stat = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if stat.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, h.hexdigest()]


def data_fingerprint(cfg: DataConfig, tokenizer, template: ChatTemplate, preference: str | None = None) -> str:
    """What the processed data depends on; `preference` ("paired"/"unpaired", preference.py) keys an alignment
    stage's data apart from the SFT data of the same config."""
    files = [_file_digest(p) for spec in cfg.datasets
             for p in source_files(spec, cfg.dataset_dir, preference is not None)]
    parts = {
        "version": CACHE_VERSION,
        "config": cfg.model_dump(mode="json", exclude=_NOT_OUTPUT),
        "files": files,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": [template.jinja, list(template.stop_strings), sorted(template.special_tokens.items())],
    }
    if preference is not None:
        parts["preference"] = preference
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


# -------------------------------------------------------------------------------------------------------- loading
def load_datasets(cfg: DataConfig, load: Callable, keep: Callable,
                  progress: Progress | None = None) -> tuple[list, list[Reject], dict]:
    """The loop both loaders (SFT conversations, preference examples) share: `load(spec, dataset_dir, variables)`
    each configured dataset (a result with .rejects, .records_read, .name), refuse any reject in strict mode,
    `keep(result, seen) -> (kept, cleaning counts)` (`seen`: duplicates are found across datasets too; keep may add
    rejects), and report records read, rejected and kept per dataset."""
    items: list = []
    rejects: list[Reject] = []
    report: dict[str, Any] = {"datasets": [], "records_read": 0, "cleaning": Counter()}
    seen: set = set()
    for spec in cfg.datasets:
        result = load(spec, cfg.dataset_dir, cfg.variables)
        if cfg.strict and result.rejects:
            raise DataError(f"strict mode: {result.rejects[0]}")
        kept, cleaned = keep(result, seen)
        report["cleaning"].update(cleaned)
        report["records_read"] += result.records_read
        report["datasets"].append({"name": result.name, "records_read": result.records_read,
                                   "rejected": len(result.rejects), "kept": len(kept)})
        items += kept
        rejects += result.rejects
        if progress is not None:
            progress.advance("load", result.records_read)
    report["cleaning"] = dict(report["cleaning"])
    return items, rejects, report


def load_all(cfg: DataConfig, progress: Progress | None = None) -> tuple[list[Conversation], list[Reject], dict]:
    """Load, validate and clean every configured dataset; duplicates are found across datasets too."""
    def keep(result, seen: set):
        return clean_conversations(result.conversations, cfg.clean, seen)

    conversations, rejects, report = load_datasets(cfg, load_conversations, keep, progress)
    if cfg.system:
        for conv in conversations:
            if conv.text is None and not (conv.messages and conv.messages[0].role == "system"):
                conv.messages.insert(0, Message("system", cfg.system))
    return conversations, rejects, report


def check_rejects(rejects: list[Reject], records_read: int, cfg: DataConfig, rejects_file: Path) -> None:
    """Fail loudly when too much is rejected (or anything, in strict mode); never a silently thin dataset."""
    if not rejects:
        return
    write_rejects(rejects, rejects_file)
    if cfg.strict:
        raise DataError(f"strict mode: {rejects[0]}")
    share = len(rejects) / max(records_read, 1)
    if share > cfg.max_reject_ratio:
        reasons = ", ".join(f"{rule}: {n}" for rule, n in Counter(r.rule for r in rejects).most_common())
        examples = "\n".join(f"  - {r}" for r in rejects[:5])
        raise DataError(
            f"{len(rejects)} of {records_read} records rejected ({share:.1%} > data.max_reject_ratio "
            f"{cfg.max_reject_ratio:.0%}); by reason: {reasons}\n{examples}\nall rejects with reasons: {rejects_file}"
        )


def write_rejects(rejects: list[Reject], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------------ splitting
def split_examples(examples: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not val_size:
        return examples, []
    n = len(examples)
    n_val = int(val_size) if val_size >= 1 else max(1, round(n * val_size))
    if n_val >= n:
        raise DataError(f"data.val_size={val_size} leaves no training examples (only {n} examples)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def to_dataset(examples: list[dict]):
    """Examples -> datasets.Dataset, built as Arrow arrays directly (5-10x faster than from_dict). The columns are
    the first example's keys: lists of token ids (input_ids, labels; preference data's prompt/chosen/rejected ids)
    or scalars (KTO's label)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    def column(key: str):
        if not isinstance(examples[0][key], list):
            return pa.array([e[key] for e in examples])
        lengths = np.fromiter((len(e[key]) for e in examples), dtype=np.int64, count=len(examples))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int64())
        flat = np.fromiter(chain.from_iterable(e[key] for e in examples), dtype=np.int32, count=int(lengths.sum()))
        return pa.LargeListArray.from_arrays(offsets, pa.array(flat)).cast(pa.list_(pa.int32()))

    table = pa.table({key: column(key) for key in examples[0]})
    return Dataset(InMemoryTable(table))


def length_summary(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    import numpy as np

    arr = np.asarray(lengths)
    return {"min": int(arr.min()), "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def write_histogram(lengths: list[int], cutoff_len: int, path: Path) -> Path:
    """Token-length histogram PNG (matplotlib's Agg canvas directly: no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4C72B0")
    ax.axvline(cutoff_len, color="#C44E52", linestyle="--", label=f"cutoff_len {cutoff_len}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"{len(lengths)} examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------------- prepare
def prepare_data(cfg: DataConfig, tokenizer, template: ChatTemplate, *, progress: bool = False,
                 force: bool = False) -> PreparedData:
    """Load, validate, clean, encode and split `cfg.datasets`; reuse the on-disk result when nothing changed."""
    if not cfg.datasets:
        raise DataError("data.datasets is empty: add at least one dataset (a path, or a name from dataset_dir)")
    fingerprint = data_fingerprint(cfg, tokenizer, template)
    target = cache_root(cfg) / fingerprint
    rejects_file = target.parent / "rejects" / f"{fingerprint}.jsonl"  # survives a failed run, unlike target
    if not force and (target / "stats.json").is_file():
        return reuse_prepared(target, template, cfg, rejects_file)
    started = time.perf_counter()
    with Progress(enabled=progress) as bar:
        conversations, rejects, report = load_all(cfg, bar)
        check_rejects(rejects, report["records_read"], cfg, rejects_file)  # fail before the long part
        encoded, enc = encode_batch(conversations, template, tokenizer, EncodeSettings.of(cfg),
                                    progress=bar.counter("encode", len(conversations)), threads=cfg.num_proc)
    rejects += enc.rejects
    check_rejects(rejects, report["records_read"], cfg, rejects_file)
    examples = flatten_examples(encoded)
    if not examples:
        names = ", ".join(d["name"] for d in report["datasets"])
        raise DataError(f"no trainable examples in {names}: {len(conversations)} conversations after cleaning, "
                        f"{enc.dropped_no_trainable} with no trainable token left within cutoff_len={cfg.cutoff_len}")
    train, validation = split_examples(examples, cfg.val_size, cfg.seed)
    stats = {
        "fingerprint": fingerprint, "template": template.describe(), **report,
        "rejected": {"total": len(rejects), "by_reason": dict(Counter(r.rule for r in rejects))},
        "conversations": len(conversations), **enc.as_dict(), "cutoff_len": cfg.cutoff_len,
        "train_examples": len(train), "validation_examples": len(validation), "length": length_summary(enc.lengths),
        "seconds": round(time.perf_counter() - started, 2),
    }
    save_prepared(target, Processed(train, validation, stats, rejects, enc.lengths, cfg.cutoff_len), template)
    return load_prepared(target, template, cache_hit=False)


@dataclass
class Processed:
    """What one prepare writes to its cache folder."""

    train: list[dict]
    validation: list[dict]
    stats: dict
    rejects: list[Reject]
    lengths: list[int]  # tokens per example, for the histogram
    cutoff_len: int


def reuse_prepared(target: Path, template: ChatTemplate, cfg: DataConfig, rejects_file: Path) -> PreparedData:
    """The cached result, after the reject checks (strict and max_reject_ratio may differ from the run that wrote it)."""
    prepared = load_prepared(target, template)
    lines = Path(prepared.stats["rejects_file"]).read_text(encoding="utf-8").splitlines()
    check_rejects([Reject(**json.loads(line)) for line in lines], prepared.stats["records_read"], cfg, rejects_file)
    return prepared


def save_prepared(target: Path, data: Processed, template: ChatTemplate) -> None:
    """Write to a temporary folder and rename it into place, so a crash never leaves a half cache behind."""
    with staged_folder(target) as tmp:
        with _quiet_datasets():
            to_dataset(data.train).save_to_disk(str(tmp / "train"))
            if data.validation:
                to_dataset(data.validation).save_to_disk(str(tmp / "validation"))
        (tmp / "chat_template.jinja").write_text(template.jinja, encoding="utf-8")
        write_rejects(data.rejects, tmp / "rejects.jsonl")
        write_histogram(data.lengths, data.cutoff_len, tmp / "lengths.png")
        (tmp / "stats.json").write_text(json.dumps(data.stats, indent=2, ensure_ascii=False), encoding="utf-8")


@contextmanager
def _quiet_datasets():
    """datasets prints a bar per saved split; ours already reports progress. Restore the user's setting after."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def load_prepared(target: Path, template: ChatTemplate | None = None, cache_hit: bool = True) -> PreparedData:
    from datasets import load_from_disk

    stats = json.loads((target / "stats.json").read_text(encoding="utf-8"))
    stats.update(cache_hit=cache_hit, histogram=str(target / "lengths.png"),
                 rejects_file=str(target / "rejects.jsonl"))
    validation = load_from_disk(str(target / "validation")) if (target / "validation").is_dir() else None
    return PreparedData(load_from_disk(str(target / "train")), validation, stats, stats["fingerprint"], target,
                        template)
