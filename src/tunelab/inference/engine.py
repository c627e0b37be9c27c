"""The one inference interface used by chat, evaluation, serving and the web UI (implementations: hf.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from tunelab.registry import Registry


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class EngineOptions:
    """How an engine loads and runs a model: what `load_engine` and every registered engine's `load` take.

    Chat, evaluation, serving and the web UI fill it from their config (model.device/dtype, serve.max_batch_size,
    train.threads) or flags; `dataclasses.replace(options, merge=True)` changes one option.
    """

    device: str = "auto"  # model.device: auto picks cuda, mps, cpu
    dtype: str = "auto"  # model.dtype
    template: str | None = None  # overrides the recorded chat template (a registered name or a .jinja path)
    merge: bool = False  # fold a LoRA adapter into the weights after loading (faster, same outputs)
    max_batch_size: int = 8  # rows generated together (1: no batching); serve.max_batch_size
    threads: int | None = None  # torch threads of the generation thread (None: the count in force when loading)
    quantize: str = "none"  # model.quantize: int8 / nf4 loads the base through bitsandbytes (inference only)


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


# ------------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class EngineKind:
    """One inference backend (`tunelab serve --engine NAME`): how to load it and what it can do.

    `load(model, adapter, options: EngineOptions) -> Engine` checks that the backend can run here
    (a clear refusal before anything is loaded) and loads a run, adapter, folder, hub id or GGUF.
    """

    name: str
    load: Callable[[str, str | None, EngineOptions], Engine]
    description: str = ""
    supports_streaming: bool = False  # text streamed as it is generated (False: the whole answer as one event)
    supports_batching: bool = False  # several requests generated together


ENGINES: Registry[EngineKind] = Registry("inference engine")


def register_engine(kind: EngineKind) -> EngineKind:
    return ENGINES.register(kind)


def get_engine(name: str) -> EngineKind:
    return ENGINES.get(name)


def known_engines() -> list[str]:
    """Registered engine names; the first is the default."""
    return ENGINES.names()


def engine_kinds() -> list[EngineKind]:
    return ENGINES.entries()


def _load_hf(model: str, adapter: str | None, options: EngineOptions) -> Engine:
    from tunelab.inference.hf import inference_threads, load_engine

    inference_threads(options.threads, model)  # the generation thread then runs with the count set here
    return load_engine(model, adapter, options)


def _load_vllm(model: str, adapter: str | None, options: EngineOptions) -> Engine:
    from tunelab.inference.vllm import check_vllm, load_vllm_engine

    check_vllm()
    return load_vllm_engine(model, adapter, template=options.template)


register_engine(EngineKind("hf", _load_hf, "transformers with continuous batching (default)",
                           supports_streaming=True, supports_batching=True))
register_engine(EngineKind("vllm", _load_vllm, "vLLM on a CUDA GPU", supports_batching=True))
