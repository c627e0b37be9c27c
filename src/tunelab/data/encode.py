"""Conversation -> input_ids + labels: render with the chat template, tokenize, and train only the right tokens.

Works for any Jinja template, the tokenizer's own included: the conversation is rendered once, each assistant
reply is located in the rendered text (after the template's assistant header, which is worked out by probing the
template), its span runs through the template's end-of-turn string, and tokens whose characters overlap a
trained span keep their id as label; every other label is -100. Labels never depend on the pad id, so pad == eos
(SmolLM2) cannot mask the end-of-turn token the model must learn to emit.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

from tunelab.config.schema import DataConfig
from tunelab.data.templates import ChatTemplate
from tunelab.data.types import Conversation, Message, Reject

IGNORE = -100
TrainOn = Literal["all_assistant", "last_assistant", "everything"]
CHUNK = 1024  # conversations per tokenizer call: large enough for batch speed, small enough to overlap work
TOKENIZER_THREADS = 2  # tokenizer calls in flight by default; Rust releases the GIL, so they use other cores


class EncodeError(ValueError):
    """The rendered text does not let us find a message (the template rewrote or dropped it)."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans that carry loss
    append_eos: bool = False  # the final reply has no end-of-turn string in the template: train an eos after it
    prepend_bos: bool = False  # raw text (no template) starts with bos where the tokenizer uses one
    missing_ends: int = 0  # trained replies before the last one with no end-of-turn string found
    document: bool = False  # plain text (pretraining-style): may be split into cutoff_len chunks


@dataclass(frozen=True)
class EncodeSettings:
    """What an example may hold: the data section's cutoff_len, train_on and long_text in one value."""

    cutoff_len: int  # longest example in tokens
    train_on: TrainOn = "all_assistant"  # which replies carry loss
    chunk_documents: bool = False  # a plain-text document longer than cutoff_len is split, not truncated

    @classmethod
    def of(cls, cfg: DataConfig) -> EncodeSettings:
        """The settings training encodes with (data.cutoff_len, data.train_on, data.long_text)."""
        return cls(cfg.cutoff_len, cfg.train_on, cfg.long_text == "chunk")


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    chunked: int = 0  # plain-text documents split into several examples
    dropped_no_trainable: int = 0
    turns_without_end: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"examples": self.examples, "truncated": self.truncated, "chunked_documents": self.chunked,
                "dropped_no_trainable": self.dropped_no_trainable, "turns_without_end": self.turns_without_end,
                "tokens": self.tokens, "trained_tokens": self.trained_tokens}


# --------------------------------------------------------------------------------------------------- locating turns
def _reply_keys(m: Message) -> list[str]:
    """What of an assistant message must appear in the rendering: its text, or (for templates that move or drop
    reasoning, like Qwen3 for earlier turns) the part after </think>."""
    keys = [m.content.strip()]
    if "</think>" in m.content:
        keys.append(m.content.split("</think>")[-1].strip())
    return [k for k in keys if k] or [""]


def _first_header(text: str, cursor: int, headers: tuple[str, str]) -> tuple[int, int]:
    """(start, end) of the first assistant header after cursor; the generation prompt wins a tie."""
    best = (-1, -1)
    for h in headers:
        if h:
            j = text.find(h, cursor)
            if j >= 0 and (best[0] < 0 or j < best[0]):
                best = (j, j + len(h))
    return best


def _reply_start(text: str, cursor: int, pos: int, headers: tuple[str, str]) -> int:
    """Where the model starts generating: right after the generation prompt if it precedes the reply (so what the
    template adds after it, e.g. an empty <think> block, is learned), else after the history header."""
    for h in headers:
        if h:
            j = text.rfind(h, cursor, pos)
            if j >= 0:
                return j + len(h)
    return pos


def _turn_end(text: str, end: int, limit: int, stops: tuple[str, ...]) -> int | None:
    """End of the first end-of-turn string after the reply (tool-call markup in between belongs to the reply)."""
    best = None
    for s in stops:
        j = text.find(s, end, limit)
        if j >= 0 and (best is None or j < best[0]):
            best = (j, j + len(s))
    return best[1] if best else None


def locate_turns(text: str, messages: list[Message], template: ChatTemplate) -> list[tuple[int, int, bool] | None]:
    """Per message: the character span that would carry loss (assistant: reply + end of turn; others: content),
    and whether an end-of-turn string closes it."""
    headers = template.headers
    spans: list[tuple[int, int, bool] | None] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m.role != "assistant":
            key = m.content.strip()
            pos = text.find(key, cursor) if key else -1
            if pos < 0 or m.role == "system":  # templates move system text around; it never anchors the search
                spans.append(None)
                continue
            spans.append((pos, pos + len(key), True))
            cursor = pos + len(key)
            continue
        head, head_end = _first_header(text, cursor, headers)
        after = head_end if head >= 0 else cursor  # the header's own text ("assistant", "<|start_header_id|>")
        for key in _reply_keys(m):                 # may contain the reply: search where the header ends
            pos = text.find(key, after) if key else after
            if pos >= 0:
                break
        if pos < 0:
            raise EncodeError(f"assistant message {i} does not appear in the text the template rendered")
        start = _reply_start(text, cursor, pos, headers) if key else head_end
        end = pos + len(key)
        following = next((n.content.strip() for n in messages[i + 1:] if n.content.strip() and n.role != "system"), "")
        limit = text.find(following, end) if following else -1
        stop = _turn_end(text, end, limit if limit >= 0 else len(text), template.stop_strings)
        spans.append((start, stop if stop is not None else end, stop is not None))
        _check_tool_calls(text[start:spans[-1][1]], m, i)
        cursor = spans[-1][1]
    return spans


def _check_tool_calls(reply: str, m: Message, i: int) -> None:
    """Some templates render tool calls only in certain cases (DeepSeek-R1: content must be None); a dropped call
    would silently train the model to answer without calling."""
    for call in m.tool_calls or []:
        name = call.get("function", call).get("name", "")
        if name and name not in reply:
            raise EncodeError(f"assistant message {i}: the template did not render its tool call {name!r}")


def render_conversation(conv: Conversation, template: ChatTemplate, train_on: TrainOn = "all_assistant") -> Rendered:
    """Render a conversation and pick the character spans that carry loss."""
    if conv.text is not None:
        return Rendered(conv.text, [(0, len(conv.text))], append_eos=True, prepend_bos=True, document=True)
    if not template.renders_tool_calls and any(m.tool_calls for m in conv.messages):
        which = "the tokenizer's own template" if template.name == "auto" else f"template {template.name!r}"
        raise EncodeError(f"{which} does not render tool calls; set data.template to one that does (qwen, qwen3)")
    text = template.render(conv.to_template_messages(), tools=conv.tools)
    if train_on == "everything":
        return Rendered(text, [(0, len(text))], append_eos=not _ends_with_stop(text, template))
    located = locate_turns(text, conv.messages, template)
    replies = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    chosen = set(replies if train_on == "all_assistant" else replies[-1:])
    rendered = Rendered(text, [])
    for i, (m, span) in enumerate(zip(conv.messages, located)):
        train = m.train if m.train is not None else i in chosen
        if not train or span is None:
            continue
        rendered.spans.append(span[:2])
        if m.role == "assistant" and not span[2]:
            if i == replies[-1] and not text[span[1]:].strip():
                rendered.append_eos = True
            else:
                rendered.missing_ends += 1
    return rendered


def _ends_with_stop(text: str, template: ChatTemplate) -> bool:
    tail = text.rstrip()
    return any(tail.endswith(s) for s in template.stop_strings)


# ----------------------------------------------------------------------------------------------------- tokenizing
def _backend(tokenizer):
    """The Rust tokenizer (offsets, batch encoding without the GIL), or None for slow tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and (backend.truncation or backend.padding):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())  # a private copy: the caller's settings stay untouched
        backend.no_truncation()
        backend.no_padding()
    return backend


def _token_at(enc, lo: int, hi: int, step: int) -> int | None:
    """Index of the token covering the first character from lo towards hi (step +1/-1) that belongs to a token;
    characters such as trimmed spaces belong to none."""
    p = lo
    while (p < hi) if step > 0 else (p > hi):
        t = enc.char_to_token(p)
        if t is not None:
            return t
        p += step
    return None


def _labels_from_offsets(enc, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    ids = enc.ids
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        first, last = _token_at(enc, a, b, 1), _token_at(enc, b - 1, a - 1, -1)
        if first is not None and last is not None and last >= first:
            labels[first:last + 1] = ids[first:last + 1]
    return ids, labels


def _labels_by_pieces(tokenizer, rendered: Rendered) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: tokenize the text piece by piece at span boundaries."""
    ids: list[int] = []
    labels: list[int] = []
    cuts = sorted({0, len(rendered.text), *(p for span in rendered.spans for p in span)})
    for a, b in pairwise(cuts):
        piece = tokenizer.encode(rendered.text[a:b], add_special_tokens=False)
        trained = any(s <= a and b <= e for s, e in rendered.spans)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def _finish(ids: list[int], labels: list[int], rendered: Rendered, special: tuple[int | None, int | None],
            settings: EncodeSettings, stats: EncodeStats) -> dict | None:
    bos_id, eos_id = special
    cutoff_len = settings.cutoff_len
    if rendered.prepend_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids, labels = [bos_id] + ids, [IGNORE] + labels
    if rendered.append_eos and eos_id is not None and (not ids or ids[-1] != eos_id):
        ids, labels = ids + [eos_id], labels + [eos_id]
    stats.turns_without_end += rendered.missing_ends
    if len(ids) > cutoff_len and settings.chunk_documents and rendered.document:
        return _chunks(ids, labels, cutoff_len, stats)
    if len(ids) > cutoff_len:
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        stats.truncated += 1
    return _count(ids, labels, stats)


def _chunks(ids: list[int], labels: list[int], cutoff_len: int, stats: EncodeStats) -> dict | None:
    """A long plain-text document as consecutive cutoff_len-token examples: {"chunks": [example, ...]}. The last
    chunk is dropped only when it is a single token (position 0 of an example predicts nothing)."""
    stats.chunked += 1
    pieces = [(ids[i:i + cutoff_len], labels[i:i + cutoff_len]) for i in range(0, len(ids), cutoff_len)]
    examples = [e for a, b in pieces if len(a) > 1 and (e := _count(a, b, stats)) is not None]
    return {"chunks": examples} if examples else None


def _count(ids: list[int], labels: list[int], stats: EncodeStats) -> dict | None:
    trained = len(labels) - labels.count(IGNORE)
    if trained == 0:
        stats.dropped_no_trainable += 1
        return None
    stats.examples += 1
    stats.tokens += len(ids)
    stats.trained_tokens += trained
    stats.lengths.append(len(ids))
    return {"input_ids": ids, "labels": labels}


def _render_chunk(convs: list[Conversation], template: ChatTemplate, train_on: TrainOn,
                  stats: EncodeStats) -> list[Rendered | None]:
    import jinja2

    out: list[Rendered | None] = []
    for conv in convs:
        try:
            out.append(render_conversation(conv, template, train_on))
        except (EncodeError, jinja2.TemplateError) as e:
            reason = str(e) if isinstance(e, EncodeError) else f"template {template.name!r} refused it: {e}"
            stats.rejects.append(Reject(conv.source, "", reason, "template"))
            out.append(None)
    return out


def encode_batch(convs: list[Conversation], template: ChatTemplate, tokenizer, settings: EncodeSettings, *,
                 progress=None, threads: int = TOKENIZER_THREADS) -> tuple[list[dict | None], EncodeStats]:
    """Encode many conversations. The main thread renders chunks (Python) while `threads` workers tokenize earlier
    chunks (Rust, which releases the GIL), so several cores work. One entry per conversation (None: rejected or
    nothing to train), in order, and the stats. With `settings.chunk_documents`, a plain-text document longer than
    cutoff_len is not truncated: its entry is {"chunks": [example, ...]} (see flatten_examples)."""
    stats = EncodeStats()
    backend = _backend(tokenizer)
    special = _bos_eos(tokenizer)
    results: list[dict | None] = []

    def finish(rendered: list[Rendered | None], future) -> None:
        encodings = iter(future.result() if future is not None else [])
        for r in rendered:
            if r is None:
                results.append(None)
                continue
            if backend is not None:
                ids, labels = _labels_from_offsets(next(encodings), r.spans)
            else:
                ids, labels = _labels_by_pieces(tokenizer, r)
            results.append(_finish(ids, labels, r, special, settings, stats))
        if progress is not None:
            progress(len(rendered))

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(convs), CHUNK):
            rendered = _render_chunk(convs[start:start + CHUNK], template, settings.train_on, stats)
            texts = [r.text for r in rendered if r is not None]
            pending.append((rendered, pool.submit(_encode_texts, backend, texts) if backend else None))
            if len(pending) > threads:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    return results, stats


def flatten_examples(encoded: list[dict | None]) -> list[dict]:
    """encode_batch's entries as a list of examples: None dropped, a chunked document's chunks in order."""
    out: list[dict] = []
    for entry in encoded:
        if entry is not None:
            out.extend(entry.get("chunks", [entry]))
    return out


def _encode_texts(backend, texts: list[str]):
    return backend.encode_batch(texts, add_special_tokens=False)


def encode_conversation(conv: Conversation, template: ChatTemplate, tokenizer, cutoff_len: int,
                        train_on: TrainOn = "all_assistant") -> dict | None:
    """One conversation -> {"input_ids", "labels"}; None when nothing is left to train. Raises EncodeError (or
    the template's own error) when the conversation cannot be rendered and located."""
    rendered = render_conversation(conv, template, train_on)
    stats = EncodeStats()
    backend = _backend(tokenizer)
    if backend is not None:
        ids, labels = _labels_from_offsets(_encode_texts(backend, [rendered.text])[0], rendered.spans)
    else:
        ids, labels = _labels_by_pieces(tokenizer, rendered)
    return _finish(ids, labels, rendered, _bos_eos(tokenizer), EncodeSettings(cutoff_len, train_on), stats)


def _bos_eos(tokenizer) -> tuple[int | None, int | None]:
    """(bos id if the tokenizer puts one in front of plain text, eos id) for raw-text documents."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    return (bos if adds_bos else None), tokenizer.eos_token_id
