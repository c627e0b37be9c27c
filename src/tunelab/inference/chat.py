"""A multi-turn conversation over any Engine: used by `tunelab chat`, the export summary and the web UI."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tunelab.inference.engine import Completion, Engine, GenerationParams, StreamEvent


@dataclass
class ChatSession:
    """Keeps the turns; each `ask` renders the whole conversation with the engine's training template."""

    engine: Engine
    system: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    history: list[dict[str, str]] = field(default_factory=list)
    last_stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.system is None:  # a run trained with data.system answers best with that same system prompt
            run_config = getattr(getattr(self.engine, "artifact", None), "run_config", None)
            self.system = run_config.data.system if run_config is not None else None

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.history
        if user_text is not None:
            msgs.append({"role": "user", "content": user_text})
        return msgs

    def clear(self) -> None:
        self.history.clear()

    def prompt(self, user_text: str) -> str:
        """The rendered prompt; the oldest turns are dropped when it would not leave room for the answer."""
        prompt = self.engine.render(self.messages(user_text))
        budget = self.engine.max_context - self.params.max_new_tokens
        while self.history and self.engine.count_tokens(prompt) > budget:
            del self.history[:2]  # one user turn and its answer
            prompt = self.engine.render(self.messages(user_text))
        return prompt

    def ask_stream(self, user_text: str, cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Stream the answer to `user_text`; the turn is remembered once the answer is complete."""
        start = time.perf_counter()
        first: float | None = None
        for event in self.engine.stream(self.prompt(user_text), self.params, cancel=cancel):
            if first is None and event.delta:
                first = time.perf_counter()
            if event.completion is not None:
                self._remember(user_text, event.completion, start, first)
            yield event

    def ask(self, user_text: str) -> Completion:
        completion = None
        for event in self.ask_stream(user_text):
            completion = event.completion or completion
        assert completion is not None
        return completion

    def _remember(self, user_text: str, completion: Completion, start: float, first: float | None) -> None:
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": completion.text}]
        elapsed = time.perf_counter() - start
        self.last_stats = {
            "completion_tokens": completion.completion_tokens,
            "seconds": elapsed,
            "tokens_per_s": completion.completion_tokens / elapsed if elapsed > 0 else 0.0,
            "first_token_s": (first - start) if first is not None else elapsed,
        }
