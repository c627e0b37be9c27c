"""Session fixtures: tiny random models of each family (built offline once per session) and a clean cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
