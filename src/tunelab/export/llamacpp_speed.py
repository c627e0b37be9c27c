"""Export, report helper: greedy decoding tokens/s of a GGUF file in llama.cpp, for the export table (table.py).

The runtime is llama-cpp-python's own ctypes binding over the libraries `make llama-cpp` compiled
(llamacpp_build.build_python_runtime; `make test-llamacpp` builds it). Each file is measured in a child process
(`python -m tunelab.export.llamacpp_speed`): the binding's libraries stay out of the export's process, and a crash
inside llama.cpp (ggml's AMX matmul faulted on this project's Xeon before the build left AMX out) ends one
measurement with a message, not the export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tunelab.errors import TunelabError

TIMEOUT_S = 300


class LlamaCppSpeedError(TunelabError):
    """The child process could not load or run the GGUF file."""


def find_runtime(cache_dir: str | None = None) -> Path | None:
    """The built llama-cpp-python runtime folder, or None when `make test-llamacpp` has not built it."""
    from tunelab.export.llamacpp_build import python_runtime

    runtime = python_runtime(cache_dir)
    return runtime if (runtime / ".complete").is_file() else None


def measure_tokens_per_s(runtime: Path, gguf: Path, prompt_ids: list[int], threads: int,
                         max_new_tokens: int = 32) -> float:
    """Tokens/s of `max_new_tokens` greedy tokens after the prompt `prompt_ids`, prompt evaluation included (as
    table._tokens_per_s times transformers' generate), after a 2-token warm-up; `threads` llama.cpp threads."""
    import tunelab

    paths = [str(runtime), str(Path(tunelab.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    cmd = [sys.executable, "-m", "tunelab.export.llamacpp_speed", str(gguf), "--threads", str(threads),
           "--tokens", str(max_new_tokens), "--ids", ",".join(map(str, prompt_ids))]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise LlamaCppSpeedError(f"{gguf.name}: no answer from llama.cpp within {TIMEOUT_S} s") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        raise LlamaCppSpeedError(f"{gguf.name}: llama.cpp exited with {proc.returncode} ({last})")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"])


def _greedy_tokens_per_s(llm, ids: list[int], n: int) -> float:
    llm.reset()  # no prompt reuse from the previous call: the prompt is evaluated each time, as in transformers
    start = time.perf_counter()
    for count, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), 1):  # never stops at eos itself
        if count == n:
            break
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("--ids", required=True, help="prompt token ids, comma separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    import llama_cpp  # from the runtime folder the parent put first on PYTHONPATH

    ids = [int(i) for i in args.ids.split(",")]
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=len(ids) + args.tokens + 8, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False, seed=0)
    _greedy_tokens_per_s(llm, ids, 2)
    print(json.dumps({"tokens_per_s": _greedy_tokens_per_s(llm, ids, args.tokens)}))


if __name__ == "__main__":
    main()
