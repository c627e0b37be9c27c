"""The transformers inference engine behind chat, evaluation, serving and the web UI (Engine in engine.py).

`load_engine` accepts a run directory, an adapter, an exported or HF folder, a hub id or a GGUF file, and renders
prompts with the chat template recorded in the artifact, so the model is prompted exactly as it was trained.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.inference.engine import Completion, EngineOptions, GenerationParams, StreamEvent
from tunelab.inference.scheduler import Request, Scheduler
from tunelab.inference.stopping import StopStrings, safe_prefix
from tunelab.inference.template import load_template
from tunelab.models.load import end_of_turn_tokens, load_model, load_tokenizer, pick_device
from tunelab.runs.artifacts import Artifact, resolve_artifact

log = logging.getLogger(__name__)


class HFEngine:
    """A causal LM (optionally with a PEFT adapter) and its tokenizer; safe to call from several threads.

    Every call goes to one Scheduler thread that batches whatever is in flight (`options.max_batch_size` rows, 1
    turns batching off) with `options.threads` intra-op torch threads (None: the count in force in the creating
    thread).
    """

    def __init__(self, model, tokenizer, template, name: str, artifact: Artifact | None = None,
                 options: EngineOptions | None = None):
        options = options or EngineOptions()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        self.template = template
        self.name = name
        self.artifact = artifact
        self.device = next(model.parameters()).device
        self.max_context = _max_context(model, tokenizer)
        self.stop_ids = _stop_token_ids(model, tokenizer, template)
        # end-of-turn strings of the template that are not one token (e.g. "### Human:") are matched as text
        vocab = tokenizer.get_vocab()
        self.text_stops = [s for s in getattr(template, "stop_strings", ()) if s and s not in vocab]
        # a fast tokenizer call first sets padding/truncation on the shared Rust tokenizer: a count_tokens on
        # another thread (the server counts while it generates) could unset the padding of a batch mid-call
        self._tokenizer_lock = threading.Lock()
        self._stop_strings = StopStrings(tokenizer)  # built in the submitting thread, not the generation loop
        self.scheduler = Scheduler(self.model, tokenizer, self.stop_ids, options.max_batch_size, options.threads)
        self.threads = self.scheduler.threads

    # ------------------------------------------------------------------------------------------------ prompts
    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        """Completions for rendered prompts (they already hold bos and the template's tokens); they join the
        running batch with whatever else is generating (continuous batching, scheduler.py)."""
        requests = [self._submit(p, params) for p in prompts]
        return [r.wait() for r in requests]

    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Yield text deltas as tokens arrive; the last event carries the Completion. Closing the iterator or
        setting `cancel` stops generation after the current token.

        Not transformers' TextIteratorStreamer: it serves one `generate` call (the scheduler's batch is shared
        and continuous), and it flushes text up to the last space, so it shows the start of a stop string that
        the final answer then cuts off ("Sure. ###" for the stop "### Human:"); here `safe_prefix` holds that back,
        so the deltas always add up to the final text (tests/test_inference_stopping.py)."""
        steps: queue.SimpleQueue = queue.SimpleQueue()
        abandon = threading.Event()
        request = self._submit(prompt, params, cancel=(abandon,) if cancel is None else (cancel, abandon),
                               on_token=steps.put, on_done=lambda: steps.put(None))
        shown = ""
        try:
            while True:
                item = steps.get()
                while item is not None and not steps.empty():  # behind: only the newest ids matter
                    item = steps.get()
                if item is None:
                    final = request.wait()
                    if not final.text.startswith(shown):
                        log.warning("streamed text diverged from the final text (tokenizer decode is not prefix-stable)")
                    yield StreamEvent(final.text[len(shown):] if final.text.startswith(shown) else "", final)
                    return
                text = safe_prefix(self._partial_text(item), self._stops(params))
                if len(text) > len(shown) and text.startswith(shown):
                    yield StreamEvent(text[len(shown):])
                    shown = text
        finally:
            abandon.set()  # the consumer left early (client gone): the row leaves the batch at the next token

    def _submit(self, prompt: str, params: GenerationParams, cancel=(), on_token=None, on_done=None) -> Request:
        with self._tokenizer_lock:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = self.max_context - len(ids)
        if room < 1:
            raise TunelabError(f"prompt has {len(ids)} tokens; the model accepts {self.max_context} in all")
        stops = self._stops(params)
        request = Request(ids, params, min(params.max_new_tokens, room), stops, cancel, on_token,
                          stop_check=self._stop_strings.criteria(stops), on_done=on_done)
        return self.scheduler.submit(request)

    def _partial_text(self, ids: list[int]) -> str:
        for i, tok in enumerate(ids):
            if tok in self.stop_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def close(self) -> None:
        """End the generation thread (requests still in flight fail) and wait for it, up to 10 s."""
        self.scheduler.close(wait=10.0)

    def __del__(self) -> None:  # an engine dropped by the web UI's cache must not leave its thread and model behind
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()

    def _stops(self, params: GenerationParams) -> list[str]:
        return list(dict.fromkeys([*params.stop, *self.text_stops]))


def _max_context(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    if 0 < (tokenizer.model_max_length or 0) < 10_000_000:
        limits.append(tokenizer.model_max_length)
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else 2048


def _stop_token_ids(model, tokenizer, template) -> set[int]:
    """eos of the model and tokenizer plus every end-of-turn token the template emits (e.g. <|eot_id|>)."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    names = end_of_turn_tokens(tokenizer) | set(getattr(template, "stop_strings", []) or [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[n] for n in names if n in vocab)
    return {int(i) for i in ids if i is not None}


def load_engine(model: str, adapter: str | None = None, options: EngineOptions | None = None) -> HFEngine:
    """Load `model` (run dir, adapter, exported/HF folder, hub id or .gguf) for inference.

    `options` (engine.EngineOptions): device and dtype; `quantize` int8/nf4 loads the base through bitsandbytes
    (inference only); `template` overrides the recorded chat template; `merge` folds a LoRA adapter into the
    weights after loading (faster generation, same outputs); `max_batch_size` rows generated together; `threads` of the generation thread (None: the count in force, see inference_threads).
    """
    options = options or EngineOptions()
    art = resolve_artifact(model, adapter, device=options.device, dtype=options.dtype)
    if options.quantize != "none":  # bitsandbytes int8/nf4 base for inference only (models/quantized.py)
        art.model_cfg.quantize = options.quantize
    tokenizer = load_tokenizer(art.model_cfg, path=art.tokenizer_path)
    net = load_model(art.model_cfg, path=art.base_path)
    if art.adapter_path is not None:
        net = apply_adapter(net, art.adapter_path, tokenizer, merge=options.merge)
    enable_thinking = art.run_config.data.enable_thinking if art.run_config is not None else None
    chat_template = load_template(tokenizer, options.template, art.template_file, enable_thinking)
    log.info("loaded %s on %s (%s)", art.name, pick_device(art.model_cfg.device), next(net.parameters()).dtype)
    return HFEngine(net, tokenizer, chat_template, art.name, art, options)


def inference_threads(threads: int | None = None, model: str | None = None) -> int:
    """Set torch's threads for this process as training does and return the count in force.

    `threads` None: the `train.threads` of `model` when it is a run directory, else training's default (one per
    usable core, or torch's choice when OMP_NUM_THREADS is set). Chat, eval, serve and the web UI call this before
    loading; the engine's generation thread then runs with the same count (docs/serving.md has the measurements).
    """
    from tunelab.training.speed import cpu_threads

    if threads is None and model is not None:
        threads = _run_threads(model)
    n = cpu_threads(threads)
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _run_threads(model: str) -> int | None:
    from tunelab.runs.read import read_run_config
    from tunelab.runs.rundir import is_run_dir

    path = Path(model).expanduser()
    return read_run_config(path).train.threads if is_run_dir(path) else None


def apply_adapter(model, adapter_path: Path, tokenizer=None, merge: bool = False):
    """Wrap `model` with the PEFT adapter in `adapter_path` (inference mode), optionally merged."""
    from peft import PeftModel

    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # training added tokens; the adapter saved their rows
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=False)
    except Exception as e:
        raise TunelabError(f"cannot apply the adapter in {adapter_path} to this base model: {e}") from e
    if merge and not peft_model.peft_config["default"].is_prompt_learning:  # prefix tuning cannot merge
        return peft_model.merge_and_unload()
    return peft_model
