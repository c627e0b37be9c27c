"""Issue 18: an export never overwrites what a user already has; --overwrite replaces a previous export atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_inference_support import make_run_dir

from tunelab.cli.main import main
from tunelab.config.schema import ExportConfig
from tunelab.errors import TunelabError
from tunelab.export import pipeline
from tunelab.export.modelfile import write_modelfile
from tunelab.export.pipeline import export_model
from tunelab.export.target import ExportTargetError, check_target, refuse_existing_file
from tunelab.runs.artifacts import resolve_artifact


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256), hidden ones included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(root: Path) -> Path:
    folder = root / "my-folder"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}\n')
    (folder / "notes.txt").write_text("keep\n")
    return folder


@pytest.fixture
def run(tiny_models, tmp_path):
    return make_run_dir(tiny_models["llama"], tmp_path, "lora")


def test_user_folder_is_refused_and_untouched(run, tmp_path, capsys):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    code = main(["export", str(run), "--out", str(folder), "--no-sample"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(folder) in err and "--overwrite" in err and "--out" in err and "not written by tunelab" in err
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-folder", "run-lora"]  # no staging folder left


def test_reexport_into_default_folder_needs_overwrite(run):
    first = export_model(str(run))
    assert first.out_dir == run / "export"
    before = snapshot(first.out_dir)
    with pytest.raises(ExportTargetError, match="already holds a tunelab export.*--overwrite"):
        export_model(str(run))
    assert snapshot(first.out_dir) == before


def test_overwrite_replaces_a_previous_export_without_mixing(run, tmp_path):
    out = tmp_path / "out"
    export_model(str(run), ExportConfig(max_shard_size="2MB"), out=out)
    old_files = set(snapshot(out))
    assert any(name.startswith("model-0000") for name in old_files)  # sharded
    (out / "stale.txt").write_text("from the old export")
    result = export_model(str(run), ExportConfig(overwrite=True), out=out)
    new_files = set(snapshot(out))
    assert "stale.txt" not in new_files and not any(name.startswith("model-0000") for name in new_files)
    assert "model.safetensors" in new_files
    assert {str(p.relative_to(out)) for p, _ in result.files()} == new_files  # the summary lists the export only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run-lora"]


def test_overwrite_replaces_a_user_folder_when_asked(run, tmp_path):
    folder = user_folder(tmp_path)
    export_model(str(run), ExportConfig(overwrite=True), out=folder)
    assert not (folder / "notes.txt").exists()
    assert "mine" not in json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_overwrite_keeps_the_old_export(run, tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    export_model(str(run), out=out)
    before = snapshot(out)

    def fail(*args, **kwargs):  # after the new weights are written, before the export completes
        raise error

    monkeypatch.setattr(pipeline, "template_mismatches", fail)
    with pytest.raises(type(error)):
        export_model(str(run), ExportConfig(dtype="bfloat16", overwrite=True), out=out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run-lora"]


def test_empty_or_missing_folder_is_fine_and_source_is_refused(run, tmp_path):
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty")
    check_target(tmp_path / "new" / "deeper")
    art = resolve_artifact(str(run))
    with pytest.raises(ExportTargetError, match="holds the model being exported"):
        check_target(run, overwrite=True, sources=(art.base_path, art.adapter_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportTargetError, match="is a file"):
        check_target(tmp_path / "file")


def test_gguf_and_modelfile_files_are_not_replaced(tmp_path):
    from tunelab.export.gguf import convert_to_gguf
    from tunelab.export.modelfile import Modelfile

    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"user bytes")
    with pytest.raises(ExportTargetError, match="mine.gguf already exists.*--overwrite"):
        convert_to_gguf(tmp_path, gguf, "f16")  # refused before the converter is looked for
    assert gguf.read_bytes() == b"user bytes"
    (tmp_path / "Modelfile").write_text("FROM llama3\n")
    modelfile = Modelfile("# Written by tunelab export. x\nFROM ./a.gguf\n", None, None, None, [])
    with pytest.raises(ExportTargetError, match="a file tunelab did not write"):
        write_modelfile(tmp_path, modelfile)
    assert (tmp_path / "Modelfile").read_text() == "FROM llama3\n"
    write_modelfile(tmp_path, modelfile, overwrite=True)
    with pytest.raises(ExportTargetError, match="a previous tunelab export"):
        write_modelfile(tmp_path, modelfile)
    refuse_existing_file(tmp_path / "absent", overwrite=False, written_by_tunelab=False)


def test_gguf_export_into_a_previous_export_needs_overwrite(run, tmp_path, monkeypatch):
    """GGUF files and the Modelfile live in the export folder: the folder rule covers them, converter or not."""
    out = tmp_path / "out"
    written = []

    def fake_convert(hf_dir, target, outtype, *args, **kwargs):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"gguf {outtype}".encode())
        written.append(target)
        return target

    monkeypatch.setattr(pipeline, "convert_to_gguf", fake_convert)
    first = export_model(str(run), ExportConfig(ollama=True, table=False), out=out)  # fake GGUFs
    assert first.modelfile == out / "gguf" / "Modelfile" and first.gguf["q8_0"] == out / "gguf" / "run-lora-q8_0.gguf"
    before = snapshot(out)
    with pytest.raises(ExportTargetError):
        export_model(str(run), ExportConfig(ollama=True, table=False), out=out)
    assert snapshot(out) == before
    again = export_model(str(run), ExportConfig(gguf=["f16"], ollama=True, overwrite=True, table=False), out=out)
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["Modelfile", "run-lora-f16.gguf"]
    assert "FROM ./run-lora-f16.gguf" in again.modelfile.read_text()


def test_no_final_folder_message_names_a_checkpoint_only_when_one_exists(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: x\n")
    (run / "run.json").write_text("{}")
    with pytest.raises(TunelabError) as e:
        resolve_artifact(str(run))
    message = str(e.value)
    assert "checkpoint-N" not in message and "no checkpoint" in message and "tunelab train" in message
    for step in (4, 12):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(TunelabError) as e:
        resolve_artifact(str(run))
    assert str(run / "checkpoints" / "checkpoint-12") in str(e.value) and "--resume" in str(e.value)
