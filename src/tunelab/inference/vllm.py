"""The vLLM engine (CUDA only): the Engine protocol over `vllm.LLM`, with tunelab's template, stops and adapters.

Only the request/response mapping is tested here (no CUDA on the test machines); `check_vllm` refuses clearly
where vLLM or CUDA is missing. Prompts are rendered with the same recorded template as HFEngine.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from typing import Any

from tunelab.errors import TunelabError
from tunelab.inference.engine import Completion, GenerationParams, StreamEvent


def check_vllm() -> None:
    """Raise a TunelabError naming what is missing for `--engine vllm` (checked before loading anything)."""
    if importlib.util.find_spec("vllm") is None:
        raise TunelabError("--engine vllm needs the vllm package and a CUDA GPU: pip install vllm (Linux + CUDA); "
                           "use --engine hf (the default) on this machine")
    import torch

    if not torch.cuda.is_available():
        raise TunelabError("--engine vllm needs a CUDA GPU, and torch sees none here; use --engine hf (the default)")


def sampling_params(params: GenerationParams, stop_ids: set[int], factory=None):
    """tunelab's GenerationParams -> vllm.SamplingParams (`factory` replaces the class in tests)."""
    if factory is None:
        from vllm import SamplingParams as factory
    return factory(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,  # 0: greedy in vLLM too
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,  # vLLM turns top-k off with -1
        repetition_penalty=params.repetition_penalty,
        stop=list(params.stop) or None,
        stop_token_ids=sorted(stop_ids),  # the template's end-of-turn tokens, as HFEngine stops on them
        seed=params.seed,
        skip_special_tokens=True,
    )


def to_completion(output) -> Completion:
    """A vllm.RequestOutput -> Completion (finish_reason "length" stays; stop, eos and abort are "stop")."""
    choice = output.outputs[0]
    reason = "length" if choice.finish_reason == "length" else "stop"
    return Completion(choice.text, len(output.prompt_token_ids), len(choice.token_ids), reason)


class VLLMEngine:
    """vllm.LLM behind the Engine protocol; a LoRA adapter goes through vLLM's enable_lora."""

    def __init__(self, llm, template, name: str, stop_ids: set[int], max_context: int, lora_path: str | None = None):
        self.llm = llm
        self.template = template
        self.name = name
        self.stop_ids = stop_ids
        self.max_context = max_context
        self.tokenizer = llm.get_tokenizer()
        self._lora = None
        if lora_path is not None:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adapter", 1, lora_path)
        self._lock = threading.Lock()  # vllm.LLM batches within one call; calls themselves are not reentrant

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        with self._lock:
            outputs = self.llm.generate(prompts, sampling_params(params, self.stop_ids), lora_request=self._lora,
                                        use_tqdm=False)
        return [to_completion(o) for o in outputs]

    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """vllm.LLM has no token stream: the whole answer comes as one event (token streaming needs AsyncLLM)."""
        [done] = self.generate([prompt], params)
        yield StreamEvent(done.text, done)


def load_vllm_engine(model: str, adapter: str | None = None, *, template: str | None = None) -> VLLMEngine:
    """Load `model` (run dir, adapter, exported folder, hub id) into vLLM with the recorded chat template."""
    check_vllm()
    from vllm import LLM

    from tunelab.inference.hf import _max_context, _stop_token_ids
    from tunelab.inference.template import load_template
    from tunelab.models.load import load_tokenizer
    from tunelab.runs.artifacts import resolve_artifact

    art = resolve_artifact(model, adapter)
    if art.adapter_path is not None and not (art.adapter_path / "adapter_model.safetensors").is_file():
        raise TunelabError(f"{art.adapter_path}: vLLM loads LoRA adapters only (adapter_model.safetensors)")
    tokenizer = load_tokenizer(art.model_cfg, path=art.tokenizer_path)
    enable_thinking = art.run_config.data.enable_thinking if art.run_config is not None else None
    chat_template = load_template(tokenizer, template, art.template_file, enable_thinking)
    llm = LLM(model=str(art.base_path), tokenizer=str(art.tokenizer_path), enable_lora=art.adapter_path is not None)
    hf_config = llm.llm_engine.model_config.hf_config

    class _Net:  # what _stop_token_ids and _max_context read from a transformers model
        config = hf_config
        generation_config = hf_config

    lora = str(art.adapter_path) if art.adapter_path is not None else None
    return VLLMEngine(llm, chat_template, art.name, _stop_token_ids(_Net, tokenizer, chat_template),
                      _max_context(_Net, tokenizer), lora)
