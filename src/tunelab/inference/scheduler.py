"""Continuous (in-flight) batching over the model's KV cache: the one generation loop behind HFEngine.

Requests join the running batch at a token boundary (their prompts are prefilled together, packed into one row
without padding where the model's attention allows it (inference/prefill.py), then their cache rows are
left-padded and stacked onto the batch's) and leave it when they end, each with its own sampling parameters,
stop strings, token limit and cancel event. Requests that arrive during a prefill are prefilled next, before the
batch's next decode step, and a prompt that starts like the last one prefilled (the same system prompt, an earlier
turn) reuses that prompt's keys and values for the shared start and prefills only the rest. Every row gets
explicit position ids and an attention mask over its own tokens, so a request's greedy output does not depend on
what it is batched with (tested). An idle engine gathers a burst of arrivals (GATHER_S) into one prefill.

Why not transformers' `init_continuous_batching` / `generate_batch`: its paged cache takes no initial per-request
cache, so P-Tuning v2 prefixes (a trained KV cache in every layer) could not be applied, and tunelab needs per-row
stop strings and streaming callbacks; see docs/serving.md.

A P-Tuning v2 / prefix-tuning adapter is applied here at its root: every request's cache starts with the
adapter's trained prefix (`peft_model.get_prompt`), and the base model runs on it. peft's own `generate` skips the
prefix with a KV cache on transformers 5 (it answers like the base model; issue 12).
"""

from __future__ import annotations

import atexit
import inspect
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tunelab.inference.engine import Completion, GenerationParams
from tunelab.inference.prefill import attention_mask_for, fits_packing, pack_prompts, unpack_layers
from tunelab.inference.stopping import ends_with_stop, find_stop

log = logging.getLogger(__name__)

PREFILL_ROUNDS = 2  # prefills in a row before the running batch's next decode step (requests arriving meanwhile)
IDLE_EXIT_S = 0.5  # the loop thread ends after this long without work; the next request starts a fresh one
# an idle engine's first request waits while more keep arriving (each within GATHER_GAP_S of the last, for at most
# GATHER_S in all), so a burst of requests is prefilled in one forward instead of one alone and then the rest
GATHER_GAP_S = 0.01
GATHER_S = 0.03


@dataclass
class Request:
    """One prompt in flight; `on_token` (optional) sees the generated ids after every step and `on_done` (optional)
    is called once it has ended (result or error set), both on the loop thread."""

    ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    stops: list[str]
    cancel: tuple[threading.Event, ...] = ()  # any of them set: the row leaves at the next token
    on_token: Callable[[list[int]], None] | None = None
    stop_check: object | None = None  # transformers StopStringCriteria for `stops` (stopping.StopStrings)
    on_done: Callable[[], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: BaseException | None = None
    out: list[int] = field(default_factory=list)
    pos: int = 0  # position id of the next token fed to the model
    hit_stop: bool = False
    generator: torch.Generator | None = None

    def cancelled(self) -> bool:
        return any(c.is_set() for c in self.cancel)

    def end(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    def wait(self) -> Completion:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Scheduler:
    """Owns the model on one loop thread at a time; `submit` may be called from any thread.

    The thread ends when it has had no work for `idle_exit_s` seconds (None: never) and the next `submit` starts a
    fresh one: with 2 torch threads on a loaded 2-core machine, a generation thread that had waited idle generated
    1.5x slower than a fresh thread (docs/serving.md, Threads)."""

    def __init__(self, model, tokenizer, stop_ids: set[int], max_batch_size: int = 8, threads: int | None = None):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_batch_size = max(1, max_batch_size)
        # torch's thread count is per OS thread: without a setting, the loop thread takes its creator's count
        self.threads = threads or torch.get_num_threads()
        self.prefix_model = model if _is_prefix_model(model) else None
        self.model = model.get_base_model() if self.prefix_model is not None else model
        self.device = next(model.parameters()).device
        self.config = self.model.config  # its attention implementation and sliding window decide packed prefill
        self.dtype = getattr(self.model, "dtype", torch.float32)
        # transformers 5.24 renamed the forward argument past_key_values to cache (the old name warns until 5.40)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._pending: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._rows: list[Request] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (rows, cache length): 1 where a row has a real token
        self._closed = False
        # the keys/values of the last prompt prefilled: a newcomer sharing its start (the system prompt, an earlier
        # turn of the conversation) prefills only the rest. Off for prefix adapters (their cache starts with it).
        self.reuse_prompts = self.prefix_model is None
        self._last_prompt: _HeldPrompt | None = None
        self.reused_tokens = 0  # prompt tokens taken from it instead of prefilled (for tests and the bench)
        self.packed_prefill = True  # newcomers' prompts in one row without padding, where the model allows it
        self.packed_prefills = 0  # prefills run packed (for tests and the bench)
        self.gather_s, self.gather_gap_s = GATHER_S, GATHER_GAP_S
        self.steps = 0  # decode steps run, and the most rows one of them carried (for tests and the bench)
        self.largest_batch = 0
        self.idle_exit_s: float | None = IDLE_EXIT_S
        self.threads_started = 0
        self._lock = threading.Lock()  # submit vs a loop thread deciding to end
        self._thread: threading.Thread | None = None
        self._idle = False
        # a daemon thread still inside torch when the interpreter finalizes aborts the process ("terminate called
        # without an active exception", exit 134 after a chat's /exit): end the loop before that
        atexit.register(_close_at_exit, weakref.ref(self))

    def submit(self, request: Request) -> Request:
        with self._lock:
            if self._closed and self._thread is None:  # closed for good: nothing would ever read it
                self._fail(request, RuntimeError("the engine was closed"))
                return request
            self._pending.put(request)
            if self._thread is None:
                self._start_thread()
        return request

    def close(self, wait: float = 0.0) -> None:
        """End the loop (requests still in flight fail); with `wait`, block up to that many seconds until it ended.

        Closing never starts a thread: when no loop runs (it ended after idling), what is pending fails right here.
        A thread started while the interpreter finalizes (an engine collected at exit) aborts the process."""
        with self._lock:
            thread = self._thread
            if thread is None:
                self._closed = True
                while not self._pending.empty():
                    self._fail(self._pending.get(), RuntimeError("the engine was closed"))
                return
            self._pending.put(None)
        if wait and threading.current_thread() is not thread:
            thread.join(wait)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunelab-scheduler", daemon=True)
        self.threads_started += 1
        _LOOP_THREADS.add(self._thread)
        self._thread.start()

    # ------------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # torch's count is per OS thread: each loop thread sets its own
        while not self._closed:
            if self._idle and not self._rows:
                with self._lock:  # submit starts a new thread only once this one has given up its place
                    if self._pending.empty():
                        self._thread = None
                        return
                self._idle = False
            try:
                with torch.inference_mode():
                    self._admit()
                    if self._rows:
                        self._decode()
            except BaseException as e:
                log.exception("generation step failed")
                self._fail_all(e)
        self._fail_all(RuntimeError("the engine was closed"))
        with self._lock:  # what is submitted later starts a thread that fails it here too
            self._thread = None
            while not self._pending.empty():
                self._fail(self._pending.get(), RuntimeError("the engine was closed"))

    def _admit(self) -> None:
        """Prefill the requests that arrived, and those that arrived meanwhile, before the batch's next step.

        A newcomer's first token then waits for the prefill in progress, not also for a decode step of everything
        running; `PREFILL_ROUNDS` bounds how long running rows wait for newcomers."""
        for _ in range(PREFILL_ROUNDS):
            joiners = self._take_pending(block=not self._rows)
            if not joiners:
                return
            try:
                self._prefill(joiners)
            except BaseException as e:  # not rows yet: _fail_all would not reach them
                for r in joiners:
                    self._fail(r, e)
                raise

    def _take_pending(self, block: bool) -> list[Request]:
        """Up to the batch's free room of pending requests; with `block` (nothing running) wait for the first,
        then gather a burst (`gather_s`)."""
        room = self.max_batch_size - len(self._rows)
        taken: list[Request] = []
        gather_until = None
        while len(taken) < room:
            if not block:
                wait, timeout = False, None
            elif gather_until is None:
                wait, timeout = True, self.idle_exit_s
            else:
                wait, timeout = True, min(self.gather_gap_s, gather_until - time.monotonic())
                if timeout <= 0:
                    break
            try:
                item = self._pending.get(block=wait, timeout=timeout)
            except queue.Empty:
                self._idle = block and not taken
                break
            if item is None:
                self._closed = True
                for r in taken:
                    self._fail(r, RuntimeError("the engine was closed"))
                return []
            if item.cancelled():
                self._finish(item)
                continue
            taken.append(item)
            if block and gather_until is None:
                gather_until = time.monotonic() + self.gather_s
        return taken

    @staticmethod
    def _fail(r: Request, error: BaseException) -> None:
        if r is not None and not r.done.is_set():
            r.error = error
            r.end()

    def _fail_all(self, error: BaseException) -> None:
        for req in self._rows:
            self._fail(req, error)
        self._rows, self._cache, self._mask = [], None, None

    # ---------------------------------------------------------------------------------------------- model calls
    def _prefill(self, joiners: list[Request]) -> None:
        """Run the joiners' prompts together, sample their first tokens (streamed at once), add them to the batch.

        Each row attends to the start cache's columns its prompt shares (adapter prefix, `held[i]` tokens of the
        last prompt) and to its own tokens. Packed (one row, no padding: inference/prefill.py) where the model's
        attention allows it, else left-padded."""
        start, prefix_len, held = self._start_layers(joiners)
        seen = [prefix_len + h for h in held]
        rest = [r.ids[h:] for r, h in zip(joiners, held)]
        longest = max(s + len(t) for s, t in zip(seen, rest))
        if self.packed_prefill and fits_packing(self.config, longest):
            logits, layers, mask = self._packed_forward(start, seen, rest)
            self.packed_prefills += 1
        else:
            logits, layers, mask = self._padded_forward(start, prefix_len, held, rest)
        for r in joiners:
            r.pos = prefix_len + len(r.ids)
            if r.params.seed is not None:
                r.generator = torch.Generator(device=self.device).manual_seed(r.params.seed)
        if self.reuse_prompts:
            self.reused_tokens += sum(held)
            self._last_prompt = _HeldPrompt.of(joiners[-1].ids, layers, mask, row=len(joiners) - 1)
        self._merge(layers, mask, joiners)
        self._advance(joiners, logits)

    def _packed_forward(self, start, seen: list[int], rest: list[list[int]]):
        """(first-token logits per row, cache layers one row per request left-padded, their mask) of one packed
        forward over every prompt's unseen tokens."""
        packed = pack_prompts(rest, seen, start[0][0].shape[2] if start else 0)
        mask = attention_mask_for(packed.mask, self.config._attn_implementation, self.dtype)
        out = self.model(input_ids=packed.ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=packed.positions.to(self.device), use_cache=True,
                         logits_to_keep=packed.last.to(self.device), **{self._cache_arg: _plain_cache(start)})
        layers = unpack_layers(_layers(_returned_cache(out)), packed)
        return out.logits[0], layers, packed.row_mask.to(self.device)

    def _padded_forward(self, start, prefix_len: int, held: list[int], rest: list[list[int]]):
        """As `_packed_forward`, with the prompts left-padded to one width: the cache columns are
        [adapter prefix][the start of the last prompt][the rest of each prompt, left-padded]."""
        n = len(rest)
        cache = _plain_cache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in start])
        begin = prefix_len + max(held)
        width = max(len(t) for t in rest)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, begin + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for i, (h, tokens) in enumerate(zip(held, rest)):
            ids[i, width - len(tokens):] = torch.tensor(tokens)
            mask[i, prefix_len:prefix_len + h] = 1
            mask[i, begin + width - len(tokens):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, begin:]
        mask = mask.to(self.device)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=positions.to(self.device),
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :], _layers(_returned_cache(out)), mask

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.out[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.pos] for r in rows], device=self.device)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=self.device)], 1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: self._cache})
        self._cache = _returned_cache(out)
        for r in rows:
            r.pos += 1
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(rows))
        self._advance(rows, out.logits[:, -1, :])

    def _start_layers(self, joiners: list[Request]):
        """The one-row cache layers the joiners' prefill continues (none: empty), the adapter prefix's length, and
        per row how many of its prompt tokens are already in them (at least one token of every prompt is left to
        prefill: it gives the logits)."""
        n = len(joiners)
        if self.prefix_model is not None:
            prompt = self.prefix_model.get_prompt(batch_size=1)
            return _layers(prompt), self.prefix_model.peft_config["default"].num_virtual_tokens, [0] * n
        last = self._last_prompt if self.reuse_prompts else None
        held = [min(last.shared(r.ids), len(r.ids) - 1) if last is not None else 0 for r in joiners]
        if not any(held):
            return [], 0, [0] * n
        width = max(held)  # every row gets these columns; the mask hides those past a row's own count
        return [(k[:, :, :width], v[:, :, :width]) for k, v in last.layers], 0, held

    # ------------------------------------------------------------------------------------------- cache rows
    def _merge(self, layers, mask: torch.Tensor, joiners: list[Request]) -> None:
        if self._cache is None:
            self._cache, self._mask, self._rows = _plain_cache(layers), mask, list(joiners)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = [(torch.cat([_pad_left(k0, width), _pad_left(k1, width)]),
                   torch.cat([_pad_left(v0, width), _pad_left(v1, width)]))
                  for (k0, v0), (k1, v1) in zip(_layers(self._cache), layers)]
        self._cache = _plain_cache(layers)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self._rows += joiners

    def _drop_rows(self, finished: list[Request]) -> None:
        keep = [i for i, r in enumerate(self._rows) if r not in finished]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns padding every remaining row can go
        self._mask = mask[:, first:]
        self._cache = _plain_cache([(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                                    for k, v in _layers(self._cache)])
        self._rows = [self._rows[i] for i in keep]

    # ---------------------------------------------------------------------------------------- tokens and stops
    def _advance(self, rows: list[Request], logits: torch.Tensor) -> None:
        finished = []
        for i, r in enumerate(rows):
            token = _pick(logits[i:i + 1].float(), r)
            r.out.append(token)
            if token in self.stop_ids or ends_with_stop(r.stop_check, r.out):
                r.hit_stop = True
            if r.on_token is not None:
                r.on_token(list(r.out))
            if r.hit_stop or r.cancelled() or len(r.out) >= r.max_new_tokens:
                finished.append(r)
        for r in finished:
            self._finish(r)
        if finished:
            self._drop_rows(finished)

    def _finish(self, r: Request) -> None:
        ids = r.out[:-1] if r.out and r.hit_stop and r.out[-1] in self.stop_ids else r.out
        text = self._decode_text(ids)
        cut = find_stop(text, r.stops)
        if cut >= 0:
            text = text[:cut]
        reason = "stop" if r.hit_stop or r.cancelled() else "length"
        r.result = Completion(text, len(r.ids), len(r.out), reason)
        r.end()

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class _HeldPrompt:
    """A prompt's tokens and their keys/values (one row, every layer), to start the next prompts that share its
    beginning. A token's keys and values depend only on the tokens before it, so reusing them changes nothing."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, ids: list[int], layers, mask: torch.Tensor, row: int) -> _HeldPrompt:
        cols = mask[row].nonzero().squeeze(1)  # the row's own tokens, without the padding of the batch
        return cls(list(ids), [(k[row:row + 1, :, cols], v[row:row + 1, :, cols]) for k, v in layers])

    def shared(self, ids: list[int]) -> int:
        n = min(len(ids), len(self.ids))
        for i in range(n):
            if ids[i] != self.ids[i]:
                return i
        return n


def _pick(logits: torch.Tensor, r: Request) -> int:
    """The next token of one row: repetition penalty, then greedy or temperature/top-k/top-p sampling."""
    p = r.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.ids) | set(r.out)), device=logits.device)
        scores = logits[0, seen]
        logits[0, seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
    if p.temperature <= 0:
        return int(logits.argmax(-1))
    logits = logits / p.temperature
    if p.top_k and p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > p.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=r.generator))


def _is_prefix_model(model) -> bool:
    config = getattr(model, "peft_config", None)
    return bool(config) and getattr(config.get("default"), "is_prompt_learning", False)


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _plain_cache(layers):
    """A DynamicCache of full (not sliding) layers: the attention mask, not the cache, bounds what a row sees."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _close_at_exit(ref: weakref.ref) -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.close(wait=10.0)


# Every loop thread, until it has ended. A closed engine's thread can outlive its scheduler: when the engine is dropped
# (`del engine` after a demo's last answer) the thread holds the last reference, so the scheduler, its KV cache and
# its tensors are freed in that thread after the loop returns, and `_close_at_exit`'s weak reference is gone. If the
# interpreter finalizes meanwhile, the thread is stopped inside a tensor's dealloc: "terminate called without an
# active exception", exit 134 after a successful `tunelab demo` (caught under gdb). Joined at exit, after every
# scheduler's own close (atexit runs in reverse order of registration, and this one is registered first).
_LOOP_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def join_loop_threads(timeout: float = 10.0) -> None:
    """Wait for every generation loop thread that is still alive (they end once closed or idle)."""
    for thread in list(_LOOP_THREADS):
        if thread is not threading.current_thread():
            thread.join(timeout)


atexit.register(join_loop_threads)
