"""Where a generated sequence ends (end-of-turn token, stop string, length, cancel) and what text it shows.

Stop strings are detected by transformers' `StopStringCriteria` (it finds a stop string completed by the newest
token, overhangs on either end included, without decoding the sequence); `find_stop` then cuts the text where the
stop string starts, which the criteria does not report. `safe_prefix` holds back streamed text that may still
become a stop string: the library has no counterpart (tests/test_inference_stopping.py shows what transformers'
TextIteratorStreamer would show instead).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch


class StopStrings:
    """One tokenizer's `StopStringCriteria`, built once per set of stop strings (~0.1-0.2 s for a 49k vocabulary,
    even when transformers' own cache hits, so never on the generation thread per request) and kept for reuse."""

    def __init__(self, tokenizer, capacity: int = 64):
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._built: OrderedDict[tuple[str, ...], object] = OrderedDict()
        # transformers keeps its token tables in a module-level OrderedDict mutated without a lock
        self._lock = threading.Lock()

    def criteria(self, stops: Sequence[str]):
        """The criteria for `stops` (None when there are none); call from the thread that submits a request."""
        from transformers import StopStringCriteria

        key = tuple(sorted({s for s in stops if s}))
        if not key:
            return None
        with self._lock:
            if key not in self._built:
                self._built[key] = StopStringCriteria(self.tokenizer, list(key))
                if len(self._built) > self.capacity:
                    self._built.popitem(last=False)
            self._built.move_to_end(key)
            return self._built[key]


def ends_with_stop(criteria, generated: list[int]) -> bool:
    """Whether the newest generated token completes a stop string. Only the generated ids are passed: with the
    prompt in front, a stop string spanning the prompt's end and the first token (prompt "...\n", stop "\nUser",
    first token "User") would end an answer before it began (tested)."""
    if criteria is None or not generated:
        return False
    return bool(criteria(torch.tensor([generated[-criteria.maximum_token_len:]]), None)[0])


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
