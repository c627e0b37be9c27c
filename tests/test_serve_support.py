"""Support for the serving tests (no tests here): a real uvicorn server on a free loopback port, a slowed real engine."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from tunelab.inference.engine import GenerationParams


@contextmanager
def live_server(app):
    """Run `app` under uvicorn in a thread on 127.0.0.1:<free port>; yield its base URL; shut it down after."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class SlowEngine:
    """The real engine, with a delay before each batch and each streamed event.

    Only used to make requests pile up (queue-full 503) and to keep a stream running long enough for the client
    to leave; every token still comes from the real HFEngine.
    """

    def __init__(self, engine, delay_s: float):
        self.engine = engine
        self.delay_s = delay_s
        self.name = engine.name
        self.max_context = engine.max_context
        self.cancels: list = []
        self.streamed_events = 0
        self.generated_prompts: list[str] = []
        self.stream_closed = threading.Event()

    def render(self, messages, tools=None, add_generation_prompt=True):
        return self.engine.render(messages, tools, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def generate(self, prompts: list[str], params: GenerationParams):
        time.sleep(self.delay_s)
        self.generated_prompts += prompts
        return self.engine.generate(prompts, params)

    def stream(self, prompt: str, params: GenerationParams, cancel=None):
        self.cancels.append(cancel)
        try:
            for event in self.engine.stream(prompt, params, cancel=cancel):
                time.sleep(self.delay_s)
                self.streamed_events += 1
                yield event
        finally:
            self.stream_closed.set()
