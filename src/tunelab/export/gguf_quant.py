"""Export, step 2b: 4- and 5-bit GGUF files (q4_0, q4_1, q5_0, q5_1) without building llama.cpp.

PyPI's `gguf` package quantizes these block types in numpy (gguf.quants.quantize). The input is the f16/bf16/f32
GGUF written by llama.cpp's converter; the output keeps every metadata key (chat template, stop tokens, rope...)
and changes only general.file_type and the tensors. Which tensors are quantized follows llama.cpp's own
quantizer (llama-quant.cpp, llama_tensor_get_type):
- 1-D tensors (norms, biases) stay f32, as llama.cpp never quantizes them;
- the output projection (output.weight, or token_embd.weight when the embeddings are tied and there is no
  output.weight) is kept at higher precision: llama.cpp writes q6_k there, which numpy cannot write, so it is
  q8_0 here (a little larger, never less precise);
- a matrix whose row length is not a multiple of the 32-value block stays f16 (llama.cpp's fallback);
- every other weight matrix, token_embd.weight included when there is an output.weight, gets the chosen type.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError

NUMPY_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")  # what gguf.quants can write (besides q8_0, written by the converter)
HIGH_PRECISION = "q8_0"  # for the output projection (llama.cpp: q6_k)


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def _file_type(name: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType[f"MOSTLY_{name.upper()}"])


def tensor_target(name: str, shape: tuple[int, ...], target: str, has_output: bool) -> str:
    """The type llama.cpp's quantizer gives tensor `name` (numpy shape) for `target`: f32, f16, q8_0 or target."""
    if len(shape) < 2 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return "f32"
    if shape[-1] % 32 != 0:
        return "f16"
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        return HIGH_PRECISION
    return target


def quantize_gguf(source: Path, out_file: Path, target: str, overwrite: bool = False) -> Path:
    """Write `out_file`, a `target` (q4_0, q4_1, q5_0, q5_1) copy of the 16/32-bit GGUF `source`."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    from tunelab.export.target import refuse_existing_file

    if target not in NUMPY_TYPES:
        raise TunelabError(f"GGUF type {target!r} cannot be written with numpy; choose from {', '.join(NUMPY_TYPES)}")
    refuse_existing_file(out_file, overwrite, written_by_tunelab=False)
    reader = GGUFReader(source)
    float_types = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    odd = [t.name for t in reader.tensors if t.tensor_type not in float_types]
    if odd:
        raise TunelabError(f"{source}: tensor {odd[0]} is already quantized; {target} is made from an f32/f16/bf16 "
                           "GGUF (the converter's --gguf f16)")
    arch = reader.get_field("general.architecture").contents()
    partial = out_file.with_name(f".{out_file.name}.partial")
    writer = GGUFWriter(partial, arch)
    try:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
                continue
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        writer.add_file_type(_file_type(target))
        has_output = any(t.name == "output.weight" for t in reader.tensors)
        for tensor in reader.tensors:
            values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            kind = tensor_target(tensor.name, values.shape, target, has_output)
            if kind == "f32":
                writer.add_tensor(tensor.name, values)
            elif kind == "f16":
                writer.add_tensor(tensor.name, values.astype(np.float16))
            else:
                qtype = _qtype(kind)
                writer.add_tensor(tensor.name, quantize(values, qtype), raw_dtype=qtype)  # byte shape
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file


# k-quants need llama.cpp's own quantizer (C++): used when found, built only on request (llamacpp_build.py).
KQUANT_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
QUANTIZER_NAME = "llama-quantize"


class QuantizerMissingError(TunelabError):
    pass


def find_quantizer(cache_dir: str | None = None) -> Path:
    """llama.cpp's llama-quantize: on PATH, or where a build into tunelab's cache put it."""
    from tunelab.export.llamacpp_build import ToolMissingError, find_tool

    try:
        return find_tool(QUANTIZER_NAME, cache_dir, purpose=f"GGUF k-quants ({', '.join(KQUANT_TYPES)})")
    except ToolMissingError as e:
        raise QuantizerMissingError(
            f"{e}; or choose a type written without it: {', '.join(NUMPY_TYPES)} (numpy) or q8_0 (the converter)"
        ) from None


def kquantize_gguf(source: Path, out_file: Path, target: str, cache_dir: str | None = None,
                   overwrite: bool = False, imatrix: Path | None = None) -> Path:
    """Run `llama-quantize [--imatrix IMATRIX] SOURCE OUT TYPE` into a temporary name, then move it into place."""
    import subprocess

    from tunelab.export.target import refuse_existing_file

    if target not in KQUANT_TYPES:
        raise TunelabError(f"{target!r} is not a k-quant type; choose from {', '.join(KQUANT_TYPES)}")
    refuse_existing_file(out_file, overwrite, written_by_tunelab=False)
    quantizer = find_quantizer(cache_dir)
    partial = out_file.with_name(f".{out_file.name}.partial")
    # run in the output folder with a relative imatrix path: llama-quantize records it in the GGUF's metadata
    options = ["--imatrix", os.path.relpath(imatrix, out_file.parent)] if imatrix is not None else []
    try:
        proc = subprocess.run([str(quantizer), *options, str(source), str(partial), target.upper()], check=False,
                              capture_output=True, text=True, cwd=out_file.parent)
        if proc.returncode != 0 or not partial.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise TunelabError(f"{quantizer} failed to write {target} from {source}:\n{tail}")
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file
