"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server on loopback.

Every test talks to the real HFEngine on a tiny random-weight llama (real tokenizer and chat template).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_serve_support import SlowEngine, live_server

from tunelab.config.schema import ServeConfig
from tunelab.inference.engine import GenerationParams
from tunelab.serving.app import create_app

MODEL = "tiny-llama"
KEY_ENV = "TUNELAB_TEST_SERVE_KEYS"


@pytest.fixture(scope="module")
def engine(tiny_models):
    from tunelab.inference.hf import load_engine

    return load_engine(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def server(engine):
    """An open server (no API key) with small limits, shared by the tests of this module."""
    app = create_app(engine, ServeConfig(model_name=MODEL, max_new_tokens=32, max_body_bytes=32_768))
    with live_server(app) as url:
        yield url, app


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def alone(engine, messages, max_new_tokens: int, **kw) -> tuple[str, object]:
    """What the engine says for `messages` rendered with its training template, with nothing else running."""
    prompt = engine.render(messages)
    return prompt, engine.generate([prompt], GenerationParams(max_new_tokens=max_new_tokens, **kw))[0]


# --------------------------------------------------------------------------------------------------- happy paths
def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_renders_with_training_template_and_reports_usage(client, engine):
    messages = [{"role": "system", "content": "You are terse."}, *user("What is the capital of France? 法国的首都？")]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    prompt, expected = alone(engine, messages, 12)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL and choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert reply.usage.prompt_tokens == engine.count_tokens(prompt) == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert choice.finish_reason == "length"  # max_tokens cut it


def test_stop_string_gives_finish_reason_stop(client, engine):
    _, free = alone(engine, user("Tell me a story"), 16)
    word = next(w for w in free.text.split()[1:] if len(w) >= 3)
    reply = client.chat.completions.create(model=MODEL, messages=user("Tell me a story"), max_tokens=16,
                                           temperature=0, stop=[word])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == free.text[:free.text.find(word)]


def test_max_completion_tokens_and_n(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("hi"), max_completion_tokens=5, n=3,
                                           temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 1  # greedy: n identical answers
    assert reply.usage.completion_tokens == 15


def test_seeded_sampling_is_reproducible(client):
    kw = {"model": MODEL, "messages": user("Write a poem"), "max_tokens": 10, "temperature": 1.0, "top_p": 0.9,
          "seed": 7}
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first


def test_streaming_matches_non_streaming_and_reports_usage(client):
    messages = user("Count to five, 然后用中文数。")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == ["length"]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[1][6:])  # no usage field unless the client asks for it


def test_text_completions(client, engine):
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    expected = engine.generate(["Once upon a time"], GenerationParams(max_new_tokens=8))[0]
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == engine.count_tokens("Once upon a time")
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text


def test_simple_generate_endpoint_uses_the_chat_template(server, client):
    body = {"instruction": "把下面的句子翻译成中文。", "input": "Hello, world", "max_length": 2048, "temperature": 0}
    r = httpx.post(server[0] + "/generate", json=body, timeout=60)
    assert r.status_code == 200
    chat = client.chat.completions.create(model=MODEL, messages=user("把下面的句子翻译成中文。\nHello, world"),
                                          max_tokens=32, temperature=0)  # 32: the server's max_new_tokens
    assert r.json() == {"output": chat.choices[0].message.content}


def test_health_and_openapi_schema(server):
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    schema = httpx.get(server[0] + "/openapi.json").json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/generate", "/health"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(schema)


# -------------------------------------------------------------------------------------------------------- errors
def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert e.value.code == "model_not_found" and MODEL in e.value.message


@pytest.mark.parametrize("change, param, text", [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content", "content must be a string"),
    ({"messages": [{"role": "user"}]}, "messages.0", "needs `content`"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"max_tokens": 10_000}, "max_tokens", "at most 32 tokens"),
    ({"messages": user("hello " * 2100)}, "messages", "context is 2048 tokens"),
    ({"presence_penalty": 0.5}, None, "repetition_penalty"),
])
def test_bad_requests_get_openai_errors(client, change, param, text):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    error = e.value.body
    assert e.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and text in error["message"]


def test_prompt_too_long_for_context_has_openai_code(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("hello " * 2100))
    assert e.value.code == "context_length_exceeded"


def test_malformed_json_and_wrong_body(server):
    url = server[0] + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "tiny-llama", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_oversized_bodies_are_refused_before_reading(server):
    url = server[0] + "/v1/chat/completions"
    big = json.dumps({"model": MODEL, "messages": user("x" * 40_000)}).encode()
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit applies while reading
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_no_wildcard_cors_by_default(server):
    r = httpx.options(server[0] + "/v1/chat/completions",
                      headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server[0] + "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ----------------------------------------------------------------------------------------------------------- auth
def test_api_keys_from_config_and_environment(engine, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-env-1, sk-env-2")
    app = create_app(engine, ServeConfig(model_name=MODEL, api_keys=["sk-config"], api_key_env=KEY_ENV))
    with live_server(app) as url:
        for key in ("sk-config", "sk-env-1", "sk-env-2"):
            c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            assert c.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2).usage.completion_tokens
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        r = httpx.post(url + "/generate", json={"instruction": "hi"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


# ---------------------------------------------------------------------------------------------------- concurrency
PROMPTS = [f"Question {i}: " + ("why is the sky blue? " * (i % 4)) + ("请用中文回答。" if i % 3 == 0 else "")
           for i in range(16)]


def test_sixteen_parallel_requests_equal_the_same_requests_alone(server, client):
    def ask(text: str):
        return client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=10, temperature=0)

    solo = [ask(text) for text in PROMPTS]  # one at a time: each generated alone
    batcher = server[1].state.serve.batcher
    batches_before = batcher.batches
    with ThreadPoolExecutor(16) as pool:
        parallel = list(pool.map(ask, PROMPTS))
    for a, b in zip(solo, parallel):
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.usage == a.usage and b.choices[0].finish_reason == "length"
    assert batcher.batches - batches_before < 16 and batcher.largest_batch > 1  # they were batched


def test_full_queue_answers_503_with_retry_after(engine):
    slow = SlowEngine(engine, delay_s=1.0)
    app = create_app(slow, ServeConfig(model_name=MODEL, max_batch_size=1, max_queue=2))
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 2, "temperature": 0}
    with live_server(app) as url, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=body, timeout=60),
                                  range(6)))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in busy)
    done = [r for r in responses if r.status_code == 200]
    assert done and all(r.json()["usage"]["completion_tokens"] == 2 for r in done)
    assert len(busy) + len(done) == 6


def test_client_leaving_mid_stream_stops_generation(engine):
    slow = SlowEngine(engine, delay_s=0.05)
    app = create_app(slow, ServeConfig(model_name=MODEL, max_new_tokens=400))
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 400, "temperature": 0, "stream": True}
    with live_server(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            [next(lines) for _ in range(6)]  # a few chunks, then hang up
        assert slow.stream_closed.wait(10), "generation went on after the client left"
        assert slow.cancels[0].is_set() and slow.streamed_events < 100
        deadline = time.monotonic() + 10
        while app.state.serve.batcher.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.serve.batcher.running == 0
        # the engine is free again: a new request is served at once
        reply = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200


def test_queued_request_whose_client_left_is_not_generated(engine):
    slow = SlowEngine(engine, delay_s=1.5)
    app = create_app(slow, ServeConfig(model_name=MODEL, max_batch_size=1, batch_wait_ms=0))
    url_path = "/v1/chat/completions"
    with live_server(app) as url:
        first = threading.Thread(target=httpx.post, args=(url + url_path,), kwargs={"timeout": 60, "json": {
            "model": MODEL, "messages": user("first"), "max_tokens": 2}})
        first.start()
        time.sleep(0.3)  # the first is generating; the second waits in the queue, then its client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + url_path, json={"model": MODEL, "messages": user("second"), "max_tokens": 2},
                       timeout=0.5)
        first.join()
        time.sleep(0.5)
        assert app.state.serve.batcher.queued == 0
    assert len(slow.generated_prompts) == 1 and "first" in slow.generated_prompts[0]


def test_generation_runs_off_the_event_loop(engine):
    """While a slow batch generates, the server still answers /health at once."""
    slow = SlowEngine(engine, delay_s=2.0)
    app = create_app(slow, ServeConfig(model_name=MODEL))
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}
    with live_server(app) as url:
        worker = threading.Thread(target=httpx.post, args=(url + "/v1/chat/completions",),
                                  kwargs={"json": body, "timeout": 60})
        worker.start()
        time.sleep(0.3)
        start = time.monotonic()
        health = httpx.get(url + "/health", timeout=5).json()
        assert time.monotonic() - start < 1.0 and health["running"] == 1
        worker.join()
