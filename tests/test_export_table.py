"""The export table's GGUF rows: tokens/s measured in llama.cpp (the built llama-cpp-python runtime, in a child
process) and labelled so, or a note saying the runtime is missing; a crashing runtime is a message, not a crash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tunelab.export import table
from tunelab.export.llamacpp_speed import LlamaCppSpeedError, find_runtime, measure_tokens_per_s


def test_the_runtime_is_found_only_once_built(tmp_path):
    assert find_runtime(str(tmp_path)) is None
    runtime = tmp_path / "llama.cpp" / "python"
    runtime.mkdir(parents=True)
    assert find_runtime(str(tmp_path)) is None  # a half-built folder is not a runtime
    (runtime / ".complete").write_text("0.3.36")
    assert find_runtime(str(tmp_path)) == runtime


@pytest.mark.parametrize(("body", "message"), [
    ("import os\nos._exit(7)\n", "exited with 7"),
    ("class Llama:\n    def __init__(self, **kw):\n        raise ValueError('Failed to load model from file')\n",
     "ValueError: Failed to load model from file")])
def test_a_failing_runtime_is_reported_not_raised_through(body, message, tmp_path):
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text(body)
    with pytest.raises(LlamaCppSpeedError, match=f"m.gguf: .*{message}"):
        measure_tokens_per_s(tmp_path, tmp_path / "m.gguf", [1, 2, 3], threads=1)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    from tunelab.export.gguf import ConverterUnavailableError, convert_to_gguf, find_converter

    try:
        find_converter(fetch=False)
    except ConverterUnavailableError as e:
        pytest.skip(f"GGUF converter not fetched: {e}")
    out = tmp_path_factory.mktemp("table") / "export"
    shutil.copytree(tiny_models["llama"], out)
    return convert_to_gguf(out, out / "gguf" / "tiny-f16.gguf", "f16")


def gguf_row(gguf: Path, runtime: Path | None) -> table.TableRow:
    artifacts = table.Artifacts(gguf.parent.parent, {"f16": gguf}, llama_cpp=runtime)
    merged, row = table.build_table(artifacts, [], None, None)
    assert merged.runtime == "transformers" and merged.tokens_per_s > 0 and merged.perplexity is None  # no data
    return row


def test_without_the_runtime_a_gguf_row_says_what_would_measure_it(tiny_gguf):
    row = gguf_row(tiny_gguf, None)
    assert (row.artifact, row.tokens_per_s, row.runtime, row.note) == (
        "gguf/tiny-f16.gguf", None, None, table.NO_LLAMA_CPP)
    assert row.size_bytes == tiny_gguf.stat().st_size
    line = table.format_table([row], "x").splitlines()[2]
    assert line == f"| gguf/tiny-f16.gguf | {row.size_bytes / 1e6:.1f} MB | - | - | {table.NO_LLAMA_CPP} |"


@pytest.mark.skipif(find_runtime() is None, reason="no llama.cpp runtime built (make test-llamacpp)")
def test_with_the_runtime_a_gguf_row_has_llama_cpp_tokens_per_s(tiny_gguf):
    row = gguf_row(tiny_gguf, find_runtime())
    assert row.runtime == "llama.cpp" and row.tokens_per_s > 0 and row.note is None
    assert f"| {row.tokens_per_s:.1f} (llama.cpp) |" in table.format_table([row], "x")
