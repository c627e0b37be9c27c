"""Preference data for the alignment stages (DPO, ORPO, SimPO, KTO, reward models): records -> token ids, cached.

load (sources.py readers, preference_formats.py shapes) -> clean (clean.py) -> check -> render + tokenize + mask
with the SFT code (encode.py, train_on last_assistant) -> split -> cache (pipeline.py). A prompt is exactly the
tokens SFT puts before the reply's trained span, so it is token-identical for chosen and rejected, and
`prompt_input_ids + chosen_input_ids` is the SFT encoding of the same conversation up to the end of what SFT trains.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunelab.config.schema import DataConfig, DatasetSpec
from tunelab.data.clean import clean_conversations
from tunelab.data.encode import IGNORE, EncodeSettings, encode_batch, encode_conversation
from tunelab.data.formats import RecordError, make_substituter
from tunelab.data.pipeline import (
    PreparedData,
    Processed,
    cache_root,
    check_rejects,
    data_fingerprint,
    length_summary,
    load_datasets,
    load_prepared,
    reuse_prepared,
    save_prepared,
    split_examples,
)
from tunelab.data.preference_formats import (
    PreferenceExample,
    detect_preference_format,
    get_preference_format,
    preference_options,
)
from tunelab.data.preview import format_example
from tunelab.data.progress import Progress
from tunelab.data.sources import convert_records, resolve_source
from tunelab.data.templates import ChatTemplate
from tunelab.data.types import Conversation, Message, Reject
from tunelab.errors import DataError

__all__ = ["PreferenceExample", "PreferenceLoadResult", "encode_preference", "load_preference_examples",
           "prepare_preference_data", "preview_preference"]
CACHE_VERSION = 1  # bump when the preference encoding rules change
_NO_LIMIT = sys.maxsize  # SFT encoding without truncation: the preference rule below truncates pairs as a whole


@dataclass
class PreferenceLoadResult:
    examples: list[PreferenceExample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    records_read: int = 0
    name: str = ""  # dataset name or path, for the summary


# ------------------------------------------------------------------------------------------------------- loading
def load_preference_examples(spec: DatasetSpec, dataset_dir: str | Path | None = None,
                             variables: dict[str, str] | None = None) -> PreferenceLoadResult:
    """Read one configured dataset into PreferenceExamples; bad records are collected as rejects, not raised."""
    source = resolve_source(spec, dataset_dir, preference=True)
    result = PreferenceLoadResult(name=source.name)

    def choose(first: dict):
        fmt = detect_preference_format(first, source.options) if source.format == "auto" else source.format
        options, convert = preference_options(fmt, source.options, first), get_preference_format(fmt)
        return lambda record: convert(record, options)

    try:
        for where, example in convert_records(source, choose):
            result.records_read += 1
            if isinstance(example, Reject):
                result.rejects.append(example)
                continue
            example.source = example.prompt.source = where
            result.examples.append(example)
    except KeyError as e:  # a format the converter does not know (e.g. format: text)
        raise DataError(f"{source.name}: {e.args[0]}") from None
    if source.max_samples is not None:
        result.examples = result.examples[:source.max_samples]
    substitute = make_substituter(variables or {})
    if substitute is not None:
        for ex in result.examples:
            for m in (*ex.prompt.messages, *ex.replies()):
                m.content = substitute(m.content)
    return result


def check_example(ex: PreferenceExample) -> RecordError | None:
    """What makes a (cleaned) example useless: an empty reply, or chosen == rejected (the pair teaches nothing)."""
    for name, m in (("chosen" if ex.paired else "completion", ex.chosen), ("rejected", ex.rejected)):
        if m is not None and not m.content.strip() and not m.tool_calls:
            return RecordError(name, "is empty (after cleaning)", "empty_output")
    if ex.paired and _reply_key(ex.chosen) == _reply_key(ex.rejected):
        return RecordError("rejected", "is the same as chosen: the pair teaches nothing", "same_reply")
    return None


def _reply_key(m: Message) -> tuple:
    return m.content.strip(), repr(m.tool_calls or [])


def _clean(examples: list[PreferenceExample], cfg: DataConfig, seen: set) -> tuple[list[PreferenceExample], dict]:
    """clean.py's rules on every message of the example (prompt and replies, rewritten in place); duplicates are
    whole examples (same prompt and replies), across datasets."""
    wrapped = {}
    for ex in examples:
        tools = ex.prompt.tools
        if ex.label is not None:  # in the duplicate key only: one completion labelled both ways is two examples
            tools = [*(tools or []), {"kto_label": ex.label}]
        conv = Conversation([*ex.prompt.messages, *ex.replies()], tools=tools, source=ex.source)
        wrapped[id(conv)] = (conv, ex)
    kept, report = clean_conversations([conv for conv, _ in wrapped.values()], cfg.clean, seen)
    return [wrapped[id(conv)][1] for conv in kept], report


def load_all_preference(cfg: DataConfig, paired: bool,
                        progress: Progress | None = None) -> tuple[list[PreferenceExample], list[Reject], dict]:
    """Load, clean and check every configured dataset. `paired=False` (KTO) splits each pair into a desirable and
    an undesirable example, as TRL does; `paired=True` rejects unpaired records."""
    def keep(result, seen: set):
        kept, cleaned = _clean(result.examples, cfg, seen)
        usable = []
        for ex in kept:
            problem = check_example(ex) or _shape_problem(ex, paired)
            if problem is not None:
                result.rejects.append(Reject(ex.source, problem.field, problem.reason, problem.rule))
            else:
                usable += [ex] if paired or not ex.paired else unpair(ex)
        return usable, cleaned

    examples, rejects, report = load_datasets(cfg, load_preference_examples, keep, progress)
    if cfg.system:
        for ex in examples:
            if not (ex.prompt.messages and ex.prompt.messages[0].role == "system"):
                ex.prompt.messages.insert(0, Message("system", cfg.system))
    return examples, rejects, report


def _shape_problem(ex: PreferenceExample, paired: bool) -> RecordError | None:
    if paired and not ex.paired:
        return RecordError("", "an unpaired (KTO) record, but this stage needs chosen and rejected replies",
                           "unpaired")
    return None


def unpair(ex: PreferenceExample) -> list[PreferenceExample]:
    """A pair -> (prompt, chosen, desirable) and (prompt, rejected, undesirable), sharing the prompt."""
    return [PreferenceExample(ex.prompt, ex.chosen, None, True, ex.source),
            PreferenceExample(ex.prompt, ex.rejected, None, False, ex.source)]


# ------------------------------------------------------------------------------------------------------ encoding
def conversation_for(ex: PreferenceExample, reply: Message) -> Conversation:
    """The SFT conversation of one side: the prompt and that reply, with no per-message train flags (only the reply
    is trained: train_on last_assistant)."""
    messages = [replace(m, train=None) for m in (*ex.prompt.messages, reply)]
    return Conversation(messages, tools=ex.prompt.tools, source=ex.source)


@dataclass
class PairStats:
    examples: int = 0
    truncated: int = 0
    shifted_prompts: int = 0  # a token straddled the prompt/reply boundary (see assemble)
    dropped: int = 0
    tokens: int = 0  # per example: prompt + the longer completion
    trained_tokens: int = 0  # completion tokens, all sides
    lengths: list[int] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"examples": self.examples, "truncated": self.truncated, "shifted_prompts": self.shifted_prompts,
                "dropped_no_trainable": self.dropped, "tokens": self.tokens, "trained_tokens": self.trained_tokens}


def _trained_end(labels: list[int]) -> tuple[int, int]:
    """(first, last + 1) of the trained tokens (one contiguous span: train_on last_assistant)."""
    first = next(i for i, x in enumerate(labels) if x != IGNORE)
    last = next(i for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE)
    return first, last + 1


def assemble(sides: list[dict | None], label: bool | None, cutoff_len: int, bos_id: int | None,
             stats: PairStats | None = None) -> dict | None:
    """SFT encodings of the chosen (and rejected) conversation -> the contract's columns.

    The prompt is the tokens both encodings share before the first trained token: normally exactly the tokens
    before the reply's trained span; when a token straddles that boundary and differs between the two replies,
    the shared prefix ends before it and each completion starts with its own version (counted as
    shifted_prompts). A completion is the trained span, end-of-turn included (tokens the template adds after it,
    such as a newline, are not part of what SFT trains and are dropped).

    Truncation, when prompt + the longer completion exceeds cutoff_len: each completion keeps its first
    max(cutoff_len - prompt length, cutoff_len // 2) tokens (a shorter one is kept whole, so no reply is ever
    dropped), and the prompt keeps its end in the room left (plus its first token when that is bos), so the reply
    still follows the turn it answers. Both replies are cut at the same length; the prompt stays identical.
    """
    stats = stats if stats is not None else PairStats()
    if any(s is None for s in sides):
        stats.dropped += 1
        return None
    spans = [_trained_end(s["labels"]) for s in sides]
    ids = [s["input_ids"] for s in sides]
    shared = 0
    limit = min(first for first, _ in spans)
    while shared < limit and all(x[shared] == ids[0][shared] for x in ids):
        shared += 1
    stats.shifted_prompts += shared < spans[0][0] or any(first != spans[0][0] for first, _ in spans)
    prompt = ids[0][:shared]
    completions = [x[shared:end] for x, (_, end) in zip(ids, spans)]
    prompt, completions = _truncate(prompt, completions, cutoff_len, bos_id, stats)
    stats.examples += 1
    length = len(prompt) + max(len(c) for c in completions)
    stats.tokens += length
    stats.trained_tokens += sum(len(c) for c in completions)
    stats.lengths.append(length)
    if label is None:
        return {"prompt_input_ids": prompt, "chosen_input_ids": completions[0], "rejected_input_ids": completions[1]}
    return {"prompt_input_ids": prompt, "completion_input_ids": completions[0], "label": label}


def _truncate(prompt: list[int], completions: list[list[int]], cutoff_len: int, bos_id: int | None,
              stats: PairStats) -> tuple[list[int], list[list[int]]]:
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= cutoff_len:
        return prompt, completions
    stats.truncated += 1
    keep = min(longest, max(cutoff_len - len(prompt), cutoff_len // 2))
    room = cutoff_len - keep
    if room < len(prompt):
        head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] and room > 1 else []
        prompt = head + prompt[len(prompt) - (room - len(head)):] if room > len(head) else head
    return prompt, [c[:keep] for c in completions]


def _bos_id(tokenizer) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def encode_preference(example: PreferenceExample, template: ChatTemplate, tokenizer, cutoff_len: int) -> dict | None:
    """One example -> paired {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"} or unpaired
    {"prompt_input_ids", "completion_input_ids", "label"}; None when a side has nothing to train. Raises
    EncodeError (or the template's error) when a side cannot be rendered; see assemble for the prompt and the
    truncation rule."""
    sides = [encode_conversation(conversation_for(example, m), template, tokenizer, _NO_LIMIT, "last_assistant")
             for m in example.replies()]
    return assemble(sides, None if example.paired else example.label, cutoff_len, _bos_id(tokenizer))


def encode_examples(examples: list[PreferenceExample], template: ChatTemplate, tokenizer, cfg: DataConfig,
                    progress=None) -> tuple[list[dict], PairStats]:
    """Encode many examples with encode.py's batch encoder (rendering and tokenizing overlap on several cores)."""
    convs = [conversation_for(ex, m) for ex in examples for m in ex.replies()]
    encoded, enc = encode_batch(convs, template, tokenizer, EncodeSettings(_NO_LIMIT, "last_assistant"),
                                progress=progress, threads=cfg.num_proc)
    stats = PairStats(rejects=list({(r.source, r.reason): r for r in enc.rejects}.values()))
    out, pos = [], 0
    for ex in examples:
        n = len(ex.replies())
        sides, pos = encoded[pos:pos + n], pos + n
        if any(s is None for s in sides) and any(r.source == ex.source for r in stats.rejects):
            continue  # the template refused it: already a reject
        row = assemble(sides, None if ex.paired else ex.label, cfg.cutoff_len, _bos_id(tokenizer), stats)
        if row is not None:
            out.append(row)
    return out, stats


# ------------------------------------------------------------------------------------------------------- prepare
def prepare_preference_data(cfg: DataConfig, tokenizer, template: ChatTemplate, *, paired: bool,
                            progress: bool = False, force: bool = False) -> PreparedData:
    """Load, clean, check, encode and split `cfg.datasets` as preference data (paired for DPO/ORPO/SimPO/rm,
    unpaired for KTO); reuse the on-disk result when nothing changed. Rejects, max_reject_ratio, strict, val_size
    and seed behave as in SFT's prepare_data."""
    if not cfg.datasets:
        raise DataError("data.datasets is empty: add at least one preference dataset (a path, or a name from "
                        "dataset_dir)")
    mode = f"{'paired' if paired else 'unpaired'}-v{CACHE_VERSION}"
    fingerprint = data_fingerprint(cfg, tokenizer, template, preference=mode)
    target = cache_root(cfg) / fingerprint
    rejects_file = target.parent / "rejects" / f"{fingerprint}.jsonl"
    if not force and (target / "stats.json").is_file():
        return reuse_prepared(target, template, cfg, rejects_file)
    started = time.perf_counter()
    with Progress(enabled=progress) as bar:
        examples, rejects, report = load_all_preference(cfg, paired, bar)
        check_rejects(rejects, report["records_read"], cfg, rejects_file)  # fail before the long part
        sides = sum(len(ex.replies()) for ex in examples)
        rows, enc = encode_examples(examples, template, tokenizer, cfg, bar.counter("encode", sides))
    rejects += enc.rejects
    check_rejects(rejects, report["records_read"], cfg, rejects_file)
    if not rows:
        names = ", ".join(d["name"] for d in report["datasets"])
        raise DataError(f"no usable preference examples in {names} ({len(examples)} after cleaning)")
    train, validation = split_examples(rows, cfg.val_size, cfg.seed)
    stats = {
        "fingerprint": fingerprint, "template": template.describe(), "preference": "paired" if paired else "unpaired",
        **report, "rejected": {"total": len(rejects), "by_reason": dict(Counter(r.rule for r in rejects))},
        "conversations": len(examples),
        **enc.as_dict(), "cutoff_len": cfg.cutoff_len, "train_examples": len(train),
        "validation_examples": len(validation), "length": length_summary(enc.lengths),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if not paired:
        stats["desirable"] = sum(bool(r["label"]) for r in rows)
    save_prepared(target, Processed(train, validation, stats, rejects, enc.lengths, cfg.cutoff_len), template)
    return load_prepared(target, template, cache_hit=False)


def preview_preference(dataset, tokenizer, n: int = 3, color: bool | None = None) -> str:
    """The first n prepared examples as prompt + each completion, the completion marked as preview.py marks
    trained tokens (green, or [[...]] when piped)."""
    if color is None:
        color = sys.stdout.isatty()
    blocks = []
    for i in range(min(n, len(dataset))):
        row = dataset[i]
        prompt = list(row["prompt_input_ids"])
        sides = [k for k in ("chosen", "rejected", "completion") if f"{k}_input_ids" in row]
        label = f" (label {row['label']})" if "label" in row else ""
        lines = [f"--- example {i}: prompt {len(prompt)} tokens{label} ---"]
        for side in sides:
            ids = list(row[f"{side}_input_ids"])
            example = {"input_ids": prompt + ids, "labels": [IGNORE] * len(prompt) + ids}
            lines.append(f"[{side}, {len(ids)} tokens] {format_example(example, tokenizer, color)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
