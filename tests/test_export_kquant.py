"""GGUF k-quants go through llama.cpp's llama-quantize: a clear message when it is missing, and the call made
when it is on PATH (a stand-in script here; the real binary is exercised by the opt-in llama.cpp check)."""

from __future__ import annotations

import os
import stat

import pytest

from tunelab.config.schema import ExportConfig
from tunelab.export.gguf_quant import QuantizerMissingError, find_quantizer, kquantize_gguf


def test_missing_quantizer_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(QuantizerMissingError) as e:
        find_quantizer(cache_dir=str(tmp_path))
    message = str(e.value)
    assert "llama-quantize" in message and "PATH" in message and "q4_0" in message and "make llama-cpp" in message


def test_missing_quantizer_stops_the_export_before_anything_is_written(tiny_models, tmp_path, monkeypatch):
    from test_inference_support import make_adapter

    from tunelab.export.pipeline import export_model

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    adapter = make_adapter(tiny_models["llama"], tmp_path / "lora")
    with pytest.raises(QuantizerMissingError):
        export_model(str(adapter), ExportConfig(gguf=["q4_k_m"], table=False), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantizer_on_path_is_called_with_source_target_and_type(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "llama-quantize"
    script.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\ncp "$1" "$2"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    source = tmp_path / "m-f16.gguf"
    source.write_bytes(b"GGUF...")
    out = kquantize_gguf(source, tmp_path / "m-q4_k_m.gguf", "q4_k_m")
    assert out.read_bytes() == b"GGUF..." and not list(tmp_path.glob(".*partial"))
    src, partial, qtype = (bin_dir / "args").read_text().split()
    assert src == str(source) and partial.endswith(".m-q4_k_m.gguf.partial") and qtype == "Q4_K_M"
