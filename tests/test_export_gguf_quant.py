"""GGUF q4_0/q4_1/q5_0/q5_1 written in numpy from the converter's f16 file: every metadata key kept, tensor types
as llama.cpp's quantizer chooses them, dequantized weights within each type's rounding bound of the f16 weights,
and the files load and answer in transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_inference_support import add_reverse_data, make_run_dir

from tunelab.config.schema import ExportConfig
from tunelab.export.gguf import ConverterUnavailableError, find_converter
from tunelab.export.gguf_quant import NUMPY_TYPES, tensor_target
from tunelab.export.pipeline import export_model

# Largest |error| of one value, as a share of its 32-value block's max |x| (q*_0) or max-min range (q*_1):
# q4_0: d = amax/8 and codes -8..7, so the largest positive values clip at 7d (error up to d = amax/8);
# q5_0: the same with 16 levels a side (amax/16); q4_1/q5_1: round to (range/15 or /31) steps (half a step).
# 3% room covers the f16 rounding of d and m.
BOUND = {"q4_0": ("amax", 1 / 8), "q5_0": ("amax", 1 / 16), "q4_1": ("range", 1 / 30), "q5_1": ("range", 1 / 62)}


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    try:
        find_converter(fetch=False)
    except ConverterUnavailableError as e:
        pytest.skip(f"GGUF converter not fetched: {e}")
    root = tmp_path_factory.mktemp("quant")
    run = make_run_dir(tiny_models["llama"], root, "lora")
    add_reverse_data(run, 12)
    return export_model(str(run), ExportConfig(gguf=["f16", *NUMPY_TYPES], ollama=True, verify=True))


def read(path):
    from gguf import GGUFReader

    return GGUFReader(path)


def test_metadata_is_kept_and_file_type_set(exported):
    from gguf import LlamaFileType

    f16 = read(exported.gguf["f16"])
    keys = {name: field.contents() for name, field in f16.fields.items() if not name.startswith("GGUF.")}
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.eos_token_id" in keys
    for qtype in NUMPY_TYPES:
        got = read(exported.gguf[qtype])
        got_keys = {name: field.contents() for name, field in got.fields.items() if not name.startswith("GGUF.")}
        assert got_keys.pop("general.file_type") == LlamaFileType[f"MOSTLY_{qtype.upper()}"]
        keys_without_type = {k: v for k, v in keys.items() if k != "general.file_type"}
        assert got_keys == keys_without_type, qtype
        assert [t.name for t in got.tensors] == [t.name for t in f16.tensors]


def test_tensor_types_follow_llama_cpp(exported):
    from gguf import GGMLQuantizationType as Q

    got = {t.name: t.tensor_type for t in read(exported.gguf["q4_0"]).tensors}
    has_output = "output.weight" in got
    assert got["blk.0.attn_norm.weight"] == Q.F32 and got["output_norm.weight"] == Q.F32
    assert got["blk.0.attn_q.weight"] == Q.Q4_0 and got["blk.0.ffn_down.weight"] == Q.Q4_0
    assert got["output.weight" if has_output else "token_embd.weight"] == Q.Q8_0  # llama.cpp: q6_k
    assert tensor_target("blk.0.ffn_down.weight", (64, 48), "q4_0", True) == "f16"  # rows not a multiple of 32
    assert tensor_target("token_embd.weight", (100, 64), "q4_1", True) == "q4_1"


@pytest.mark.parametrize("qtype", NUMPY_TYPES)
def test_dequantized_weights_within_the_type_error(exported, qtype):
    from gguf.quants import dequantize

    reference = {t.name: dequantize(t.data, t.tensor_type) for t in read(exported.gguf["f16"]).tensors}
    basis, share = BOUND[qtype]
    checked = 0
    for tensor in read(exported.gguf[qtype]).tensors:
        if tensor.tensor_type.name.lower() != qtype:
            continue
        got = dequantize(tensor.data, tensor.tensor_type).reshape(-1, 32)
        ref = reference[tensor.name].astype(np.float32).reshape(-1, 32)
        scale = np.abs(ref).max(-1) if basis == "amax" else ref.max(-1) - ref.min(-1)
        error = np.abs(got - ref).max(-1)
        assert (error <= scale * share * 1.03 + 1e-7).all(), (tensor.name, float((error / scale).max()))
        # rounding errors spread evenly over the step: on average well under the worst case
        assert np.abs(got - ref).mean() < (scale * share).mean() * 0.75
        checked += 1
    assert checked >= 7  # every linear layer of the tiny model


def test_quantized_files_load_in_transformers_and_modelfile_uses_the_smallest(exported):
    by_type = {rt.outtype: rt for rt in exported.round_trips}
    assert set(by_type) == {"f16", *NUMPY_TYPES}
    assert by_type["f16"].passed
    for qtype in NUMPY_TYPES:
        assert by_type[qtype].total == 3 and 0 < by_type[qtype].token_agreement <= 1
    smallest = min(exported.gguf.values(), key=lambda p: p.stat().st_size)
    assert smallest.name.endswith(("q4_0.gguf", "q4_1.gguf"))
    assert f"FROM ./{smallest.name}" in exported.modelfile.read_text()
    assert not list(exported.gguf["f16"].parent.glob(".*"))  # no temporary file left


def test_export_table_has_every_artifact(exported):
    from tunelab.export.llamacpp_speed import find_runtime
    from tunelab.export.table import NO_LLAMA_CPP, TableRow

    rows = {r.artifact: r for r in exported.table}
    assert set(rows) == {"merged (safetensors)", *(f"gguf/{p.name}" for p in exported.gguf.values())}
    merged = rows.pop("merged (safetensors)")
    assert merged.tokens_per_s > 0 and merged.size_bytes > 0 and merged.perplexity > 1
    assert all(r.perplexity > 1 for r in rows.values())
    assert abs(rows["gguf/run-lora-f16.gguf"].perplexity / merged.perplexity - 1) < 1e-3  # f16 = merged weights
    measured = find_runtime() is not None  # llama.cpp measures GGUF speed where its runtime is built
    for name, row in rows.items():
        assert row.size_bytes == (exported.out_dir / name).stat().st_size
        assert (row.runtime == "llama.cpp" and row.tokens_per_s > 0) if measured else (
            row.tokens_per_s is None and row.note == NO_LLAMA_CPP)
    sizes = {t: rows[f"gguf/{p.name}"].size_bytes for t, p in exported.gguf.items()}
    assert sizes["q4_0"] < sizes["q5_0"] < sizes["f16"] and sizes["q4_1"] < sizes["q5_1"]
    text = (exported.out_dir / "export_table.md").read_text()
    assert text.startswith("| artifact | size | perplexity | tokens/s |") and text.count("\n| ") == 1 + len(rows)
    assert "validation split (4 examples)" in text
    assert [TableRow(**r) for r in json.loads((exported.out_dir / "export_table.json").read_text())["rows"]] == \
        exported.table
