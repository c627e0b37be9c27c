"""Serving parts on their own: batch grouping, API keys, tool-role rendering, CORS, and `tunelab serve` itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

# imported here, at collection: a lazy import inside a test can hit CPython 3.11.7's thread-unsafe AST check
# ("AST constructor recursion depth mismatch") while server threads of earlier tests still run
from fastapi.testclient import TestClient

from tunelab.cli.main import main
from tunelab.config.schema import ServeConfig
from tunelab.inference.engine import Engine, GenerationParams
from tunelab.serving.batcher import Batcher, QueueFullError, ShuttingDownError, batch_key
from tunelab.serving.protocol import ApiError
from tunelab.serving.security import KeyChecker


@pytest.fixture(scope="module")
def engine(tiny_models):
    from tunelab.inference.hf import load_engine

    return load_engine(str(tiny_models["llama"]))


# ------------------------------------------------------------------------------------------------------- batching
def test_batch_key_groups_only_requests_that_answer_the_same():
    greedy = GenerationParams(max_new_tokens=8, temperature=0)
    assert batch_key(greedy) == batch_key(GenerationParams(max_new_tokens=8, temperature=0, top_p=0.5, seed=3))
    assert batch_key(greedy) != batch_key(GenerationParams(max_new_tokens=9, temperature=0))
    assert batch_key(greedy) != batch_key(GenerationParams(max_new_tokens=8, temperature=0, stop=["\n"]))
    sampled = GenerationParams(max_new_tokens=8, temperature=0.7)
    assert batch_key(sampled) == batch_key(GenerationParams(max_new_tokens=8, temperature=0.7))
    seeded = GenerationParams(max_new_tokens=8, temperature=0.7, seed=1)
    assert batch_key(seeded) != batch_key(seeded)  # a seeded sample runs alone, so it is reproducible


def test_batcher_groups_compatible_requests_into_one_call(engine):
    class Counting:
        def __init__(self):
            self.calls: list[int] = []

        def __getattr__(self, name):
            return getattr(engine, name)

        def generate(self, prompts, params):
            self.calls.append(len(prompts))
            return engine.generate(prompts, params)

    counting = Counting()
    batcher = Batcher(counting, max_batch_size=4, max_queue=16, batch_wait_s=0.05)
    prompts = [engine.render([{"role": "user", "content": f"q{i}"}]) for i in range(6)]
    greedy, longer = GenerationParams(max_new_tokens=3), GenerationParams(max_new_tokens=4)

    async def go():
        jobs = [batcher.generate([p], greedy) for p in prompts[:5]] + [batcher.generate(prompts[5:], longer)]
        return await asyncio.gather(*jobs)

    try:
        results = asyncio.run(go())
    finally:
        batcher.close()
    assert sorted(counting.calls) == [1, 1, 4]  # 4 greedy, then the 5th greedy; the 4-token one alone
    expected = [engine.generate([p], greedy)[0].text for p in prompts[:5]]
    assert [r[0].text for r in results[:5]] == expected
    assert results[5][0].completion_tokens == 4


def test_batcher_bounds_the_queue_and_fails_queued_work_on_close(engine):
    from test_serve_support import SlowEngine

    batcher = Batcher(SlowEngine(engine, delay_s=0.5), max_batch_size=1, max_queue=2, batch_wait_s=0)
    prompt = engine.render([{"role": "user", "content": "hi"}])
    params = GenerationParams(max_new_tokens=2)

    async def go():
        running = asyncio.ensure_future(batcher.generate([prompt], params))
        await asyncio.sleep(0.1)  # the engine thread has taken it
        queued = [asyncio.ensure_future(batcher.generate([prompt], params)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await batcher.generate([prompt], params)
        batcher.close()
        with pytest.raises(ShuttingDownError):
            await queued[0]
        return await running

    assert asyncio.run(go())[0].completion_tokens == 2


def test_engine_errors_reach_the_request(engine):
    class Broken:
        name, max_context = "broken", 2048

        def generate(self, prompts, params):
            raise RuntimeError("CUDA out of memory (simulated)")

    batcher = Batcher(Broken(), batch_wait_s=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        asyncio.run(batcher.generate(["x"], GenerationParams()))
    batcher.close()


def test_engine_failure_mid_stream_is_an_error_event(engine):
    """After the 200 status is sent, a failure can only be reported inside the stream."""
    from test_serve_support import SlowEngine

    from tunelab.serving.app import create_app

    class FailsMidStream(SlowEngine):
        def stream(self, prompt, params, cancel=None):
            for i, event in enumerate(super().stream(prompt, params, cancel)):
                if i == 2:
                    raise RuntimeError("device lost (simulated)")
                yield event

    app = create_app(FailsMidStream(engine, delay_s=0), ServeConfig())
    body = {"model": engine.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=body)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "device lost" in json.loads(events[-2])["error"]["message"]


# ----------------------------------------------------------------------------------------------------- security
def test_key_checker():
    open_server = KeyChecker([])
    open_server.check(None)
    checker = KeyChecker(["sk-a", "sk-b"])
    checker.check("Bearer sk-b")
    checker.check("bearer sk-a")
    for header in (None, "Bearer sk-c", "sk-a", "Basic sk-a", "Bearer "):
        with pytest.raises(ApiError) as e:
            checker.check(header)
        assert e.value.status == 401 and e.value.headers == {"WWW-Authenticate": "Bearer"}


def test_cors_only_for_configured_origins(engine):

    from tunelab.serving.app import create_app

    app = create_app(engine, ServeConfig(cors_origins=["https://ui.example"]))
    with TestClient(app) as c:
        ok = c.get("/v1/models", headers={"Origin": "https://ui.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ui.example"
        other = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------------------------------------------ templates
def test_tool_roles_render_through_the_training_template(tiny_models):
    """system/user/assistant(tool_calls)/tool messages reach the qwen2.5 template as Hugging Face expects them."""

    from tunelab.inference.hf import load_engine
    from tunelab.serving.app import create_app

    qwen = load_engine(str(tiny_models["qwen2"]))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
    messages = [{"role": "system", "content": "You help."}, {"role": "user", "content": "北京天气？"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}]
    expected_messages = [messages[0], messages[1],
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "id": "call_1",
                              "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
                         {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}]
    prompt = qwen.render(expected_messages, tools)
    assert '"city": "北京"' in prompt and "<tool_response>" in prompt and "get_weather" in prompt
    with TestClient(create_app(qwen, ServeConfig())) as c:
        r = c.post("/v1/chat/completions", json={"model": qwen.name, "messages": messages, "tools": tools,
                                                 "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == qwen.count_tokens(prompt)
    assert r.json()["choices"][0]["message"]["content"] == qwen.generate([prompt], GenerationParams(3))[0].text


def test_prompt_is_the_one_tunelab_chat_renders_for_a_run(tiny_models, tmp_path):
    """A run trained with data.system: the server prompts exactly like `tunelab chat` (ChatSession) does."""

    from tunelab.inference.chat import ChatSession
    from tunelab.inference.hf import load_engine
    from tunelab.serving.app import create_app

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  system: 你是一个乐于助人的助手。\n", encoding="utf-8")
    (run / "run.json").write_text("{}", encoding="utf-8")
    (run / "final").symlink_to(tiny_models["llama"], target_is_directory=True)
    engine = load_engine(str(run))
    params = GenerationParams(max_new_tokens=4)
    prompt = ChatSession(engine, params=params).prompt("今天天气怎么样？")
    assert "乐于助人" in prompt
    expected = engine.generate([prompt], params)[0]
    with TestClient(create_app(engine, ServeConfig())) as c:
        body = {"model": "demo", "messages": [{"role": "user", "content": "今天天气怎么样？"}], "max_tokens": 4,
                "temperature": 0}
        reply = c.post("/v1/chat/completions", json=body).json()
        simple = c.post("/generate", json={"instruction": "今天天气怎么样？", "max_length": 2048,
                                           "temperature": 0}).json()
    assert reply["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert reply["choices"][0]["message"]["content"] == expected.text
    assert simple["output"].startswith(expected.text)


def test_template_refusal_is_a_400(tiny_models):
    """Mistral's template raises on non-alternating roles: the client gets the template's reason."""

    from tunelab.inference.hf import load_engine
    from tunelab.serving.app import create_app

    mistral = load_engine(str(tiny_models["mistral"]))
    assert isinstance(mistral, Engine)
    messages = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    with TestClient(create_app(mistral, ServeConfig())) as c:
        r = c.post("/v1/chat/completions", json={"model": mistral.name, "messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------------------ CLI
def test_serve_refuses_network_without_a_key(tiny_models, capsys, monkeypatch):
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    assert main(["serve", str(tiny_models["llama"]), "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err


def test_serve_config_from_yaml_and_flags(tmp_path):
    from tunelab.cli.main import build_parser
    from tunelab.cli.serve import serve_config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("serve:\n  port: 9001\n  api_keys: [sk-yaml]\n  max_queue: 5\n", encoding="utf-8")
    args = build_parser().parse_args(["serve", "m", "--config", str(cfg_file), "--api-key", "sk-flag",
                                      "--max-queue", "7"])
    cfg = serve_config(args)
    assert (cfg.port, cfg.max_queue, cfg.host) == (9001, 7, "127.0.0.1")
    assert cfg.api_keys == ["sk-yaml", "sk-flag"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tunelab_serve_runs_and_shuts_down_gracefully(tiny_models):
    port = free_port()
    cmd = [sys.executable, "-m", "tunelab.cli.main", "serve", str(tiny_models["llama"]), "--port", str(port),
           "--model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60}
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
            while httpx.get(url + "/health").json()["running"] == 0:
                assert not in_flight.done()
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)  # graceful: the request in flight still gets its answer
            reply = in_flight.result()
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        assert proc.wait(30) == 0
        output = proc.stdout.read()
        assert f"serving tiny on http://127.0.0.1:{port}/v1" in output
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------------------ tool calls
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


def test_tool_calls_are_parsed_in_each_family_format():
    from tunelab.serving.tools import parse_reply, safe_prefix

    names = {"get_weather"}
    hermes = parse_reply('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
                         '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
                         names)
    assert hermes.content == "Let me check." and len(hermes.calls) == 2
    assert json.loads(hermes.calls[0]["function"]["arguments"]) == {"city": "北京"}
    assert hermes.calls[0]["id"] != hermes.calls[1]["id"]
    mistral = parse_reply('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]', names)
    assert mistral.content is None and mistral.calls[0]["function"]["name"] == "get_weather"
    llama = parse_reply('{"name": "get_weather", "parameters": {"city": "Rome"}}', names)
    assert json.loads(llama.calls[0]["function"]["arguments"]) == {"city": "Rome"}
    # not declared, malformed, or no tools: text stays text
    assert not parse_reply('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', names).calls
    assert not parse_reply('<tool_call>{"name": "get_weather", "argum', names).calls
    assert not parse_reply('{"name": "get_weather"}', set()).calls
    # streaming: text is held back from where a call may begin
    assert safe_prefix("Sure. <tool") == len("Sure. ") and safe_prefix("Sure. <tool_call>{") == len("Sure. ")
    assert safe_prefix("no call here") == len("no call here") and safe_prefix('  {"name"') == 0


class ScriptedEngine:
    """The real engine for templates and token counts; a fixed reply instead of generation (a random tiny model
    cannot be made to write a tool call)."""

    def __init__(self, engine, reply: str):
        self.engine, self.reply = engine, reply
        self.name, self.max_context = engine.name, engine.max_context

    def render(self, messages, tools=None, add_generation_prompt=True):
        return self.engine.render(messages, tools, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def _completion(self, prompt: str):
        from tunelab.inference.engine import Completion

        return Completion(self.reply, self.count_tokens(prompt), self.count_tokens(self.reply), "stop")

    def generate(self, prompts, params):
        return [self._completion(prompt) for prompt in prompts]

    def stream(self, prompt, params, cancel=None):
        from tunelab.inference.engine import StreamEvent

        for i in range(0, len(self.reply), 3):
            yield StreamEvent(self.reply[i:i + 3])
        yield StreamEvent("", self._completion(prompt))


def test_chat_completions_return_structured_tool_calls(engine):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from tunelab.serving.app import create_app

    reply = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "上海"}}</tool_call>'
    app = create_app(ScriptedEngine(engine, reply), ServeConfig())
    body = {"model": engine.name, "messages": [{"role": "user", "content": "上海天气？"}], "tools": WEATHER,
            "max_tokens": 20}
    with TestClient(app) as c:
        plain = ChatCompletion.model_validate(c.post("/v1/chat/completions", json=body).json())
        streamed = c.post("/v1/chat/completions", json={**body, "stream": True})
        untouched = c.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).json()
    choice = plain.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "上海"}
    chunks = [ChatCompletionChunk.model_validate_json(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert text == "Checking." and [tc.function.name for tc in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert untouched["choices"][0]["message"]["content"] == reply
    assert untouched["choices"][0]["finish_reason"] == "stop"


def test_counting_tokens_while_a_batch_is_tokenized_is_safe(engine):
    """The server counts prompt tokens on worker threads while the engine pads a batch with the same tokenizer:
    without the engine's tokenizer lock the count could switch padding off under the batch (seen as a 500)."""
    import threading

    stop = threading.Event()

    def count():
        while not stop.is_set():
            engine.count_tokens("a short prompt")

    counter = threading.Thread(target=count)
    counter.start()
    try:
        prompts = ["hi", "a much longer prompt than the first one, to need padding"]
        for _ in range(20):
            engine.generate(prompts, GenerationParams(max_new_tokens=1, temperature=0))
    finally:
        stop.set()
        counter.join()
