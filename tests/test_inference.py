"""Inference engine: batched == single greedy, stream == generate, stop strings, cancel, adapters, run dirs."""

from __future__ import annotations

import threading

import pytest
from test_inference_support import CUSTOM_TEMPLATE, make_adapter, make_run_dir

from tunelab.errors import TunelabError
from tunelab.inference.engine import Engine, EngineOptions, GenerationParams
from tunelab.inference.hf import load_engine
from tunelab.inference.stopping import safe_prefix

QUESTIONS = ["Hi", "What is the capital of France? Answer in one sentence.", "你好，请介绍一下你自己。"]
GREEDY = GenerationParams(max_new_tokens=12)


def prompts_for(engine, questions=QUESTIONS):
    return [engine.render([{"role": "user", "content": q}]) for q in questions]


@pytest.fixture(scope="module")
def llama_engine(tiny_models):
    return load_engine(str(tiny_models["llama"]))


def test_batched_greedy_equals_one_by_one(any_family):
    _, folder = any_family
    engine = load_engine(str(folder))
    assert isinstance(engine, Engine)
    prompts = prompts_for(engine)
    batch = engine.generate(prompts, GREEDY)
    single = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert [c.text for c in batch] == [c.text for c in single]
    for c, p in zip(batch, prompts):
        assert c.prompt_tokens == engine.count_tokens(p)
        assert c.completion_tokens == 12 and c.finish_reason == "length"


def test_stream_text_equals_generate(llama_engine):
    for prompt in prompts_for(llama_engine):
        expected = llama_engine.generate([prompt], GREEDY)[0]
        events = list(llama_engine.stream(prompt, GREEDY))
        assert "".join(e.delta for e in events) == expected.text
        assert events[-1].completion == expected
        assert all(e.completion is None for e in events[:-1]) and len(events) > 2
        assert not any(e.delta.endswith("\ufffd") for e in events[:-1])  # no half Chinese characters shown


def test_stop_string_cuts_text_in_generate_and_stream(llama_engine):
    prompt = prompts_for(llama_engine)[1]
    full = llama_engine.generate([prompt], GenerationParams(max_new_tokens=16))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    params = GenerationParams(max_new_tokens=16, stop=[stop])
    cut = llama_engine.generate([prompt], params)[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < 16
    streamed = list(llama_engine.stream(prompt, params))
    assert "".join(e.delta for e in streamed) == cut.text and streamed[-1].completion.finish_reason == "stop"


def test_end_of_turn_token_stops_with_reason_stop(tiny_models):
    engine = load_engine(str(tiny_models["qwen2"]))
    prompt = prompts_for(engine)[0]
    enc = engine.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    out = engine.model.generate(**enc, max_new_tokens=12, do_sample=False)  # transformers' own loop as reference
    full_ids = out[0, enc["input_ids"].shape[1]:].tolist()
    engine.stop_ids.add(full_ids[3])  # pretend the 4th generated token is the model's end-of-turn token
    done = engine.generate([prompt], GREEDY)[0]
    assert done.finish_reason == "stop" and done.completion_tokens == 4
    assert done.text == engine.tokenizer.decode(full_ids[:3])
    assert full_ids[3] not in full_ids[:3]
    assert engine.generate([prompt, prompts_for(engine)[1]], GREEDY)[0] == done  # row-wise in a batch too


def test_cancel_stops_streaming_promptly(llama_engine):
    prompt = prompts_for(llama_engine)[0]
    cancel = threading.Event()
    params = GenerationParams(max_new_tokens=500)
    events = []
    for event in llama_engine.stream(prompt, params, cancel=cancel):
        events.append(event)
        if len(events) == 2:
            cancel.set()
    assert events[-1].completion is not None and events[-1].completion.completion_tokens < 10
    # closing the iterator early also stops the worker and frees the engine for the next call
    it = llama_engine.stream(prompt, params)
    next(it)
    it.close()
    assert llama_engine.generate([prompt], GREEDY)[0].completion_tokens == 12


def test_sampling_is_reproducible_with_seed(llama_engine):
    prompt = prompts_for(llama_engine)[1]
    params = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, repetition_penalty=1.1,
                              seed=7)
    a, b = (llama_engine.generate([prompt], params)[0] for _ in range(2))
    assert a.text == b.text
    other = llama_engine.generate([prompt], GenerationParams(max_new_tokens=12, temperature=1.0, seed=8))[0]
    assert other.text != llama_engine.generate([prompt], GREEDY)[0].text or other.text != a.text


def test_concurrent_calls_are_serialized(llama_engine):
    prompts = prompts_for(llama_engine)
    expected = [llama_engine.generate([p], GREEDY)[0].text for p in prompts]
    results: dict[int, str] = {}

    def call(i):
        results[i] = llama_engine.generate([prompts[i % 3]], GREEDY)[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == expected * 2


def test_safe_prefix_holds_back_partial_stops_and_bytes():
    assert safe_prefix("hello wor", ["world"]) == "hello "
    assert safe_prefix("hello world!", ["world"]) == "hello "
    assert safe_prefix("你好\ufffd", []) == "你好"


def test_adapter_loading_paths_agree(tiny_models, tmp_path):
    base = tiny_models["llama"]
    adapter = make_adapter(base, tmp_path / "lora")
    plain = load_engine(str(base))
    via_adapter = load_engine(str(adapter))
    explicit = load_engine(str(base), adapter=str(adapter))
    merged = load_engine(str(adapter), options=EngineOptions(merge=True))
    prompts = prompts_for(plain)
    texts = [e.generate(prompts, GREEDY) for e in (via_adapter, explicit, merged)]
    assert [c.text for c in texts[0]] == [c.text for c in texts[1]] == [c.text for c in texts[2]]
    assert [c.text for c in texts[0]] != [c.text for c in plain.generate(prompts, GREEDY)]


def test_run_dir_uses_the_training_template(tiny_models, tmp_path):
    run = make_run_dir(tiny_models["llama"], tmp_path, "lora", template=CUSTOM_TEMPLATE)
    engine = load_engine(str(run))
    assert engine.name == run.name
    prompt = engine.render([{"role": "user", "content": "hi"}])
    assert "user says" in prompt and prompt.endswith("assistant says<|end_header_id|>\n\n")
    assert engine.generate([prompt], GREEDY)[0].completion_tokens == 12


def test_prefix_tuning_adapter_generates_batched(tiny_models, tmp_path):
    adapter = make_adapter(tiny_models["qwen2"], tmp_path / "prefix", kind="prefix")
    engine = load_engine(str(adapter))
    prompts = prompts_for(engine)
    batch = engine.generate(prompts, GREEDY)
    assert [c.text for c in batch] == [engine.generate([p], GREEDY)[0].text for p in prompts]
    assert [c.text for c in batch] != [c.text for c in load_engine(str(tiny_models["qwen2"])).generate(prompts, GREEDY)]


def no_cache_greedy(model, tokenizer, prompt: str, steps: int) -> list[int]:
    """Independent reference: the full forward pass (as in training, use_cache=False) re-run for every token."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = ids.shape[1]
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, start:].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_tuning_answer_equals_no_cache_forward_pass(tiny_models, tmp_path, family):
    """issue 12: peft's generate(use_cache=True) dropped the P-Tuning v2 prefix and answered like the base model."""
    adapter = make_adapter(tiny_models[family], tmp_path / "prefix", kind="prefix")
    engine = load_engine(str(adapter))
    base = load_engine(str(tiny_models[family]))
    for prompt in prompts_for(engine)[:2]:
        reference = no_cache_greedy(engine.model, engine.tokenizer, prompt, 8)
        done = engine.generate([prompt], GenerationParams(max_new_tokens=8))[0]
        assert done.text == engine.tokenizer.decode(reference)  # the prefix's answer, token for token
        assert "".join(e.delta for e in engine.stream(prompt, GenerationParams(max_new_tokens=8))) == done.text
        assert done.text != base.generate([prompt], GenerationParams(max_new_tokens=8))[0].text


def test_full_run_dir_and_bad_inputs(tiny_models, tmp_path):
    run = make_run_dir(tiny_models["gemma"], tmp_path, "full")
    engine = load_engine(str(run))
    assert engine.artifact.adapter_path is None and engine.generate(prompts_for(engine)[:1], GREEDY)
    with pytest.raises(TunelabError, match="adapter_config.json"):
        load_engine(str(tiny_models["gemma"]), adapter=str(tmp_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("model:\n  name: x\n")
    (tmp_path / "broken" / "run.json").write_text("{}")
    with pytest.raises(TunelabError, match="final/"):
        load_engine(str(tmp_path / "broken"))
