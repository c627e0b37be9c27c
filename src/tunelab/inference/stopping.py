"""Where a generated sequence ends (end-of-turn token, stop string, length, cancel) and what text it shows.

One StoppingCriteria serves batched generation and streaming, so both cut the text at the same place:
`generate` and `stream` return identical text for the same prompt (tested).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria


class StopWatch(StoppingCriteria):
    """Per-row stop detection: records how many generated tokens each row keeps and why it ended.

    transformers stops a row at its eos ids by itself but does not say why; stop strings may span tokens, so
    they are looked for in the decoded text of each row after every step.
    """

    def __init__(self, tokenizer, prompt_len: int, batch: int, stop_ids: set[int], stop_strings: Sequence[str],
                 cancel: Sequence[threading.Event] = (), on_step: Callable[[list[int]], None] | None = None):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop_ids = stop_ids
        self.stop_strings = [s for s in stop_strings if s]
        self.cancel = [c for c in cancel if c is not None]
        self.on_step = on_step
        self.kept: list[int | None] = [None] * batch  # generated tokens that count, once the row has ended
        self.hit_stop = [False] * batch

    def cancelled(self) -> bool:
        return any(c.is_set() for c in self.cancel)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:].tolist()
        for i, row in enumerate(new):
            if self.kept[i] is not None:
                continue
            if row[-1] in self.stop_ids or self.stop_strings and find_stop(self.decode(row), self.stop_strings) >= 0:
                self.kept[i], self.hit_stop[i] = len(row), True
        if self.on_step is not None:
            self.on_step(new[0])
        stop_all = self.cancelled()
        return torch.tensor([stop_all or k is not None for k in self.kept], device=input_ids.device)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def finish(self, row: int, ids: list[int]) -> tuple[str, int, str]:
        """(text, completion tokens, finish_reason) of one row, given all the ids generate returned for it."""
        kept = self.kept[row]
        count = kept if kept is not None else len(ids)
        text_ids = ids[:count]
        if text_ids and text_ids[-1] in self.stop_ids and kept is not None:
            text_ids = text_ids[:-1]  # the end-of-turn token ends the answer but is not part of it
        text = self.decode(text_ids)
        cut = find_stop(text, self.stop_strings)
        if cut >= 0:
            text = text[:cut]
        reason = "stop" if self.hit_stop[row] or self.cancelled() else "length"
        return text, count, reason


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def safe_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of partial output that can be shown now: not a possible start of a stop string, no half
    multi-byte character (decoders show U+FFFD until the rest of a Chinese character's bytes arrive)."""
    cut = find_stop(text, stops)
    if cut >= 0:
        return text[:cut]
    end = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    text = text[:end]
    return text.rstrip("\ufffd")
