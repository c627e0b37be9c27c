"""--push-to-hub: the exact files and model card that would be uploaded (the Hub is unreachable here)."""

from __future__ import annotations

import json

import pytest
from test_inference_support import make_run_dir

from tunelab.cli.main import main
from tunelab.errors import TunelabError
from tunelab.export import hub


class FakeApi:
    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, **kwargs):
        if self.fail:
            raise ConnectionError("hub unreachable")
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "commit"


def test_push_uploads_the_export_with_a_model_card(tiny_models, tmp_path):
    run = make_run_dir(tiny_models["llama"], tmp_path, "lora")
    info = json.loads((run / "run.json").read_text())
    info.update(metrics={"eval_loss": 1.2345}, data_fingerprint="abc123")
    (run / "run.json").write_text(json.dumps(info))
    api = FakeApi()
    assert main(["export", str(run), "--no-sample", "--no-table"]) == 0
    out = run / "export"
    result = hub_push(out, run, api)
    assert result == "commit"
    (_, create), (_, upload) = api.calls
    assert create == {"repo_id": "me/demo", "private": True, "exist_ok": True}
    files = upload["allow_patterns"]
    assert files == hub.hub_files(out)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "tunelab_export.json"} <= set(files)
    assert not any(f.startswith(".") for f in files) and upload["folder_path"] == str(out)
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_models['llama']}" in card and "- lora" in card
    assert "| eval_loss | 1.234 |" in card and "`abc123`" in card


def hub_push(out, run, api):
    return hub.push_to_hub(out, "me/demo", run, api=api)


def test_hub_errors_name_the_repo(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TunelabError, match="me/demo.*hub unreachable"):
        hub.push_to_hub(tmp_path, "me/demo", api=FakeApi(fail=True))


def test_cli_push_to_hub_uses_huggingface_hub(tiny_models, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    run = make_run_dir(tiny_models["llama"], tmp_path, "lora")
    assert main(["export", str(run), "--no-sample", "--no-table", "--push-to-hub", "me/demo"]) == 0
    assert "uploaded to https://huggingface.co/me/demo" in capsys.readouterr().out
    assert api.calls[1][1]["allow_patterns"] == hub.hub_files(run / "export")
