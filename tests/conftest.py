"""Session fixtures: tiny random models of each family (built offline once per session) and a clean cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from measure_slow import read_list
from tiny import FAMILIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family -> folder; built lazily so a test using one family pays only for that one."""
    root = tmp_path_factory.mktemp("tiny")

    class _Lazy(dict):
        def __missing__(self, family: str) -> Path:
            self[family] = build_tiny_model(family, root / family)
            return self[family]

    return _Lazy()


@pytest.fixture(scope="session")
def tokenizers(tiny_models):
    """family -> the tiny model's tokenizer, loaded once per session on first use."""
    from transformers import AutoTokenizer

    class _Lazy(dict):
        def __missing__(self, family: str):
            self[family] = AutoTokenizer.from_pretrained(tiny_models[family])
            return self[family]

    return _Lazy()


@pytest.fixture(params=sorted(FAMILIES))
def any_family(request, tiny_models) -> tuple[str, Path]:
    return request.param, tiny_models[request.param]


@pytest.fixture()
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Processed-data caches go to a per-test folder; converted models stay in the shared cache (slow to make)."""
    monkeypatch.setenv("TUNELAB_DATA_CACHE", str(tmp_path / "data-cache"))


# `make test-fast` (-m "not slow") skips these; `make test` (what CI runs) keeps them. Marked here by module and
# test name, so the test files themselves need no marks.
SLOW_MODULES = {
    "test_webui.py": "real browser (chromium) driving the web UI",
    "test_demo.py": "the whole demo pipeline, export included",
    "test_train_resume.py": "kill -9 / signals / resume and 2-process torchrun runs, in subprocesses",
    "test_bench.py": "runs the training benchmark script",
    "test_bench_align.py": "runs the alignment benchmark (tunelab and TRL arms)",
    "test_bench_serve.py": "runs the serving benchmark against real servers",
    "test_export_gguf_quant.py": "llama.cpp's converter plus numpy quantization of every q4/q5 type (~2 min)",
}
SLOW_TESTS = {
    "test_embedded_smollm2_template": "loads the real embedded SmolLM2",
    "test_export_command_writes_gguf_modelfile_and_round_trips": "GGUF conversion and round trip (~50 s)",
    "test_a_dropped_engine_thread_is_joined_before_the_interpreter_exits": "two engine processes end to end (~40 s)",
}
SLOW_NAME_PARTS = ("smollm2_real", "two_cpu_processes", "multi_process", "torchrun")
SLOW_MEASURED = read_list()  # tests/slow_tests.txt: each took >= 1.5 s (tests/measure_slow.py rewrites it)


def slow_reason(module: str, name: str) -> str | None:
    """Why a test is slow (and skipped by `make test-fast`), or None."""
    base = name.split("[", 1)[0]
    if module in SLOW_MODULES:
        return SLOW_MODULES[module]
    if base in SLOW_TESTS:
        return SLOW_TESTS[base]
    if f"{module}::{base}" in SLOW_MEASURED:
        return f"took {SLOW_MEASURED[f'{module}::{base}']}"
    return next((f"name contains {part!r}" for part in SLOW_NAME_PARTS if part in base), None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if slow_reason(item.path.name, item.name):
            item.add_marker(pytest.mark.slow)
