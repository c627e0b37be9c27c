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


# ------------------------------------------------------------------ building llama.cpp (llamacpp_build.py)
def _script(path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _fake_sdist(cache, version="0.3.36"):
    """A llama-cpp-python sdist with only what the build looks at: vendor/llama.cpp/CMakeLists.txt, llama_cpp/."""
    import tarfile

    top = cache / "src" / f"llama_cpp_python-{version}"
    (top / "vendor" / "llama.cpp").mkdir(parents=True)
    (top / "vendor" / "llama.cpp" / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    (top / "llama_cpp").mkdir()
    (top / "llama_cpp" / "__init__.py").write_text("")
    archive = cache / "llama.cpp" / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    return archive


FAKE_CMAKE = """echo "$@" >> "$(dirname "$0")/calls"
if [ "$1" = "--build" ]; then
  echo "[1/2] Building CXX object ggml.cpp.o"
  [ -n "$FAIL" ] && { echo "ggml.cpp:1: error: boom"; exit 1; }
  mkdir -p "$2/bin"; for t in llama-quantize llama-imatrix llama-perplexity llama-bench; do touch "$2/bin/$t"; done
  touch "$2/bin/libllama.so"
  echo "[2/2] Linking CXX executable bin/llama-quantize"
fi
"""


@pytest.fixture()
def fake_toolchain(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "cmake", FAKE_CMAKE)
    _script(bin_dir / "ninja", "")
    cc, cxx = _script(bin_dir / "fake-cc", ""), _script(bin_dir / "fake-c++", "")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("CXX", str(cxx))
    cache = tmp_path / "cache"
    _fake_sdist(cache)
    return bin_dir, cache


def test_build_configures_cpu_release_and_compiles_only_the_tools(fake_toolchain):
    from tunelab.export.llamacpp_build import TOOLS, build_llama_cpp

    bin_dir, cache = fake_toolchain
    shown = []
    out = build_llama_cpp(str(cache), progress=shown.append)
    assert out == cache / "llama.cpp" / "build" / "bin" and all((out / t).is_file() for t in TOOLS)
    configure, compile_ = (bin_dir / "calls").read_text().splitlines()
    assert "-S" in configure and configure.split("-S ")[1].split()[0].endswith("source-0.3.36/vendor/llama.cpp")
    for option in ("-G Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=OFF", "-DBUILD_SHARED_LIBS=ON",
                   "-DLLAMA_BUILD_SERVER=OFF", f"-DCMAKE_CXX_COMPILER={bin_dir / 'fake-c++'}"):
        assert option in configure
    assert compile_.endswith("--config Release -j 2 --target " + " ".join(TOOLS))
    assert any(line.startswith("[2/2] Linking") for line in shown)  # progress shown
    # built once: a second call finds the tools, runs nothing, and the quantizer is found there
    assert build_llama_cpp(str(cache), progress=shown.append) == out
    assert len((bin_dir / "calls").read_text().splitlines()) == 2
    assert find_quantizer(str(cache)) == out / "llama-quantize"


def test_build_failure_shows_the_compiler_error_and_the_log(fake_toolchain, monkeypatch):
    from tunelab.export.llamacpp_build import BuildError, build_llama_cpp

    _, cache = fake_toolchain
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(BuildError) as e:
        build_llama_cpp(str(cache), progress=lambda line: None)
    assert "compile failed" in str(e.value) and "error: boom" in str(e.value) and "build.log" in str(e.value)
    assert not (cache / "llama.cpp" / "build" / ".complete").exists()


def test_missing_compiler_names_the_debian_package(tmp_path, monkeypatch):
    from tunelab.export.llamacpp_build import BuildError, compilers

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(BuildError) as e:
        compilers()
    assert "C compiler" in str(e.value) and "apt-get install gcc" in str(e.value)
    _script(tmp_path / "empty-bin" / "gcc", "")
    with pytest.raises(BuildError) as e:
        compilers()
    assert "C++ compiler" in str(e.value) and "apt-get install g++" in str(e.value)


def test_python_runtime_is_the_sdist_binding_over_the_built_libraries(fake_toolchain, monkeypatch):
    from tunelab.export import llamacpp_build

    _, cache = fake_toolchain
    monkeypatch.setattr(llamacpp_build, "_pip_install", lambda *a: None)
    runtime = llamacpp_build.build_python_runtime(str(cache), progress=lambda line: None)
    lib = runtime / "llama_cpp" / "lib"
    assert (runtime / "llama_cpp" / "__init__.py").is_file() and lib.is_symlink()
    assert (lib / "libllama.so").is_file() and lib.resolve() == (cache / "llama.cpp" / "build" / "bin").resolve()


# ------------------------------------------------------------------ importance matrix (imatrix.py)
def _conversation(i: int):
    from tunelab.data.types import Conversation, Message

    return Conversation([Message("user", f"Reverse: a{i} b{i}"), Message("assistant", f"b{i} a{i}")])


def test_calibration_text_is_training_text_rendered_without_the_held_out_examples(tiny_llama):
    from transformers import AutoTokenizer

    from tunelab.export.imatrix import calibration_text
    from tunelab.inference.template import load_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = load_template(tokenizer, "chatml")
    conversations = [_conversation(i) for i in range(10)]
    text, examples, tokens = calibration_text(conversations, conversations[7:], template, tokenizer)
    assert examples == 7 and text == "".join(template.render(c.to_template_messages()) for c in conversations[:7])
    assert tokens == sum(len(tokenizer(template.render(c.to_template_messages()), add_special_tokens=False)
                             ["input_ids"]) for c in conversations[:7])
    _, examples, capped = calibration_text(conversations, [], template, tokenizer, max_tokens=tokens // 3)
    assert 1 <= examples < 7 and capped <= tokens // 3


def test_imatrix_context_gives_two_chunks_or_none():
    from tunelab.export.imatrix import context_for

    assert context_for(100_000) == 512 and context_for(300) == 128 and context_for(127) == 0


FAKE_IMATRIX = 'echo "$@" > "$(dirname "$0")/imatrix-args"\nwhile [ "$1" != "-o" ]; do shift; done; echo M > "$2"\n'
FAKE_QUANTIZE = 'echo "$@" >> "$(dirname "$0")/quantize-args"\nshift $(($# - 3)); cp "$1" "$2"\n'


def test_kquant_export_of_a_run_quantizes_with_an_imatrix_of_its_training_data(tiny_models, tmp_path, monkeypatch):

    from test_inference_support import add_reverse_data, make_run_dir

    from tunelab.export.gguf import ConverterUnavailableError, find_converter
    from tunelab.export.pipeline import export_model

    try:
        find_converter(fetch=False)
    except ConverterUnavailableError as e:
        pytest.skip(f"GGUF converter not fetched: {e}")
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "llama-imatrix", FAKE_IMATRIX)
    _script(bin_dir / "llama-quantize", FAKE_QUANTIZE)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = make_run_dir(tiny_models["llama"], tmp_path, "lora")
    add_reverse_data(run, 24, words=3)
    result = export_model(str(run), ExportConfig(gguf=["q4_k_m", "q6_k"], table=False), out=tmp_path / "out")
    assert result.imatrix.file == "gguf/imatrix.gguf" and (tmp_path / "out" / "gguf" / "imatrix.gguf").is_file()
    assert result.imatrix.examples == 20  # 24 minus the 4 held out for the validation split
    args = (bin_dir / "imatrix-args").read_text().split()
    assert "--parse-special" in args and args[args.index("-m") + 1].endswith("-f16.gguf")
    calls = (bin_dir / "quantize-args").read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("--imatrix ") and "imatrix.gguf" in c for c in calls)
    assert any("importance matrix from 20 training examples" in n for n in result.notes)
    assert not list((tmp_path / "out" / "gguf").glob(".*"))  # no calibration text or temporary f16 left

    plain = export_model(str(run), ExportConfig(gguf=["q6_k"], imatrix=False, table=False), out=tmp_path / "out2")
    assert plain.imatrix.file is None and "turned off" in plain.imatrix.describe()
    assert not (bin_dir / "quantize-args").read_text().splitlines()[-1].startswith("--imatrix")


def test_table_says_whether_the_kquants_used_an_imatrix(tmp_path):
    import json

    from tunelab.export.table import TableRow, write_table

    text = write_table(tmp_path, [TableRow("gguf/m-q4_k_m.gguf", 10**8, 13.5, None)], "validation split (4)",
                       ["k-quants with an importance matrix from 20 training examples"])
    assert text.endswith("k-quants with an importance matrix from 20 training examples")
    assert json.loads((tmp_path / "export_table.json").read_text())["notes"] == [
        "k-quants with an importance matrix from 20 training examples"]


def test_cpu_options_native_unless_the_cpu_has_amx():
    from tunelab.export.llamacpp_build import cpu_options

    assert cpu_options("flags\t\t: fpu sse4_2 avx avx2 fma f16c\n") == ["-DGGML_NATIVE=ON"]
    amx = cpu_options("processor: 0\nflags\t\t: sse4_2 avx avx2 fma f16c bmi2 avx512f avx512_bf16 amx_tile amx_int8\n")
    assert amx[0] == "-DGGML_NATIVE=OFF" and "-DGGML_AVX512=ON" in amx and "-DGGML_AVX512_BF16=ON" in amx
    assert "-DGGML_AVX512_VNNI=OFF" in amx and "-DGGML_AMX_TILE=OFF" in amx and "-DGGML_AMX_INT8=OFF" in amx
