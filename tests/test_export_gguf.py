"""GGUF export through llama.cpp's converter: metadata (template, eos = end of turn), round trip through
transformers, and `tunelab export` end to end (files, sizes, Modelfile, sample answer)."""

from __future__ import annotations

import pytest
from test_inference_support import make_run_dir

from tunelab.cli.main import main
from tunelab.export.gguf import ConverterUnavailableError, find_converter, read_gguf_info
from tunelab.export.modelfile import adds_bos


@pytest.fixture(scope="module")
def converter():
    try:
        return find_converter(fetch=False)
    except ConverterUnavailableError as e:
        pytest.skip(f"GGUF converter not fetched: {e}")


def test_export_command_writes_gguf_modelfile_and_round_trips(tiny_models, tmp_path, capsys, converter):
    run = make_run_dir(tiny_models["llama"], tmp_path, "lora")
    code = main(["export", str(run), "--gguf", "f16,q8_0", "--ollama", "--verify", "--prompt", "你好"])
    out = capsys.readouterr().out
    assert code == 0, out
    export = run / "export"
    f16, q8 = export / "gguf" / "run-lora-f16.gguf", export / "gguf" / "run-lora-q8_0.gguf"
    assert f16.is_file() and q8.is_file() and q8.stat().st_size < f16.stat().st_size
    for line in ("model.safetensors", "gguf/run-lora-f16.gguf", "gguf/Modelfile", "chat template: identical",
                 "sample answer from the exported model", "Q: 你好"):
        assert line in out, out
    assert "MB  model.safetensors" in out  # sizes are printed
    assert out.count("GGUF round trip") == 2 and "FAILED" not in out  # f16: identical answers; q8_0: tolerance
    template = (export / "chat_template.jinja").read_text(encoding="utf-8")
    infos = {path: read_gguf_info(path) for path in (f16, q8)}
    for info in infos.values():
        assert info.architecture == "llama" and info.chat_template == template
        assert info.eos_token == "<|eot_id|>"  # llama.cpp stops at the end of the turn
    modelfile = (export / "gguf" / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./run-lora-q8_0.gguf" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile
    # bos: in the TEMPLATE exactly when llama.cpp will not add it itself
    from transformers import AutoTokenizer

    assert bool(infos[q8].add_bos) == adds_bos(AutoTokenizer.from_pretrained(export))
    assert modelfile.split('TEMPLATE """')[1].startswith("<|begin_of_text|>") != bool(infos[q8].add_bos)


def test_missing_converter_says_how_to_get_it(tmp_path):
    with pytest.raises(ConverterUnavailableError, match="--fetch-converter"):
        find_converter(fetch=False, cache_dir=str(tmp_path))
    with pytest.raises(ConverterUnavailableError, match="convert_hf_to_gguf.py"):
        find_converter(converter_dir=str(tmp_path))


def test_export_command_errors_are_clear(tiny_models, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["export"]) == 2
