"""Deployment stage: runs generation off the event loop, grouping concurrent requests into one engine call.

Non-streaming requests wait in a bounded queue; a dispatcher thread takes the oldest request and every queued
request with the same generation parameters (up to `max_batch_size` prompts) and hands them to the engine as one
`engine.generate` call on a pool thread, so the next group is handed over while this one runs. Streaming requests
each get their own pool thread (at most `max_batch_size` at once) and stop when the client goes away. The HF
engine batches everything in flight, streaming or not, at token boundaries (tunelab.inference.scheduler).
A full queue is refused at once (the app answers 503 with Retry-After) instead of letting latency grow without
bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tunelab.inference.engine import Completion, Engine, GenerationParams, StreamEvent

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later."""


class ShuttingDownError(RuntimeError):
    """The server is stopping and takes no new work."""


@dataclass(eq=False)  # identity: jobs live in sets and are removed from queues
class _Job:
    prompts: list[str]
    params: GenerationParams
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


_unique = itertools.count()


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys can share one `engine.generate` call and get the answers they would get alone.

    Greedy decoding ignores top_p, top_k and the seed. A seeded sampling request runs in its own call, so its
    random stream (and hence its output) does not depend on what other clients happen to send.
    """
    if params.temperature == 0:
        sampling: tuple = ("greedy",)
    elif params.seed is not None:
        sampling = ("seeded", next(_unique))
    else:
        sampling = ("sample", params.temperature, params.top_p, params.top_k)
    return (params.max_new_tokens, params.repetition_penalty, tuple(params.stop), *sampling)


class Batcher:
    """Owns every call into the engine; the async methods are called from the server's event loop."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, max_queue: int = 64, batch_wait_s: float = 0.005):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running_prompts = 0
        self._streams_waiting = 0
        self._streams_running = 0
        self._stream_cancels: set[threading.Event] = set()
        self._open_streams: dict[threading.Event, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._running_jobs: set[_Job] = set()
        self._draining = False  # SIGTERM: no new work; what runs may finish until the shutdown timeout
        self._stream_slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # engine.generate calls made, and the most prompts one of them carried
        self.largest_batch = 0
        self._stream_pool = ThreadPoolExecutor(max_batch_size, thread_name_prefix="tunelab-stream")
        self._batch_pool = ThreadPoolExecutor(max_batch_size, thread_name_prefix="tunelab-batch")
        self._worker = threading.Thread(target=self._work, name="tunelab-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------------ state
    @property
    def queued(self) -> int:
        with self._cond:  # an RLock: also called from _admit, which holds it
            return sum(len(j.prompts) for j in self._jobs) + self._streams_waiting

    @property
    def running(self) -> int:
        return self._running_prompts + self._streams_running

    def _admit(self, count: int) -> None:
        if self._closed or self._draining:
            raise ShuttingDownError("the server is shutting down")
        if self.queued + count > self.max_queue:
            raise QueueFullError(f"{self.queued} requests are already waiting (serve.max_queue={self.max_queue})")

    # ------------------------------------------------------------------------------------------ non-streaming
    async def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        """Completions for `prompts`, generated together with whatever compatible work is queued."""
        loop = asyncio.get_running_loop()
        with self._cond:
            self._admit(len(prompts))
            job = _Job(list(prompts), params, batch_key(params), loop.create_future(), loop)
            self._jobs.append(job)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._cond:  # the client went away before its turn: drop it from the queue
                if job in self._jobs:
                    self._jobs.remove(job)
            raise

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._batch_pool.submit(self._run_batch, batch)
            except RuntimeError as e:  # the pool was shut down (closing)
                for job in batch:
                    _resolve(job, error=ShuttingDownError(str(e)))

    def _run_batch(self, batch: list[_Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        try:
            results = self._generate_chunked(prompts, batch[0].params)
        except BaseException as e:  # every failure must reach the waiting requests
            log.exception("generation failed for a batch of %d prompts", len(prompts))
            for job in batch:
                _resolve(job, error=e)
        else:
            start = 0
            for job in batch:
                _resolve(job, result=results[start:start + len(job.prompts)])
                start += len(job.prompts)
        finally:
            with self._cond:
                self._running_jobs.difference_update(batch)
                self._running_prompts -= len(prompts)
                self._cond.notify_all()

    def _generate_chunked(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        results: list[Completion] = []
        for i in range(0, len(prompts), self.max_batch_size):
            chunk = prompts[i:i + self.max_batch_size]
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(chunk))
            results += self.engine.generate(chunk, params)
        return results

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job plus queued jobs with the same key, after a short wait for more to arrive."""
        with self._cond:
            # the engine takes at most max_batch_size rows at once: the rest wait here, where max_queue bounds them
            while (not self._jobs or self._running_prompts >= self.max_batch_size) and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while self._compatible_prompts() < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)  # a burst of requests arrives over a few milliseconds
            batch, size, key = [], 0, self._jobs[0].key
            for job in list(self._jobs):
                if job.key != key or job.future.cancelled():
                    continue
                if batch and size + len(job.prompts) > self.max_batch_size:
                    break
                batch.append(job)
                size += len(job.prompts)
            for job in batch:
                self._jobs.remove(job)
            self._running_jobs.update(batch)
            self._running_prompts += size
            return batch

    def _compatible_prompts(self) -> int:
        if not self._jobs:
            return 0
        key = self._jobs[0].key
        return sum(len(j.prompts) for j in self._jobs if j.key == key)

    # ------------------------------------------------------------------------------------------------ streaming
    async def stream(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamEvent]:
        """Events of one streamed completion; closing the iterator (client gone) stops generation."""
        loop = asyncio.get_running_loop()
        if self._slots_loop is not loop:  # one server, one loop; a new loop (tests) gets fresh slots
            self._stream_slots, self._slots_loop = asyncio.Semaphore(self.max_batch_size), loop
        with self._cond:
            self._admit(1)
            self._streams_waiting += 1
        try:
            await self._stream_slots.acquire()
        finally:
            self._streams_waiting -= 1
        cancel = threading.Event()
        events: asyncio.Queue = asyncio.Queue()
        self._streams_running += 1
        self._stream_cancels.add(cancel)
        self._open_streams[cancel] = (events, loop)
        try:
            self._stream_pool.submit(self._run_stream, prompt, params, cancel, events, loop)
            while True:
                item = await events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # the engine checks it between tokens
            self._stream_cancels.discard(cancel)
            self._open_streams.pop(cancel, None)
            self._streams_running -= 1
            self._stream_slots.release()

    def _run_stream(self, prompt, params, cancel, events, loop) -> None:
        put = events.put_nowait
        try:
            for event in self.engine.stream(prompt, params, cancel=cancel):
                if loop.is_closed():
                    return
                loop.call_soon_threadsafe(put, event)
                if cancel.is_set():
                    break
        except BaseException as e:  # handed to the request that owns the stream
            log.exception("streamed generation failed")
            _call_soon(loop, put, e)
        _call_soon(loop, put, None)

    # ------------------------------------------------------------------------------------------------ shutdown
    def drain(self) -> None:
        """Shutdown has begun: refuse new requests (503 shutting_down) and let those in flight go on."""
        with self._cond:
            self._draining = True

    def abort_running(self, reason: str = "the server is shutting down") -> int:
        """The shutdown timeout has passed: end every open stream with an error event and answer every running or
        queued request with a 503, so clients can tell a stop from a network failure. Thread-safe; returns the
        number of requests ended."""
        error = ShuttingDownError(reason)
        with self._cond:
            self._draining = True
            jobs = [*self._running_jobs, *self._jobs]
            self._jobs = deque()
            streams = list(self._open_streams.items())
        for job in jobs:
            _resolve(job, error=error)
        for cancel, (events, loop) in streams:
            cancel.set()  # the engine drops the row at the next token
            _call_soon(loop, events.put_nowait, error)
        return len(jobs) + len(streams)

    def close(self) -> None:
        """Refuse new work, stop running streams, fail queued requests, and let the engine thread end."""
        with self._cond:
            self._closed = True
            pending, self._jobs = list(self._jobs), deque()
            self._cond.notify_all()
        for job in pending:
            _resolve(job, error=ShuttingDownError("the server is shutting down"))
        for cancel in list(self._stream_cancels):
            cancel.set()
        self._stream_pool.shutdown(wait=False, cancel_futures=True)
        self._batch_pool.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(fn, *args)


def _resolve(job: _Job, result: list[Completion] | None = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    _call_soon(job.loop, settle)
