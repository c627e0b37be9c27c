"""Web UI Export tab without a browser: the refusal and the overwrite box (issue 18), the run list refreshed on
focus, the Modelfile's q8_0 GGUF shown before exporting, every shown text translated, dtype auto (issue 12)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_inference_support import make_run_dir

from tunelab.export.merge import export_dtype
from tunelab.export.pipeline import ExportResult
from tunelab.webui import export_tab
from tunelab.webui.i18n import TEXTS, text

gr = pytest.importorskip("gradio")


def event(lang, source, output, overwrite=False, gguf=(), ollama=False):
    form = export_tab.ExportForm(str(source), output=str(output), gguf=list(gguf), ollama=ollama, overwrite=overwrite)
    return export_tab.run_export(lang, form)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_refusal_is_shown_and_overwrite_box_replaces(tiny_models, tmp_path, lang):
    run = make_run_dir(tiny_models["llama"], tmp_path, "lora")
    folder = tmp_path / "my-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep\n")
    status, files = event(lang, run, folder)
    assert "tl-error" in status and str(folder) in status and files == ""
    assert text("export.overwrite", lang) in status  # names the box to tick
    assert (folder / "notes.txt").read_text() == "keep\n" and len(list(folder.iterdir())) == 1
    status, files = event(lang, run, folder, overwrite=True)
    assert "tl-ok" in status and "model.safetensors" in files and not (folder / "notes.txt").exists()
    status, _ = event(lang, run, folder)  # now a previous export: refused with the export wording
    assert "tl-error" in status and text("export.refused.export", lang, folder=folder) in status.replace("&quot;", '"')


def test_run_list_refreshes_on_focus(tiny_models, tmp_path):
    from tunelab.webui.app import create_ui

    runs = tmp_path / "runs"
    runs.mkdir()
    demo = create_ui(runs_dir=runs)
    picker = next(k for k, b in demo.blocks.items() if getattr(b, "elem_id", None) == "export-model")
    on_focus = [f for f in demo.fns.values() if (picker, "focus") in f.targets]
    assert len(on_focus) == 1 and [o._id for o in on_focus[0].outputs] == [picker]
    assert on_focus[0].fn()["choices"] == []
    run = make_run_dir(tiny_models["llama"], runs, "lora")  # a run that finished after the page loaded
    assert str(run) in on_focus[0].fn()["choices"]


def test_modelfile_box_shows_and_ticks_the_q8_0_gguf():
    update = export_tab.with_modelfile_gguf([], True)
    assert update["value"] == ["q8_0"]
    assert export_tab.with_modelfile_gguf(["f16"], True) == gr.skip()
    plan = export_tab.plan_html("en", export_tab.ExportForm("runs/r", ollama=True))
    assert "runs/r/export" in plan and "-q8_0.gguf" in plan and "Modelfile" in plan
    assert "gguf" not in export_tab.plan_html("en", export_tab.ExportForm("runs/r"))
    # the page's handlers take the components' values positionally, in FORM order
    assert export_tab.plan_event("en", "runs/r", "", "", "auto", "none", [], True, False, False) == plan


ASCII_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,}")
# names that stay as they are in Chinese text: formats, tools, file names and placeholders
KEEP = {"GGUF", "Ollama", "Modelfile", "TEMPLATE", "tunelab", "safetensors", "auto", "bf16", "fp16", "float32",
        "prefix_adapter", "ollama", "create", "dtype", "path", "folder", "name", "identical", "total", "method",
        "out", "key", "value", "q8_0", "export", "gguf", "llama", "cpp", "token"}  # folder names


def test_every_export_text_is_translated():
    keys = [k for k in TEXTS if k.startswith("export.")]
    assert len(keys) > 20
    for key in keys:
        en, zh = TEXTS[key]
        assert zh and zh != en or key == "export.ollama", key
        leftover = set(ASCII_WORD.findall(zh)) - KEEP
        assert not leftover, (key, leftover)


def test_result_html_in_chinese_has_no_english_sentences(tmp_path):
    from tunelab.export.merge import PREFIX_NOTE
    from tunelab.export.verify import RoundTrip

    (tmp_path / "gguf").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    result = ExportResult(tmp_path, "prefix", "src", notes=[PREFIX_NOTE], modelfile=tmp_path / "gguf" / "Modelfile",
                          template_problems=[], round_trips=[RoundTrip(tmp_path / "gguf" / "a-f16.gguf", "f16", 3, 3)])
    from tunelab.export.table import TableRow

    result.table = [TableRow("merged (safetensors)", 1000, 3.5, 20.0), TableRow("gguf/a-f16.gguf", 500, 3.5, None)]
    html = export_tab.result_html(result, "zh")
    assert text("export.table.perplexity", "zh") in html and text("export.table.no_speed", "zh") in html
    for english in ("identical to training", "note", "greedy answers", "cannot be folded", "prefix adapter"):
        assert english not in html
    assert text("export.note.prefix", "zh") in html and text("export.identical", "zh") in html
    assert "identical to training" in export_tab.result_html(result, "en")


def write_gguf_source(folder: Path, file_type: int | None) -> None:
    from gguf import GGUFWriter

    gguf = folder / "src.gguf"
    writer = GGUFWriter(str(gguf), "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "tunelab_source.json").write_text(json.dumps({"gguf": str(gguf)}))


@pytest.mark.parametrize(("file_type", "expected"), [(3, torch.bfloat16), (1, torch.float16), (32, torch.bfloat16),
                                                     (0, torch.float32), (None, torch.float32)])
def test_dtype_auto_is_the_released_dtype(tiny_models, tmp_path, file_type, expected):
    base = tmp_path / "base"
    shutil.copytree(tiny_models["llama"], base)
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = "float32"  # what tunelab writes when it converts a GGUF for training
    (base / "config.json").write_text(json.dumps(config))
    assert export_dtype("auto", base) == torch.float32  # a model saved in fp32 by its author stays fp32
    write_gguf_source(base, file_type)  # converted from a GGUF: Q4_1 (3), f16 (1), bf16 (32), f32 (0)
    assert export_dtype("auto", base) == expected
    assert export_dtype("float32", base) == torch.float32  # fp32 on request
    config["dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(config))
    assert export_dtype("auto", base) == torch.bfloat16
