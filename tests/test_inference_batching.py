"""Continuous batching (tunelab.inference.scheduler): join and leave mid-batch, cancel, per-request sampling and
stops, identical greedy output under 16-way concurrency (with and without a LoRA adapter), thread settings."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_inference_support import make_adapter

from tunelab.inference.engine import EngineOptions, GenerationParams
from tunelab.inference.hf import load_engine
from tunelab.inference.scheduler import Request

QUESTIONS = [f"Question {i}: " + ("why is the sky blue? " * (i % 4)) + ("请用中文回答。" if i % 3 == 0 else "")
             for i in range(16)]


def render(engine, text: str) -> str:
    return engine.render([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def engine(tiny_models):
    return load_engine(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def lora_engine(tiny_models, tmp_path_factory):
    return load_engine(str(make_adapter(tiny_models["llama"], tmp_path_factory.mktemp("lora") / "a")))


def submit(engine, prompt: str, params: GenerationParams, **kw) -> Request:
    return engine._submit(prompt, params, **kw)


def test_requests_join_and_leave_a_running_batch(engine):
    long_p, short_p = render(engine, QUESTIONS[1]), render(engine, QUESTIONS[2])
    long_alone = engine.generate([long_p], GenerationParams(max_new_tokens=30))[0]
    short_alone = engine.generate([short_p], GenerationParams(max_new_tokens=5))[0]
    started = threading.Event()
    steps_before = engine.scheduler.steps
    first = submit(engine, long_p, GenerationParams(max_new_tokens=30),
                   on_token=lambda ids: len(ids) == 8 and started.set())
    assert started.wait(30)
    second = submit(engine, short_p, GenerationParams(max_new_tokens=5))  # joins at a token boundary
    short = second.wait()
    assert not first.done.is_set()  # the short request left while the long one kept going
    assert first.wait() == long_alone and short == short_alone
    assert engine.scheduler.largest_batch >= 2
    assert engine.scheduler.steps - steps_before < 30 + 5  # they shared decode steps


def test_cancel_removes_one_row_and_leaves_the_others_intact(engine):
    prompts = [render(engine, q) for q in QUESTIONS[:3]]
    alone = [engine.generate([p], GenerationParams(max_new_tokens=20))[0] for p in prompts]
    cancel = threading.Event()
    # only row 1 watches its own tokens: a faster row reaching 3 tokens first must not cancel it early
    watch = {1: lambda ids: len(ids) == 3 and cancel.set()}
    reqs = [submit(engine, p, GenerationParams(max_new_tokens=20), cancel=(cancel,) if i == 1 else (),
                   **({"on_token": watch[i]} if i in watch else {}))
            for i, p in enumerate(prompts)]
    done = [r.wait() for r in reqs]
    assert done[1].finish_reason == "stop" and done[1].completion_tokens == 3
    assert alone[1].text.startswith(done[1].text)
    assert [done[0], done[2]] == [alone[0], alone[2]]


def test_closing_a_stream_cancels_its_row(engine):
    prompt = render(engine, QUESTIONS[0])
    events = engine.stream(prompt, GenerationParams(max_new_tokens=500))
    next(events)
    events.close()  # the client went away
    for _ in range(100):
        if not engine.scheduler._rows:
            break
        threading.Event().wait(0.05)
    assert not engine.scheduler._rows


def test_per_request_sampling_and_stop_strings_in_one_batch(engine):
    prompts = [render(engine, q) for q in QUESTIONS[:4]]
    full = engine.generate([prompts[0]], GenerationParams(max_new_tokens=16))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    plans = [GenerationParams(max_new_tokens=16, stop=[stop]),
             GenerationParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7),
             GenerationParams(max_new_tokens=9, repetition_penalty=1.3),
             GenerationParams(max_new_tokens=12, temperature=1.2, seed=3)]
    alone = [engine.generate([p], params)[0] for p, params in zip(prompts, plans)]
    together = [r.wait() for r in [submit(engine, p, params) for p, params in zip(prompts, plans)]]
    assert together == alone
    assert alone[0].text == full[: full.index(stop)] and alone[0].finish_reason == "stop"
    assert alone[2].completion_tokens == 9 and alone[2].finish_reason == "length"
    assert alone[1].text != engine.generate([prompts[1]], GenerationParams(max_new_tokens=12))[0].text


@pytest.mark.parametrize("which", ["engine", "lora_engine"])
def test_sixteen_concurrent_requests_equal_each_request_alone(request, which):
    eng = request.getfixturevalue(which)
    params = GenerationParams(max_new_tokens=10)
    prompts = [render(eng, q) for q in QUESTIONS]
    alone = [eng.generate([p], params)[0] for p in prompts]

    def streamed(p):
        events = list(eng.stream(p, params))
        return "".join(e.delta for e in events), events[-1].completion

    with ThreadPoolExecutor(16) as pool:
        plain = list(pool.map(lambda p: eng.generate([p], params)[0], prompts))
        streams = list(pool.map(streamed, prompts))
    assert plain == alone
    assert [s[1] for s in streams] == alone and [s[0] for s in streams] == [c.text for c in alone]


def test_lora_adapter_changes_the_answers(engine, lora_engine):
    prompt = render(engine, QUESTIONS[1])
    params = GenerationParams(max_new_tokens=10)
    assert engine.generate([prompt], params)[0].text != lora_engine.generate([prompt], params)[0].text


def test_generation_thread_uses_the_thread_setting(tiny_models):
    seen = []
    for threads in (1, 2):
        eng = load_engine(str(tiny_models["llama"]), options=EngineOptions(threads=threads))
        assert eng.threads == threads
        eng.generate([render(eng, "hi")], GenerationParams(max_new_tokens=2))
        req = submit(eng, render(eng, "hi"), GenerationParams(max_new_tokens=1),
                     on_token=lambda ids: seen.append(torch.get_num_threads()))
        req.wait()
        eng.close()
    assert seen == [1, 2]


def test_default_threads_follow_training(monkeypatch, tiny_models, tmp_path):
    from test_inference_support import make_run_dir

    from tunelab.inference.hf import inference_threads
    from tunelab.training.speed import usable_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert inference_threads(None) == usable_cores()  # training's default: one per usable core
        assert inference_threads(1) == 1
        run = make_run_dir(tiny_models["llama"], tmp_path, "lora")
        (run / "config.yaml").write_text((run / "config.yaml").read_text() + "train:\n  threads: 2\n")
        assert inference_threads(None, str(run)) == 2  # a run's train.threads
        eng = load_engine(str(tiny_models["llama"]))
        assert eng.threads == 2  # the engine's thread takes the count in force where it was made
        eng.close()
    finally:
        torch.set_num_threads(before)


def test_a_prompt_sharing_the_last_prompts_start_prefills_only_the_rest(tiny_models):
    eng = load_engine(str(tiny_models["llama"]))
    fresh = load_engine(str(tiny_models["llama"]))
    fresh.scheduler.reuse_prompts = False  # the reference: every prompt prefilled in full
    try:
        params = GenerationParams(max_new_tokens=12)
        prompts = [render(eng, q) for q in QUESTIONS[:6]]
        shared = 0
        for p in prompts:
            before = eng.scheduler.reused_tokens
            assert eng.generate([p], params) == fresh.generate([p], params)
            shared += eng.scheduler.reused_tokens > before
        assert shared == len(prompts) - 1  # all but the first start like the prompt before them
        assert fresh.scheduler.reused_tokens == 0
        again = eng.scheduler.reused_tokens
        assert eng.generate([prompts[-1]], params) == fresh.generate([prompts[-1]], params)
        assert eng.scheduler.reused_tokens - again == eng.count_tokens(prompts[-1]) - 1  # the same prompt again
    finally:
        eng.close()
        fresh.close()


def test_requests_arriving_during_a_prefill_get_their_first_token_before_the_next_step(engine):
    scheduler, params = engine.scheduler, GenerationParams(max_new_tokens=6)
    prompts = [render(engine, q) for q in QUESTIONS[:3]]
    alone = [engine.generate([p], params)[0] for p in prompts]
    first_at: dict[int, int] = {}
    late: list = []
    real_prefill = scheduler._prefill

    def prefill(joiners):  # more requests arrive while the first one is prefilled
        if not late:
            late.extend(submit(engine, p, params, on_token=lambda ids, i=i: first_at.setdefault(i, scheduler.steps))
                        for i, p in enumerate(prompts[1:], 1))
        real_prefill(joiners)

    scheduler._prefill = prefill
    try:
        steps = scheduler.steps
        first = submit(engine, prompts[0], params, on_token=lambda ids: first_at.setdefault(0, scheduler.steps))
        done = [first.wait(), *(r.wait() for r in late)]
    finally:
        del scheduler._prefill
    assert done == alone
    assert first_at == {0: steps, 1: steps, 2: steps}  # no decode step ran before the newcomers' first tokens


def test_a_failing_prefill_fails_its_requests_instead_of_hanging(tiny_models):
    eng = load_engine(str(tiny_models["llama"]))
    model = eng.scheduler.model

    def broken(**kwargs):
        eng.scheduler.model = model
        raise RuntimeError("out of memory")

    eng.scheduler.model = broken
    try:
        req = submit(eng, render(eng, "hi"), GenerationParams(max_new_tokens=3))
        assert req.done.wait(30), "the request was never ended"
        with pytest.raises(RuntimeError, match="out of memory"):
            req.wait()
        assert eng.generate([render(eng, "hi")], GenerationParams(max_new_tokens=3))[0].completion_tokens == 3
    finally:
        eng.close()


def test_an_idle_loop_thread_ends_and_the_next_request_gets_a_fresh_one(tiny_models):
    eng = load_engine(str(tiny_models["llama"]), options=EngineOptions(threads=1))
    eng.scheduler.idle_exit_s = 0.05
    params, prompt = GenerationParams(max_new_tokens=4), render(eng, "hi")
    try:
        first = eng.generate([prompt], params)
        thread = eng.scheduler._thread
        for _ in range(100):
            if eng.scheduler._thread is None:
                break
            threading.Event().wait(0.05)
        assert eng.scheduler._thread is None and not thread.is_alive()  # idle: the loop thread ended
        seen = []
        req = submit(eng, prompt, params, on_token=lambda ids: seen.append(torch.get_num_threads()))
        assert req.wait() == first[0] and eng.scheduler.threads_started == 2 and set(seen) == {1}
    finally:
        eng.scheduler.close(wait=10)
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate([prompt], params)  # after close: an error, not a request waiting forever


def test_closing_an_idle_engine_starts_no_thread(tiny_models):
    """An engine whose loop thread ended after idling is closed without starting one (a thread started while the
    interpreter finalizes, when an engine is collected at exit, aborts the process with exit 134)."""
    eng = load_engine(str(tiny_models["llama"]), options=EngineOptions(threads=1))
    eng.scheduler.idle_exit_s = 0.05
    params, prompt = GenerationParams(max_new_tokens=2), render(eng, "hi")
    eng.generate([prompt], params)
    for _ in range(100):
        if eng.scheduler._thread is None:
            break
        threading.Event().wait(0.05)
    started = eng.scheduler.threads_started
    eng.close()
    assert eng.scheduler.threads_started == started and eng.scheduler._thread is None
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate([prompt], params)
    assert eng.scheduler.threads_started == started


def _plain_forward(model, ids: list[int]):
    """The reference: the model alone on one whole prompt, no cache given, no padding, no custom mask."""
    from transformers import DynamicCache

    out = model(input_ids=torch.tensor([ids]), use_cache=True, past_key_values=DynamicCache())
    cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
    return out.logits[0, -1], [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def _prefilled(scheduler, prompts: list[list[int]]) -> list[Request]:
    joiners = [Request(ids, GenerationParams(max_new_tokens=4), 4, []) for ids in prompts]
    with torch.inference_mode():
        scheduler._prefill(joiners)
    return joiners


@pytest.mark.parametrize("packed", [True, False])
def test_a_prefill_gives_each_prompt_the_first_token_and_cache_of_the_model_alone(tiny_models, packed):
    """Packed (one row, no padding) and padded prefills of prompts of different lengths, the second time starting
    from the held start of the last prompt, against the plain forward of each prompt alone."""
    from tunelab.inference.scheduler import Scheduler

    eng = load_engine(str(tiny_models["llama"]))
    scheduler = Scheduler(eng.model, eng.tokenizer, eng.stop_ids, max_batch_size=16)
    scheduler.packed_prefill = packed
    try:
        for round_ in range(2):  # round 1 reuses the held prompt's start (the template's shared tokens)
            prompts = [eng.tokenizer(render(eng, q), add_special_tokens=False)["input_ids"]
                       for q in QUESTIONS[round_ * 5:round_ * 5 + 5]]
            before = (scheduler.reused_tokens, scheduler.packed_prefills)
            scheduler._rows, scheduler._cache, scheduler._mask = [], None, None  # each round: a fresh batch
            joiners = _prefilled(scheduler, prompts)
            assert (scheduler.reused_tokens > before[0]) == (round_ == 1)
            assert scheduler.packed_prefills - before[1] == packed
            for row, (ids, req) in enumerate(zip(prompts, joiners)):
                logits, layers = _plain_forward(eng.model, ids)
                assert req.out[0] == int(logits.argmax())
                cols = scheduler._mask[row].nonzero().squeeze(1)
                assert len(cols) == len(ids) and int(scheduler._mask[row].sum()) == len(ids)
                for (k, v), layer in zip(layers, scheduler._cache.layers):
                    torch.testing.assert_close(layer.keys[row][:, cols], k, atol=1e-5, rtol=1e-4)
                    torch.testing.assert_close(layer.values[row][:, cols], v, atol=1e-5, rtol=1e-4)
    finally:
        eng.close()


def test_packed_and_padded_prefills_give_the_same_answers(tiny_models):
    packed = load_engine(str(tiny_models["llama"]))
    padded = load_engine(str(tiny_models["llama"]))
    padded.scheduler.packed_prefill = False
    try:
        params = GenerationParams(max_new_tokens=8)
        prompts = [render(packed, q) for q in QUESTIONS[:8]]
        together = [[r.wait() for r in [submit(e, p, params) for p in prompts]] for e in (packed, padded)]
        assert together[0] == together[1]
        assert packed.scheduler.packed_prefills > 0 and padded.scheduler.packed_prefills == 0
    finally:
        packed.close()
        padded.close()


def test_a_sliding_window_narrower_than_a_prompt_falls_back_to_a_padded_prefill(tiny_models):
    from tunelab.inference.prefill import fits_packing

    eng = load_engine(str(tiny_models["gemma"]))  # sliding_window 64 in its sliding layers
    try:
        config = eng.scheduler.config
        assert fits_packing(config, 64) and not fits_packing(config, 65)
        params = GenerationParams(max_new_tokens=4)
        long_prompt = render(eng, "why is the sky blue? " * 12)
        assert eng.count_tokens(long_prompt) > 64
        eng.generate([render(eng, "hi")], params)
        assert eng.scheduler.packed_prefills == 1
        eng.generate([long_prompt], params)
        assert eng.scheduler.packed_prefills == 1  # padded: transformers builds the sliding mask itself
    finally:
        eng.close()


def test_an_idle_engine_prefills_a_burst_of_requests_in_one_forward(tiny_models):
    eng = load_engine(str(tiny_models["llama"]))
    scheduler, params = eng.scheduler, GenerationParams(max_new_tokens=3)
    prompts = [render(eng, q) for q in QUESTIONS[:6]]
    alone = [eng.generate([p], params)[0] for p in prompts]
    sizes: list[int] = []
    real_prefill = scheduler._prefill
    scheduler._prefill = lambda joiners: (sizes.append(len(joiners)), real_prefill(joiners))
    scheduler.gather_s, scheduler.gather_gap_s = 2.0, 0.5  # a loaded machine may space the submits out
    try:
        together = [r.wait() for r in [submit(eng, p, params) for p in prompts]]
    finally:
        del scheduler._prefill
        eng.close()
    assert together == alone and sizes == [6]


def test_a_dropped_engine_thread_is_joined_before_the_interpreter_exits(tiny_models):
    """The demo's last step: answer, drop the engine, exit. The loop thread then frees the scheduler (its last
    reference) after the interpreter started finalizing, and the process aborted (exit 134, "terminate called without
    an active exception") on some runs. join_loop_threads (run at exit) waits for it; the process exits 0 each time."""
    import subprocess
    import sys

    from tunelab.inference.scheduler import join_loop_threads

    eng = load_engine(str(tiny_models["llama"]), options=EngineOptions(threads=1))
    eng.scheduler.idle_exit_s = None  # the loop ends only when closed, not by idling
    eng.generate([render(eng, "hi")], GenerationParams(max_new_tokens=2))
    thread = eng.scheduler._thread
    assert thread is not None and thread.is_alive()
    del eng  # closes the scheduler without waiting
    gc.collect()
    join_loop_threads()
    assert not thread.is_alive()
    script = ("import gc, sys\n"
              "from tunelab.inference.engine import EngineOptions, GenerationParams\n"
              "from tunelab.inference.hf import load_engine\n"
              "eng = load_engine(sys.argv[1], options=EngineOptions(threads=1))\n"
              "prompt = eng.render([{'role': 'user', 'content': 'hi'}])\n"
              "print(eng.generate([prompt] * 4, GenerationParams(max_new_tokens=8))[0].text)\n"
              "del eng\n"
              "gc.collect()\n")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script, str(tiny_models["llama"])], capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
