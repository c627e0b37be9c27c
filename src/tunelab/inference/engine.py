"""The one inference interface used by chat, evaluation, serving and the web UI (implementations: hf.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class StreamEvent:
    """A piece of streamed text; the last event has `completion` set (its delta may be empty)."""

    delta: str
    completion: Completion | None = None


@runtime_checkable
class Engine(Protocol):
    name: str  # what /v1/models and the UI report
    max_context: int  # prompt + completion tokens the model accepts

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, with the model's recorded training template."""

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        """Batched generation (left padding, KV cache) for rendered prompts."""

    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Yield text as it is produced; stops early when `cancel` is set."""
