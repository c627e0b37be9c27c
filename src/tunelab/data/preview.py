"""Show prepared data to a human: examples with the trained tokens marked, and the prepare summary.

Trained spans are green in a terminal and wrapped in [[...]] when the output is piped, so a user can check, token
for token, that replies and their end-of-turn markers are learned and prompts are not.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

IGNORE = -100
GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


def segments(input_ids: list[int], labels: list[int]) -> Iterable[tuple[bool, list[int]]]:
    """Runs of tokens that are all trained or all untrained, in order."""
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            yield labels[start] != IGNORE, list(input_ids[start:i])
            start = i


def format_example(example: dict, tokenizer, color: bool = False) -> str:
    labels = example.get("labels") or example["input_ids"]
    out = []
    for trained, ids in segments(list(example["input_ids"]), list(labels)):
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if trained:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        out.append(text)
    return "".join(out)


def preview(dataset, tokenizer, n: int = 3, color: bool | None = None) -> str:
    """The first n examples of a prepared split, trained spans marked."""
    if color is None:
        color = sys.stdout.isatty()
    legend = f"{GREEN}green{RESET}" if color else "[[brackets]]"
    blocks = []
    for i in range(min(n, len(dataset))):
        ex = dataset[i]
        trained = sum(1 for x in ex["labels"] if x != IGNORE)
        head = f"--- example {i}: {len(ex['input_ids'])} tokens, {trained} trained ({legend}) ---"
        blocks.append(f"{head}\n{format_example(ex, tokenizer, color)}")
    return "\n\n".join(blocks)


def summary(stats: dict) -> str:
    """The prepare summary as an aligned text table (readable in a terminal and in a log file)."""
    stops = ", ".join(stats["template"]["stop_strings"]) or "eos"
    rows: list[tuple[str, str]] = [("template", f"{stats['template']['name']} (ends turns with {stops})")]
    for d in stats.get("datasets", []):
        rows.append((f"dataset {d['name']}", f"{d['records_read']} read, {d['rejected']} rejected, {d['kept']} kept"))
    rows.append(("records read", str(stats["records_read"])))
    rejected = stats["rejected"]
    by_reason = ", ".join(f"{k}: {v}" for k, v in rejected["by_reason"].items())
    rows.append(("rejected", f"{rejected['total']}" + (f" ({by_reason})" if by_reason else "")))
    for rule, n in stats.get("cleaning", {}).items():
        rows.append((f"cleaning {rule}", str(n)))
    split = f"train {stats['train_examples']}, validation {stats['validation_examples']}"
    rows += [
        ("conversations", str(stats["conversations"])),
        ("examples", f"{stats['examples']} ({split})"),
        ("truncated", f"{stats['truncated']} (cutoff_len {stats['cutoff_len']})"),
        *([("documents split into chunks", str(stats["chunked_documents"]))] if stats.get("chunked_documents") else []),
        ("dropped (nothing to train)", str(stats["dropped_no_trainable"])),
        ("tokens", f"{stats['tokens']} ({stats['trained_tokens']} trained)"),
    ]
    if stats.get("turns_without_end"):
        rows.append(("replies without end-of-turn", str(stats["turns_without_end"])))
    length = stats.get("length") or {}
    if length:
        spread = f"{length['p50']:.0f} / {length['p90']:.0f} / {length['p99']:.0f} / {length['max']}"
        rows.append(("length p50/p90/p99/max", spread))
    rows += [("histogram", stats.get("histogram", "")), ("rejects file", stats.get("rejects_file", "")),
             ("cache", f"{'reused' if stats.get('cache_hit') else 'written'}: {stats['fingerprint']}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
