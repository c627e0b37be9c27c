"""Serving at production shape: shutdown error events, early refusal, thread flags, item-level error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve_support import SlowEngine, live_server

from tunelab.config.schema import ServeConfig
from tunelab.inference.hf import load_engine
from tunelab.serving.app import create_app
from tunelab.serving.server import start_shutdown

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_models):
    return load_engine(str(tiny_models["llama"]))


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0, **kw}


def sse_events(lines) -> list:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def test_shutdown_timeout_ends_open_streams_with_an_error_event(engine):
    app = create_app(SlowEngine(engine, delay_s=0.05), ServeConfig(model_name=MODEL))
    body = chat_body(stream=True, max_tokens=400)
    with live_server(app) as url, httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        start_shutdown(app, timeout_s=0.3)  # what SIGTERM does in `tunelab serve`
        late = httpx.post(url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=30)
        events = sse_events(lines)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"  # no new work once draining
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and "incomplete" in error["message"]
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2])  # text came before


def test_shutdown_timeout_answers_running_requests_with_503(engine):
    app = create_app(SlowEngine(engine, delay_s=1.5), ServeConfig(model_name=MODEL))
    with live_server(app) as url, ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, url + "/v1/chat/completions", json=chat_body(max_tokens=4), timeout=30)
        while app.state.serve.batcher.running == 0:
            pass
        start_shutdown(app, timeout_s=0.2)
        reply = running.result()
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "shutting_down"


def test_requests_that_finish_within_the_timeout_are_answered(engine):
    app = create_app(engine, ServeConfig(model_name=MODEL))
    with live_server(app) as url, ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, url + "/v1/chat/completions", json=chat_body(max_tokens=8), timeout=30)
        while app.state.serve.batcher.running == 0 and not running.done():
            pass
        start_shutdown(app, timeout_s=20)
        reply = running.result()
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8


def test_network_refusal_comes_before_heavy_imports(tiny_models):
    code = ("import sys; from tunelab.cli.main import main; "
            f"rc = main(['serve', {str(tiny_models['llama'])!r}, '--host', '0.0.0.0']); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_API_KEY"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "2 []", out.stdout + out.stderr
    assert "refusing to serve on 0.0.0.0" in out.stderr


def test_a_non_object_message_is_named_with_what_was_expected(engine):
    from fastapi.testclient import TestClient

    with TestClient(create_app(engine, ServeConfig(model_name=MODEL))) as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ["hi"]})
        body = c.post("/v1/chat/completions", content=b"[1]", headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages.0"
    assert 'expected a JSON object, got a string "hi"' in error["message"] and '"role": "user"' in error["message"]
    assert "request body must be a JSON object" in body.json()["error"]["message"]


def test_thread_flags_of_serve_chat_and_eval(tmp_path):
    from tunelab.cli.main import build_parser
    from tunelab.cli.serve import thread_setting

    parser = build_parser()
    assert thread_setting(parser.parse_args(["serve", "m", "--threads", "3"])) == 3
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  threads: 1\n", encoding="utf-8")
    assert thread_setting(parser.parse_args(["serve", "m", "--config", str(cfg)])) == 1
    assert thread_setting(parser.parse_args(["serve", "m"])) is None
    assert parser.parse_args(["chat", "m", "--threads", "2"]).threads == 2
    assert parser.parse_args(["eval", "m", "--threads", "2"]).threads == 2


# ------------------------------------------------------------------------------------------------------------ vLLM
def test_vllm_request_mapping_without_vllm():
    from types import SimpleNamespace

    from tunelab.inference.engine import GenerationParams
    from tunelab.inference.vllm import sampling_params, to_completion

    made = sampling_params(GenerationParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=0, stop=["\n\n"],
                                            seed=3, repetition_penalty=1.1), {2, 5}, factory=dict)
    assert made == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.1,
                    "stop": ["\n\n"], "stop_token_ids": [2, 5], "seed": 3, "skip_special_tokens": True}
    assert sampling_params(GenerationParams(top_k=40), set(), factory=dict)["top_k"] == 40
    assert sampling_params(GenerationParams(), set(), factory=dict)["stop"] is None
    out = SimpleNamespace(prompt_token_ids=[1, 2, 3],
                          outputs=[SimpleNamespace(text="Paris.", token_ids=[9, 8, 7, 6], finish_reason="stop")])
    done = to_completion(out)
    assert (done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason) == ("Paris.", 3, 4, "stop")
    out.outputs[0].finish_reason = "length"
    assert to_completion(out).finish_reason == "length"


def test_vllm_engine_is_refused_clearly_where_it_cannot_run(tiny_models, capsys, monkeypatch):
    import importlib.util

    from tunelab.cli.main import main

    if importlib.util.find_spec("vllm") is not None and __import__("torch").cuda.is_available():
        pytest.skip("vLLM and CUDA are present")
    assert main(["serve", str(tiny_models["llama"]), "--engine", "vllm", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--engine vllm needs" in err and "--engine hf" in err
