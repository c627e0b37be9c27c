"""Stop strings through transformers' StopStringCriteria, and why streaming keeps its own hold-back of partial
stop strings instead of transformers' TextIteratorStreamer (inference/stopping.py, inference/hf.py)."""

from __future__ import annotations

import random

import pytest
import torch

from tunelab.inference.engine import GenerationParams
from tunelab.inference.stopping import StopStrings, ends_with_stop, find_stop, safe_prefix

TEXTS = [
    "Sure. ### Human: what is the capital of France?\nUser: Paris, I think.",
    "好的。用户：你好，请介绍一下你自己。助手：我是Mochi，由TuneLab训练的AI助手。",
    "def f(x):\n    return x ** 2  # square\n\n<|im_end|> END of text, ENDING here",
    "Mixed 中文 and English: 你好 world, 再见 friend! 🙂 emoji too.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def first_step(hits) -> int | None:
    return next((k for k, hit in enumerate(hits, 1) if hit), None)


def test_library_criteria_stops_at_the_same_token_as_decoding_and_searching(tokenizer):
    """For random stop strings cut out of English, Chinese, code and emoji text, StopStringCriteria fires at the
    very token where the decoded text first contains the stop string (what tunelab did by hand before)."""
    stops = StopStrings(tokenizer)
    rng = random.Random(0)
    compared = 0
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for _ in range(12):
            start = rng.randrange(len(text) - 1)
            stop = text[start:start + rng.randint(1, 6)]
            if not stop.strip():
                continue
            decoded = [tokenizer.decode(ids[:k], clean_up_tokenization_spaces=False) for k in range(1, len(ids) + 1)]
            by_hand = first_step(find_stop(t, [stop]) >= 0 for t in decoded)
            library = first_step(ends_with_stop(stops.criteria([stop]), ids[:k]) for k in range(1, len(ids) + 1))
            assert library == by_hand, (text, stop)
            compared += 1
    assert compared >= 40


def test_only_generated_ids_are_matched(tokenizer):
    """With the prompt in front, the criteria would end an answer at its first token when a stop string spans the
    prompt's end: the reason ends_with_stop passes the generated ids alone."""
    prompt = tokenizer("Question: hi\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer("User", add_special_tokens=False)["input_ids"]
    criteria = StopStrings(tokenizer).criteria(["\nUser"])
    assert bool(criteria(torch.tensor([prompt + answer]), None)[0])
    assert not ends_with_stop(criteria, answer)


def test_criteria_are_built_once_per_stop_set(tokenizer):
    stops = StopStrings(tokenizer, capacity=2)
    a = stops.criteria(["b", "a"])
    assert stops.criteria(["a", "b", ""]) is a and stops.criteria([]) is None and stops.criteria([""]) is None
    stops.criteria(["c"]), stops.criteria(["d"])
    assert stops.criteria(["a", "b"]) is not a  # the least recently used set was dropped


def test_text_iterator_streamer_would_show_text_the_answer_cuts(tokenizer):
    """Why HFEngine.stream keeps safe_prefix: transformers' streamer flushes up to the last space, so a client
    would see the start of a stop string that the final answer then does not contain; and it takes batch size 1
    only, while the scheduler advances every request in one batch."""
    from transformers import TextIteratorStreamer

    stop = "### Human:"
    ids = tokenizer("Sure. ### Human: hi", add_special_tokens=False)["input_ids"]
    before_stop = next(k for k in range(1, len(ids) + 1)
                       if "Human" in tokenizer.decode(ids[:k]))  # the stop string is not complete yet
    streamer = TextIteratorStreamer(tokenizer, timeout=1)
    for token in ids[:before_stop]:
        streamer.put(torch.tensor([token]))
    shown = ""
    while not streamer.text_queue.empty():
        shown += streamer.text_queue.get()
    final = "Sure. "  # what the answer is once the stop string completes
    assert "###" in shown and not final.startswith(shown)
    assert final.startswith(safe_prefix(tokenizer.decode(ids[:before_stop]), [stop]))
    with pytest.raises(ValueError, match="batch size 1"):
        TextIteratorStreamer(tokenizer).put(torch.tensor([[1], [2]]))


def test_engine_stop_strings_go_through_the_library(tiny_models, monkeypatch):
    from tunelab.inference import stopping
    from tunelab.inference.hf import load_engine

    engine = load_engine(str(tiny_models["llama"]))
    prompt = engine.render([{"role": "user", "content": "Hi"}])
    full = engine.generate([prompt], GenerationParams(max_new_tokens=16))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    calls = []
    real = stopping.ends_with_stop
    monkeypatch.setattr("tunelab.inference.scheduler.ends_with_stop",
                        lambda criteria, ids: calls.append(criteria) or real(criteria, ids))
    cut = engine.generate([prompt], GenerationParams(max_new_tokens=16, stop=[stop]))[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    assert calls and all(type(c).__name__ == "StopStringCriteria" for c in calls)
    engine.close()
