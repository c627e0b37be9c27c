"""Web UI without a browser: the schema-generated form, YAML round trips, error messages, i18n, job watching."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.config.load import ConfigError, config_from_dict
from tunelab.config.schema import LoraConfig, PrefixConfig, RunConfig
from tunelab.errors import MethodUnavailableError
from tunelab.webui.form import config_to_values, form_specs, form_to_dict, form_yaml, method_specs
from tunelab.webui.i18n import FIELD_ZH, TEXTS, Localizer, text
from tunelab.webui.jobs import TrainingJob
from tunelab.webui.render import error_html, human_size, progress_html


def _values(cfg: RunConfig):
    specs = form_specs()
    return specs, config_to_values(specs, cfg)


def test_every_schema_field_of_the_form_sections_has_an_input():
    keys = {s.key for s in form_specs()}
    for section in ("model", "data", "train"):
        fields = type(getattr(RunConfig(), section)).model_fields
        assert {f"{section}.{name}" for name in fields} <= keys
    assert {"method.name", "method.r", "method.bits", "method.trainable_layers", "method.num_virtual_tokens"} <= keys


def test_method_fields_are_tagged_with_their_methods():
    by_name = {s.name: s for s in method_specs()}
    assert set(by_name["r"].methods) == {"lora", "dora", "qlora"}
    assert by_name["bits"].methods == ("qlora",)
    assert by_name["num_virtual_tokens"].methods == ("prefix",)
    assert set(by_name["name"].choices) == {"lora", "dora", "qlora", "full", "freeze", "prefix"}


def test_defaults_round_trip_through_the_form():
    specs, values = _values(RunConfig())
    assert config_from_dict(form_to_dict(specs, values)) == RunConfig()


def test_yaml_round_trip_keeps_every_value(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "你好", "output": "世界"}\n', encoding="utf-8")
    cfg = load_config(None, [f"data.datasets=[{{path: {data}}}]", "method.name=prefix", "method.num_virtual_tokens=4",
                             "train.max_steps=7", "train.save_steps=3", "train.report_to=[]", "data.system=你是助手",
                             "export.gguf=[q8_0]"])
    specs, values = _values(cfg)
    text_yaml = form_yaml(specs, values, extra=cfg.model_dump(mode="json"))
    (tmp_path / "c.yaml").write_text(text_yaml, encoding="utf-8")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert isinstance(again.method, PrefixConfig) and again.export.gguf == ["q8_0"]
    assert "你是助手" in text_yaml  # Chinese stays readable in the YAML


def test_only_the_selected_methods_fields_are_written():
    specs, values = _values(RunConfig())
    values[[s.key for s in specs].index("method.name")] = "freeze"
    data = form_to_dict(specs, values)
    assert set(data["method"]) == {"name", "trainable_layers", "trainable_modules"}


def test_optional_inputs_left_empty_mean_null_and_numbers_parse():
    specs, values = _values(RunConfig())
    keys = [s.key for s in specs]
    values[keys.index("train.save_steps")] = " 5 "
    values[keys.index("train.save_total_limit")] = ""
    values[keys.index("method.target_modules")] = "q_proj, v_proj"
    cfg = config_from_dict(form_to_dict(specs, values))
    assert cfg.train.save_steps == 5 and cfg.train.save_total_limit is None
    assert isinstance(cfg.method, LoraConfig) and cfg.method.target_modules == ["q_proj", "v_proj"]
    values[keys.index("method.target_modules")] = "all-linear"
    assert config_from_dict(form_to_dict(specs, values)).method.target_modules == "all-linear"


def test_bad_inputs_are_reported_together_with_their_keys():
    specs, values = _values(RunConfig())
    keys = [s.key for s in specs]
    values[keys.index("train.eval_steps")] = "often"
    values[keys.index("data.variables")] = "a: [unclosed"
    with pytest.raises(ConfigError) as e:
        form_to_dict(specs, values)
    assert "train.eval_steps: expected a number" in str(e.value) and "data.variables: not valid YAML" in str(e.value)
    values[keys.index("train.eval_steps")] = ""
    values[keys.index("data.variables")] = ""
    values[keys.index("train.lr")] = -1
    with pytest.raises(ConfigError) as e:
        config_from_dict(form_to_dict(specs, values), "from the form")
    assert "train.lr" in str(e.value)


def test_error_html_is_readable_and_never_a_traceback():
    html = error_html(MethodUnavailableError("qlora needs bitsandbytes with a kernel for this device"), "en")
    assert "MethodUnavailableError" in html and "bitsandbytes" in html and "Traceback" not in html
    html = error_html(ConfigError(["train.lr: Input should be greater than 0 (got -1)"], "cfg.yaml"), "zh")
    assert "错误" in html and "train.lr" in html
    html = error_html(KeyError("boom"), "en")  # unexpected: one line, the details go to the server log
    assert "Unexpected error" in html and "KeyError" in html and "File " not in html


def test_every_text_has_both_languages_and_the_localizer_relabels():
    assert all(en and zh for en, zh in TEXTS.values())
    assert set(FIELD_ZH) <= {s.key for s in form_specs()}
    assert text("train.saved", "zh", path="/x.yaml") == "已保存 /x.yaml"
    assert text("no.such.key", "zh") == "no.such.key"

    class Fake:
        def __init__(self, **kw):
            self.kw = kw

    L = Localizer("en")
    comp = L.make(Fake, "train.start", prop="value")
    assert comp.kw == {"value": "Start"}
    (update,) = L.updates("zh")
    assert update["value"] == "开始训练"


def test_sizes_and_progress_render(tmp_path):
    assert human_size(2048) == "2.0 KB" and human_size(10) == "10 B" and human_size(3e9) == "3.0 GB"
    snap = {"status": "running", "step": 3, "total": 12, "eta_s": 75, "elapsed_s": 20}
    html = progress_html(snap, tmp_path, "en")
    assert "3/12" in html and "01:15" in html and 'data-status="running"' in html and "width:25.0%" in html
    failed = progress_html({**snap, "status": "failed", "error": "error: data.datasets is empty"}, tmp_path, "zh")
    assert "失败" in failed and "data.datasets is empty" in failed and "tl-error" in failed


def test_job_runs_a_command_and_reads_the_run_folder(tmp_path, monkeypatch):
    """The job machinery on a stand-in command that writes what training writes (metrics.jsonl, run.json)."""
    run_dir = tmp_path / "run"
    script = tmp_path / "fake_train.py"
    script.write_text(
        "import json, pathlib, sys, time\n"
        f"run = pathlib.Path({str(run_dir)!r}); run.mkdir()\n"
        "for step in (1, 2):\n"
        "    with open(run / 'metrics.jsonl', 'a') as f:\n"
        "        f.write(json.dumps({'step': step, 'loss': 3.0 / step, 'eta_s': 1.0}) + '\\n')\n"
        "    print(f'epoch 0.5 | step {step}/4 | loss 1.0', flush=True)\n"
        "(run / 'run.json').write_text(json.dumps({'status': 'completed'}))\n",
        encoding="utf-8",
    )
    monkeypatch.setattr("tunelab.webui.jobs.train_command", lambda cfg, resume=False: [sys.executable, str(script)])
    job = TrainingJob(tmp_path / "cfg.yaml", run_dir, tmp_path / "log.txt")  # epochs: total from the log
    job.start()
    job.process.wait(timeout=30)
    snap = job.snapshot()
    assert snap["status"] == "finished" and snap["step"] == 4 and snap["total"] == 4
    assert [r["loss"] for r in snap["history"]] == [3.0, 1.5]
    assert "step 2/4" in job.log_tail()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_stop_sends_sigint_and_reports_stopped(tmp_path, monkeypatch):
    script = tmp_path / "sleepy.py"
    script.write_text("import sys, time\ntry:\n    print('ready', flush=True); time.sleep(60)\n"
                      "except KeyboardInterrupt:\n    print('saving checkpoint', flush=True); sys.exit(130)\n")
    monkeypatch.setattr("tunelab.webui.jobs.train_command", lambda cfg, resume=False: [sys.executable, str(script)])
    job = TrainingJob(tmp_path / "cfg.yaml", tmp_path / "run", tmp_path / "log.txt")
    job.start()
    deadline = time.time() + 20
    while "ready" not in job.log_tail() and time.time() < deadline:
        time.sleep(0.1)
    job.stop()
    job.process.wait(timeout=20)
    assert job.status == "stopped" and "saving checkpoint" in job.log_tail()


def test_cli_webui_arguments_and_no_gradio_import():
    import argparse

    import tunelab.cli.webui as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--port", "7999", "--password", "pw", "--lang", "zh"])
    web = cli.config_from_args(args).webui  # the flags are webui.* keys; the schema gives the rest
    assert (web.host, web.port, web.password, web.lang) == ("127.0.0.1", 7999, "pw", "zh")
    assert args.threads is None and parser.parse_args(["--threads", "3"]).threads == 3
    source = Path(cli.__file__).read_text(encoding="utf-8")
    assert "import gradio" not in source.split("def run")[0]


def test_a_failed_run_says_why(tmp_path, monkeypatch):
    script = tmp_path / "failing.py"
    script.write_text("import sys\nprint('loading')\nprint('error: data.datasets is empty', file=sys.stderr)\n"
                      "sys.exit(2)\n")
    monkeypatch.setattr("tunelab.webui.jobs.train_command", lambda cfg, resume=False: [sys.executable, str(script)])
    job = TrainingJob(tmp_path / "cfg.yaml", tmp_path / "run", tmp_path / "log.txt")
    job.start()
    job.process.wait(timeout=30)
    snap = job.snapshot()
    assert snap["status"] == "failed" and snap["error"] == "error: data.datasets is empty"
