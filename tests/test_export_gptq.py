"""GPTQ / AWQ (W4A16) export through GPT-QModel: refused before anything is written when the library is missing or
untested, calibration text from the run's own training data, the GPTQ row of the export table (its reason where the
folder cannot be loaded here), and (when gptqmodel is installed) the real export measured in the table."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_inference_support import make_run_dir

from tunelab.cli.main import main
from tunelab.config.schema import ExportConfig
from tunelab.errors import TunelabError
from tunelab.export import gptq, table
from tunelab.export.pipeline import export_model, training_template
from tunelab.runs.artifacts import resolve_artifact

RECORDS = [{"instruction": f"Reverse the order of these words: {a} {b} {c}", "output": f"{c} {b} {a}"}
           for a, b, c in [("red", "green", "blue"), ("one", "two", "three"), ("cat", "dog", "bird"),
                           ("sun", "moon", "star"), ("tea", "milk", "rice"), ("north", "east", "south")]]


def run_with_data(base: Path, root: Path) -> Path:
    run = make_run_dir(base, root, "lora")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    with (run / "config.yaml").open("a", encoding="utf-8") as f:
        f.write(f"data:\n  datasets:\n    - path: {data}\n")
    return run


def without_gptqmodel(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))


@pytest.mark.parametrize("flag", ["--gptq", "export.gptq=true"])
def test_missing_gptqmodel_is_refused_before_anything_is_written(flag, tiny_llama, tmp_path, monkeypatch, capsys):
    without_gptqmodel(monkeypatch)
    run = run_with_data(tiny_llama, tmp_path)
    out = tmp_path / "out"
    assert main(["export", str(run), flag, "--out", str(out), "--no-sample", "--no-table"]) == 2
    err = capsys.readouterr().err
    assert "needs GPT-QModel" in err and "not installed: gptqmodel" in err and "pip install 'tunelab[gptq]'" in err
    assert "Nothing was written" in err and "--" + flag.split(".")[-1].split("=")[0].lstrip("-") in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-lora", "train.jsonl"]  # no partial folder either


def test_an_untested_gptqmodel_version_is_refused(tiny_llama, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("gptqmodel", "optimum") else real(name, *a))
    monkeypatch.setattr(gptq.importlib.metadata, "version", lambda name: "7.7.0")
    with pytest.raises(TunelabError, match=r"gptqmodel 7.7.0 is installed; tunelab is tested with 7.6.x"):
        export_model(str(run_with_data(tiny_llama, tmp_path)), ExportConfig(gptq=True), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_awq_needs_a_cuda_gpu(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TunelabError, match=r"export --awq needs a CUDA GPU.*use --gptq.*Nothing was written"):
        export_model(str(run_with_data(tiny_llama, tmp_path)), ExportConfig(awq=True), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_weight_quant_asked_needs_nothing(monkeypatch):
    without_gptqmodel(monkeypatch)
    assert gptq.asked_methods(ExportConfig()) == []
    gptq.check_weight_quant([])  # no error without the library
    assert gptq.asked_methods(ExportConfig(awq=True, gptq=True)) == ["gptq", "awq"]


def test_calibration_is_the_runs_training_data_in_its_template(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    run = run_with_data(tiny_llama, tmp_path)
    art = resolve_artifact(str(run), device="cpu")
    template = training_template(art, AutoTokenizer.from_pretrained(art.tokenizer_path))
    texts = gptq.calibration_texts(art, template, 4)
    assert len(texts) == 4
    first = [{"role": "user", "content": RECORDS[0]["instruction"]},
             {"role": "assistant", "content": RECORDS[0]["output"]}]
    assert texts[0] == template.render(first, add_generation_prompt=False)
    assert "<|start_header_id|>" in texts[0] and "blue green red" in texts[0]  # llama3 template, the reply


def test_calibration_needs_a_run(tiny_llama):
    art = resolve_artifact(str(tiny_llama), device="cpu")
    with pytest.raises(TunelabError, match="calibrate on the run's training data: export a run folder"):
        gptq.calibration_texts(art, None, 4)


def test_group_size_divides_every_layer_input(tiny_llama, tmp_path):
    assert gptq.group_size_for(tiny_llama) == 64  # hidden 64, intermediate 128
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536}))
    assert gptq.group_size_for(tmp_path) == 64  # SmolLM2-135M: 576 = 9 x 64
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 2048, "intermediate_size": 8192}))
    assert gptq.group_size_for(tmp_path) == 128


def table_inputs(tiny_llama, tmp_path, method: str = "gptq"):
    """An export folder (the tiny model as the merged model) with a stand-in <method>/ folder, and held-out data."""
    from transformers import AutoTokenizer

    art = resolve_artifact(str(run_with_data(tiny_llama, tmp_path)), device="cpu")
    out = tmp_path / "export"
    shutil.copytree(tiny_llama, out)
    (out / method).mkdir()
    (out / method / "model.safetensors").write_bytes(b"x" * 12345)  # not a model: nothing may try to read it
    tokenizer = AutoTokenizer.from_pretrained(out)
    template = training_template(art, tokenizer)
    conversations, _ = table.held_out_conversations(art, template, tokenizer)
    artifacts = table.Artifacts(out, weight_quant={method: {"method": method, "size_bytes": 12345}})
    return artifacts, conversations, template, art.run_config.data


@pytest.mark.parametrize(("method", "present", "why"), [
    ("gptq", False, ("not loaded: transformers needs gptqmodel and optimum to load a GPTQ folder "
                     "(pip install 'tunelab[gptq]')")),
    ("awq", True, "not loaded: the table measures on the CPU and gptqmodel 7.6 has no CPU AWQ kernel")])
def test_a_weight_quant_row_says_why_it_was_not_loaded(method, present, why, tiny_llama, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if present else None)
                        if name in ("gptqmodel", "optimum") else real(name, *a))
    artifacts, conversations, template, data_cfg = table_inputs(tiny_llama, tmp_path, method)
    merged, row = table.build_table(artifacts, conversations, template, data_cfg)
    assert merged.perplexity > 1 and merged.tokens_per_s > 0 and merged.runtime == "transformers"
    assert row == table.TableRow(method, 12345, None, None, None, why)
    text = table.write_table(artifacts.out_dir, [merged, row], "last 1 examples")
    assert f"| {method} | 0.0 MB | - | - | {why} |" in text.splitlines()
    assert text.startswith("| artifact | size | perplexity | tokens/s | note |")
    saved = json.loads((artifacts.out_dir / "export_table.json").read_text())["rows"]
    assert [table.TableRow(**r) for r in saved] == [merged, row]


def test_a_weight_quant_folder_that_fails_to_load_gives_the_error(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(table, "weight_quant_refusal", lambda method: None)  # as if gptqmodel were installed
    artifacts, conversations, template, data_cfg = table_inputs(tiny_llama, tmp_path)
    (artifacts.out_dir / "gptq" / "config.json").write_text("{not json")
    merged, row = table.build_table(artifacts, conversations, template, data_cfg)
    assert merged.perplexity > 1 and row.size_bytes == 12345
    assert (row.perplexity, row.tokens_per_s, row.runtime) == (None, None, None)
    assert row.note.startswith("not loaded here: ") and "Error" in row.note


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="gptqmodel is not installed (pip install 'tunelab[gptq]')")
@pytest.mark.parametrize("method", ["gptq", pytest.param("awq", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="AWQ needs a CUDA GPU (gptqmodel 7.6)"))])
def test_weight_quant_export_loads_in_transformers_and_is_measured(method, tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # gptqmodel writes its per-layer log into ./logs/ (a fixed relative path)

    run = run_with_data(tiny_llama, tmp_path)
    result = export_model(str(run), ExportConfig(**{method: True}, calibration_samples=6))
    folder = result.out_dir / method
    info = result.weight_quant[method]
    assert info["folder"] == str(folder) and info["calibration_examples"] == 6 and info["bits"] == 4
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == method and config["bits"] == 4
    assert (folder / "chat_template.jinja").read_text() == (result.out_dir / "chat_template.jinja").read_text()
    merged_row, row = result.table
    assert row.artifact == method and row.size_bytes == info["size_bytes"]
    if method == "awq":  # written on a CUDA machine, but the table measures on the CPU
        assert row.note == table.weight_quant_refusal("awq") and row.perplexity is None
    else:
        assert row.runtime == "transformers" and row.tokens_per_s > 0 and row.note is None
        # the tiny random model's perplexity is near its 49k vocabulary; 4-bit weights move it, not by orders
        assert 0.5 < row.perplexity / merged_row.perplexity < 2
        assert f"| {method} | {info['size_bytes'] / 1e6:.1f} MB | {row.perplexity:.3f} |" in result.table_text
    merged = AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (2, 32))
    with torch.no_grad():
        agreement = (merged(ids).logits.argmax(-1) == quantized(ids).logits.argmax(-1)).float().mean().item()
    # a random tiny model (hidden 64: one 4-bit group per row), 6 calibration texts: measured 0.56 for gptq on CPU
    # (gptqmodel 7.6.0, optimum 2.3.0); an unrelated model agrees on ~0 of 49k-way choices
    assert agreement >= 0.4
