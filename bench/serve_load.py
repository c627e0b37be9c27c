"""Load test of `tunelab serve` on loopback: requests/s, tokens/s and latency at 1, 4, 16, ... concurrent clients.

By default it serves the embedded SmolLM2-135M-Instruct in this process (uvicorn in a thread, on a free
127.0.0.1 port) and sends a bounded number of greedy chat requests per level, so it stops by itself:

    .venv/bin/python bench/serve_load.py                      # 1, 4, 16 clients, 32 new tokens each
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --model NAME   # an already running server
    .venv/bin/python bench/serve_load.py --stream --compare-batching --clients 1,4,16,32 --off-max-clients 16
    .venv/bin/python bench/serve_load.py --compare-threads --threads 1   # reused vs fresh generation thread
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

TOPICS = ["the sea", "autumn", "a robot", "bread", "the moon", "rivers", "chess", "tea", "cities", "rain",
          "春天", "长城", "bicycles", "music", "mountains", "snow"]


@dataclass
class Level:
    clients: int
    requests: int
    seconds: float
    tokens: int
    latencies: list[float]
    errors: int
    first_token: list[float]  # streaming: seconds to the first text chunk, and mean gap between later chunks
    inter_token: list[float]
    load: float  # 1-minute load average at the end: the machine is shared, other work skews the numbers

    def row(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) if lat else float("nan")
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else float("nan")
        ttft, itl = _pct(self.first_token), _pct(self.inter_token)
        return (f"| {self.clients} | {self.requests} | {self.requests / self.seconds:.2f} | "
                f"{self.tokens / self.seconds:.1f} | {p50:.2f} | {p95:.2f} | {ttft[0]:.2f} | {ttft[1]:.2f} | "
                f"{itl[0] * 1000:.0f} | {itl[1] * 1000:.0f} | {self.errors} | {self.load:.1f} |")


def _pct(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    v = sorted(values)
    return statistics.median(v), v[min(len(v) - 1, round(0.95 * (len(v) - 1)))]


def ask(client: httpx.Client, url: str, model: str, i: int, max_tokens: int, stream: bool = False):
    """(latency, completion tokens, time to first text or None, mean gap between text chunks or None)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."}]}
    start = time.perf_counter()
    if not stream:
        r = client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["usage"]["completion_tokens"], None, None
    body["stream_options"] = {"include_usage": True}
    arrivals, tokens = [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise httpx.HTTPError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    gap = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else None
    return time.perf_counter() - start, tokens, (arrivals[0] - start) if arrivals else None, gap


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, headers: dict,
              stream: bool = False) -> Level:
    """`requests` requests spread over `clients` threads, each sending its next request when the last returns.

    The clients are made first and start together (an httpx.Client takes tens of ms to make: made on the clock,
    they would trickle in and measure a ramp-up instead of `clients` concurrent users)."""
    latencies, tokens, errors, firsts, gaps = [], 0, 0, [], []
    lock = threading.Lock()
    counter = iter(range(requests))
    ready = threading.Barrier(clients + 1)

    def client_loop() -> None:
        nonlocal tokens, errors
        with httpx.Client(timeout=600, headers=headers) as client:
            ready.wait()
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    latency, n, first, gap = ask(client, url, model, i, max_tokens, stream)
                except httpx.HTTPError as e:
                    print(f"  request {i} failed: {e}", file=sys.stderr)
                    with lock:
                        errors += 1
                    continue
                with lock:
                    latencies.append(latency)
                    tokens += n
                    if first is not None:
                        firsts.append(first)
                    if gap is not None:
                        gaps.append(gap)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop) for _ in range(clients)]
        ready.wait()
        start = time.perf_counter()
        for f in futures:
            f.result()
    return Level(clients, len(latencies), time.perf_counter() - start, tokens, latencies, errors, firsts, gaps,
                 os.getloadavg()[0])


@contextmanager
def local_server(model: str, max_batch_size: int, threads: int | None = None):
    """The model served in this process on a free loopback port; yields (url, served name)."""
    import uvicorn

    from tunelab.config.schema import ServeConfig
    from tunelab.inference.engine import EngineOptions
    from tunelab.inference.hf import load_engine
    from tunelab.serving.app import create_app

    start = time.perf_counter()
    engine = load_engine(model, options=EngineOptions(max_batch_size=max_batch_size, threads=threads))
    print(f"loaded {engine.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    app = create_app(engine, ServeConfig(max_batch_size=max_batch_size, max_queue=256))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app.state.serve
    finally:
        server.should_exit = True
        thread.join(30)


def report(levels: list[Level], max_tokens: int, note: str) -> None:
    print(f"\n{note}; greedy, max_tokens={max_tokens}")
    print("| clients | requests | requests/s | tokens/s | p50 latency s | p95 latency s | p50 first token s | "
          "p95 first token s | p50 inter-token ms | p95 inter-token ms | errors | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for level in levels:
        print(level.row())
    for line in first_token_targets(levels):
        print(line)


def first_token_targets(levels: list[Level]) -> list[str]:
    """Issue 15's first-token target per streaming level above one client: p95 first token at most 3x the lone
    request's (the 1-client level's p95) plus one batch step (that level's median inter-token gap)."""
    lone = next((lv for lv in levels if lv.clients == 1 and lv.first_token), None)
    if lone is None:
        return []
    lines = []
    for level in levels:
        if level.clients == 1 or not level.first_token or not level.inter_token:
            continue
        p95, step = _pct(level.first_token)[1], _pct(level.inter_token)[0]
        target = 3 * _pct(lone.first_token)[1] + step
        lines.append(f"first-token p95 at {level.clients} clients {p95:.3f} s vs 3 x {_pct(lone.first_token)[1]:.3f} "
                     f"+ one step {step:.3f} = {target:.3f} s: {'met' if p95 <= target else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from tunelab.config.schema import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model to load (or the served name with --url)")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"))
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests per level = this x clients")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8, help="server batch size (local server only)")
    parser.add_argument("--threads", type=int, help="torch threads of the local server (default: torch's choice); "
                        "on a busy shared machine 1 avoids OpenMP threads spinning against other processes")
    parser.add_argument("--stream", action="store_true", help="streaming requests (first-token, inter-token times)")
    parser.add_argument("--compare-batching", action="store_true",
                        help="local only: also serve with max_batch_size=1 and alternate the two servers per level")
    parser.add_argument("--off-max-clients", type=int, help="with --compare-batching: run batching off only at "
                        "levels up to this many clients (one request at a time is slow: 32 clients take minutes)")
    parser.add_argument("--compare-threads", action="store_true",
                        help="no HTTP: non-streaming generation on the engine's long-lived thread vs a fresh "
                        "generation thread per request, both with --threads, alternated")
    parser.add_argument("--long-lived", action="store_true", help="with --compare-threads: the engine's thread "
                        "never ends when idle (as before it ended after 0.5 s without work)")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    levels = [int(c) for c in args.clients.split(",")]

    def bench(url: str, model: str) -> list[Level]:
        run_level(url, model, 1, 1, 4, headers, args.stream)  # warm-up: first-call allocations are not measured
        results = []
        for clients in levels:
            n = max(args.min_requests, args.requests_per_client * clients)
            results.append(run_level(url, model, clients, n, args.max_tokens, headers, args.stream))
            print(f"  {clients} clients done: {results[-1].row()}", file=sys.stderr)
        return results

    if args.url:
        report(bench(args.url.rstrip("/"), args.model), args.max_tokens, f"server {args.url}")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_batching:
        return compare_batching(args, levels, headers)
    if args.compare_threads:
        return compare_threads(args)
    with local_server(args.model, args.max_batch_size, args.threads) as (url, state):
        results = bench(url, state.model_name)
        batches = f"{state.batcher.batches} engine calls, largest batch {state.batcher.largest_batch}"
    note = (f"{state.model_name} on {state.engine.device!s}, {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} cores, "
            f"max_batch_size={args.max_batch_size} ({batches})")
    report(results, args.max_tokens, note)
    return 0


def compare_batching(args, levels: list[int], headers: dict) -> int:
    """Batching on (max_batch_size) and off (1) in the same run, levels interleaved so load changes hit both."""
    import torch

    kind = "streaming" if args.stream else "non-streaming"
    with local_server(args.model, args.max_batch_size, args.threads) as (on_url, on), \
            local_server(args.model, 1, args.threads) as (off_url, off):
        results: dict[str, list[Level]] = {"on": [], "off": []}
        for url, state in ((on_url, on), (off_url, off)):
            run_level(url, state.model_name, 1, 1, 4, headers, args.stream)  # warm-up
        for clients in levels:
            n = max(args.min_requests, args.requests_per_client * clients)
            for name, url, state in (("on", on_url, on), ("off", off_url, off)):
                if name == "off" and args.off_max_clients and clients > args.off_max_clients:
                    continue
                results[name].append(run_level(url, state.model_name, clients, n, args.max_tokens, headers,
                                               args.stream))
                print(f"  batching {name}, {clients} clients: {results[name][-1].row()}", file=sys.stderr)
    threads = torch.get_num_threads()
    for name, size in (("on", args.max_batch_size), ("off", 1)):
        report(results[name], args.max_tokens, f"{kind}, batching {name} (max_batch_size={size}), {threads} torch "
               f"threads, {os.cpu_count()} cores")
    return 0


def compare_threads(args) -> int:
    """Non-streaming generation on the engine's own long-lived thread (the scheduler's, reused for every request)
    vs a fresh generation thread per request (a new Scheduler over the same model), both with --threads; the
    arms alternate request by request so load changes hit both."""

    from tunelab.inference.engine import EngineOptions, GenerationParams
    from tunelab.inference.hf import load_engine
    from tunelab.inference.scheduler import Scheduler

    engine = load_engine(args.model, options=EngineOptions(max_batch_size=1, threads=args.threads))
    params = GenerationParams(max_new_tokens=args.max_tokens)
    prompts = [engine.render([{"role": "user", "content": f"Write a few sentences about {t}."}]) for t in TOPICS]
    engine.generate(prompts[:1], GenerationParams(max_new_tokens=4))  # warm-up
    reused = engine.scheduler
    if args.long_lived:
        reused.idle_exit_s = None

    def fresh_thread(prompt: str):
        engine.scheduler = Scheduler(engine.model, engine.tokenizer, engine.stop_ids, 1, args.threads)
        try:
            return engine.generate([prompt], params)[0]
        finally:
            engine.scheduler.close(wait=10)
            engine.scheduler = reused

    timings: dict[str, list[tuple[float, int]]] = {"reused": [], "fresh": []}
    answers: dict[str, list[str]] = {"reused": [], "fresh": []}
    for i in range(max(args.min_requests, args.requests_per_client)):
        prompt = prompts[i % len(prompts)]
        for name, run in (("reused", lambda p: engine.generate([p], params)[0]), ("fresh", fresh_thread)):
            start = time.perf_counter()
            completion = run(prompt)
            timings[name].append((time.perf_counter() - start, completion.completion_tokens))
            answers[name].append(completion.text)
    print(f"\nnon-streaming, one request at a time, {args.max_tokens} new tokens, --threads {args.threads} "
          f"(generation thread: {engine.threads} torch threads, long-lived: {args.long_lived}), {os.cpu_count()} cores; "
          f"identical answers: "
          f"{answers['reused'] == answers['fresh']}")
    print("| generation thread | requests | tokens/s | p50 latency s | load avg |")
    print("|---|---|---|---|---|")
    for name, rows in timings.items():
        seconds = sum(t for t, _ in rows)
        print(f"| {name} | {len(rows)} | {sum(n for _, n in rows) / seconds:.1f} | "
              f"{statistics.median(t for t, _ in rows):.2f} | {os.getloadavg()[0]:.1f} |")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
