"""Web UI without a browser: uploads kept for reproducibility, number inputs that cannot be read, run lists that
follow the runs folder, the threads setting, and the translated data summary."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunelab.config import load_config
from tunelab.config.load import ConfigError
from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.webui.form import config_to_values, form_specs, form_to_dict
from tunelab.webui.render import whole_number

RECORD = '{"instruction": "Say hi", "output": "hi"}\n'


def _form(cfg: RunConfig):
    specs = form_specs()
    return specs, config_to_values(specs, cfg)


# ------------------------------------------------------------------------------------------------------- uploads
@pytest.fixture
def gradio_tmp(tmp_path, monkeypatch):
    """A file as gradio leaves an upload: inside its temporary upload folder."""
    folder = tmp_path / "gradio-tmp" / "0123abcd"
    folder.mkdir(parents=True)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    upload = folder / "mine.jsonl"
    upload.write_text(RECORD, encoding="utf-8")
    return upload


def test_an_upload_is_kept_under_its_hash_and_the_copy_is_what_the_form_shows(gradio_tmp, tmp_path):
    from tunelab.webui.data_tab import upload_event
    from tunelab.webui.uploads import is_temporary

    runs = tmp_path / "runs"
    status, path = upload_event(SimpleNamespace(runs_dir=runs), "en", str(gradio_tmp))
    digest = hashlib.sha256(RECORD.encode()).hexdigest()
    assert Path(path) == (runs / "_data" / digest / "mine.jsonl").resolve()
    assert Path(path).read_text(encoding="utf-8") == RECORD and not is_temporary(path)
    assert (runs / "_data" / digest / "SHA256SUMS").read_text() == f"{digest}  mine.jsonl\n"
    assert digest in status
    gradio_tmp.unlink()  # gradio cleans its folder: the kept copy stays
    assert Path(path).is_file()


def test_the_config_of_a_run_started_from_the_form_names_the_kept_copy(gradio_tmp, tmp_path):
    """A path still in gradio's folder (typed, or filled in before the fix) is replaced when the YAML is written."""
    from tunelab.webui.train_tab import _yaml_of

    runs = tmp_path / "runs"
    cfg = load_config(None, [f"data.datasets=[{{path: {gradio_tmp}}}]", f"train.output_dir={runs}"])
    specs, values = _form(cfg)
    text_yaml = _yaml_of(specs, values, {})
    (tmp_path / "c.yaml").write_text(text_yaml, encoding="utf-8")
    kept = Path(load_config(tmp_path / "c.yaml").data.datasets[0].path)
    assert kept.parent == (runs / "_data" / hashlib.sha256(RECORD.encode()).hexdigest()).resolve()
    assert str(gradio_tmp.parent) not in text_yaml
    os.remove(gradio_tmp)
    assert kept.read_text(encoding="utf-8") == RECORD


def test_the_same_content_is_stored_once_and_other_paths_are_left_alone(gradio_tmp, tmp_path):
    from tunelab.webui.uploads import keep_upload, keep_uploaded_datasets

    runs = tmp_path / "runs"
    first = keep_upload(gradio_tmp, runs)
    again = gradio_tmp.parent.parent / "other" / "mine.jsonl"
    again.parent.mkdir()
    again.write_text(RECORD, encoding="utf-8")
    assert keep_upload(again, runs) == first and len(list((runs / "_data").iterdir())) == 1
    mine = tmp_path / "my.jsonl"
    mine.write_text(RECORD, encoding="utf-8")
    data = {"data": {"datasets": [{"path": str(mine)}, {"name": "identity"}]}}
    assert keep_uploaded_datasets(data, runs) == [] and data["data"]["datasets"][0]["path"] == str(mine)
    with pytest.raises(FileNotFoundError, match="upload it again"):
        keep_upload(tmp_path / "gone.jsonl", runs)


def test_run_lists_skip_the_kept_data_folder(gradio_tmp, tmp_path):
    from tunelab.webui.eval_tab import run_choices
    from tunelab.webui.uploads import keep_upload

    keep_upload(gradio_tmp, tmp_path / "runs")
    assert run_choices(tmp_path / "runs") == []


# ------------------------------------------------------------------------------------------------ number inputs
def test_a_number_input_holding_letters_is_an_error_not_the_default():
    """gr.Number sends None for text it cannot read ("abc", "1e") and for an emptied input; before, the field was
    left out and the schema default was written without a word."""
    specs, values = _form(RunConfig())
    keys = [s.key for s in specs]
    values[keys.index("train.lr")] = None
    values[keys.index("train.batch_size")] = ""
    with pytest.raises(ConfigError) as e:
        form_to_dict(specs, values)
    assert "train.lr: expected a number" in str(e.value)
    assert "train.batch_size: expected an integer" in str(e.value)


def test_an_optional_integer_text_input_refuses_a_fraction():
    specs, values = _form(RunConfig())
    values[[s.key for s in specs].index("train.save_steps")] = "2.5"
    with pytest.raises(ConfigError, match=r"train.save_steps: expected an integer, got '2.5'"):
        form_to_dict(specs, values)


def test_data_and_eval_number_inputs_say_which_input_is_wrong():
    from tunelab.webui.data_tab import DataChoice, data_config
    from tunelab.webui.eval_tab import eval_config

    with pytest.raises(TunelabError, match="cutoff_len: expected a whole number"):
        data_config(DataChoice("x.jsonl", cutoff=None))
    assert data_config(DataChoice("x.jsonl", cutoff=256.0)).cutoff_len == 256
    with pytest.raises(TunelabError, match="max_samples: expected a whole number"):
        eval_config("some/model", ["loss"], None, 64)
    with pytest.raises(TunelabError, match="max_new_tokens: expected a whole number >= 1"):
        eval_config("some/model", ["loss"], 5, 0)
    assert eval_config("some/model", ["loss"], 5, 16).max_new_tokens == 16
    assert whole_number("7", "n") == 7
    with pytest.raises(TunelabError, match="n: expected a whole number, got 'abc'"):
        whole_number("abc", "n")


# ---------------------------------------------------------------------------------------------------- run lists
def test_run_pickers_update_only_when_the_runs_folder_changes(tmp_path):
    from tunelab.webui.eval_tab import runs_changed

    runs = tmp_path / "runs"
    assert runs_changed(str(runs), []) is None  # no folder yet: nothing to show, nothing changed
    run = runs / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n", encoding="utf-8")
    (run / "run.json").write_text('{"status": "running"}', encoding="utf-8")
    found = runs_changed(str(runs), [])
    assert found == [str(run)]
    assert runs_changed(str(runs), found) is None


# ------------------------------------------------------------------------------------------------------ threads
def test_page_threads_follow_training_rule(monkeypatch):
    import torch

    from tunelab.training import speed
    from tunelab.webui.app import apply_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(speed, "usable_cores", lambda: 3)
        assert apply_threads(None) == 3 == torch.get_num_threads()  # training's default: one per usable core
        assert apply_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as training: the environment's choice is left alone
        torch.set_num_threads(2)
        assert apply_threads(None) == 2
    finally:
        torch.set_num_threads(before)


def test_the_threads_input_is_checked_and_applied(monkeypatch):
    import torch

    from tunelab.webui.app import set_page_threads

    ui = SimpleNamespace(threads=None)
    ui.apply_threads = lambda: __import__("tunelab.webui.app", fromlist=["x"]).apply_threads(ui.threads)
    before = torch.get_num_threads()
    try:
        assert "1" in set_page_threads(ui, "en", 1) and torch.get_num_threads() == 1 and ui.threads == 1
        assert "线程" in set_page_threads(ui, "zh", 1)
        with pytest.raises(TunelabError, match="threads: expected a whole number"):
            set_page_threads(ui, "en", None)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- data summary, histogram
@pytest.fixture
def prepared_demo(tiny_llama):
    """The bundled Chinese demo set through the data stage with a tiny tokenizer (real stats, real lengths)."""
    from tunelab.webui.app import bundled_dataset_dir
    from tunelab.webui.data_tab import DataChoice, data_config, prepare

    cfg = data_config(DataChoice(dataset_dir=bundled_dataset_dir(), name="reverse_zh_train"))
    prepared, _, _ = prepare(str(tiny_llama), cfg)
    return prepared


def test_prepare_event_takes_the_data_inputs_in_data_choice_order(tiny_llama):
    """The page passes its components positionally (DATA_INPUTS); the handler rebuilds the DataChoice from them."""
    from dataclasses import astuple

    from tunelab.webui.app import bundled_dataset_dir
    from tunelab.webui.data_tab import DATA_INPUTS, DataChoice, prepare_event

    choice = DataChoice(dataset_dir=bundled_dataset_dir(), name="reverse_zh_train", template="chatml", cutoff=128)
    assert DATA_INPUTS == ("path", "dataset_dir", "name", "fmt", "template", "cutoff", "train_on")
    status, summary, histogram, examples = prepare_event("en", str(tiny_llama), 2, *astuple(choice))
    assert "chatml" in status and "<svg" in histogram and examples.count("tl-example") == 2
    assert "128" in summary  # cutoff_len reached the data stage


def _latin_words(s: str) -> set[str]:
    import re

    return set(re.findall(r"[A-Za-z][A-Za-z-]+", s))


def test_the_data_summary_is_a_table_and_every_label_is_translated(prepared_demo):
    from tunelab.webui.data_tab import stats_html, summary_rows

    en, zh = summary_rows(prepared_demo.stats, "en"), summary_rows(prepared_demo.stats, "zh")
    assert len(en) == len(zh) and en[0][0] == "template"
    english = {"read", "rejected", "kept", "train", "validation", "trained", "reused", "written", "ends", "turns",
               "with", "records", "examples", "conversations", "tokens", "truncated", "dropped", "cache", "template",
               "dataset", "length", "file", "rejects", "max"}
    names = ["reverse_zh_train", prepared_demo.stats["template"]["name"], prepared_demo.stats["rejects_file"]]
    for (en_label, _), (zh_label, zh_value) in zip(en, zh):
        shown = zh_label + " " + zh_value
        for name in names:
            shown = shown.replace(name, "")
        assert zh_label != en_label and not _latin_words(shown) & english, shown
    html = stats_html(prepared_demo.stats, "zh")
    assert html.startswith('<table class="tl-table tl-summary-table"><tr><th>项目</th><th>数值</th></tr>')
    assert html.count("<tr>") == len(zh) + 1 and "读取记录数" in html


def test_the_histogram_spans_the_data_and_marks_cutoff_len(prepared_demo):
    from tunelab.webui.charts import histogram_bins, histogram_svg
    from tunelab.webui.data_tab import example_lengths

    lengths = example_lengths(prepared_demo)
    assert len(lengths) == prepared_demo.stats["examples"] and max(lengths) == prepared_demo.stats["length"]["max"]
    counts, edges = histogram_bins(lengths)
    assert sum(counts) == len(lengths) and (edges[0], edges[-1]) == (min(lengths), max(lengths))
    far = histogram_svg(lengths, 1024, "zh")  # cutoff far beyond the data: a note, not an axis stretched to 1024
    assert "超过所有样例" in far and "每个样例的 token 数" in far and "样例数" in far and "<line x1" in far
    assert f">{max(lengths)}<" in far and ">1024<" not in far
    inside = histogram_svg(lengths, int(prepared_demo.stats["length"]["p50"]), "en")
    assert 'stroke-dasharray' in inside and "tokens per example" in inside
    assert histogram_svg([], 1024) == "" and histogram_bins([5, 5, 5])[0] == [3]


def test_loss_legend_and_eval_headers_follow_the_language():
    from tunelab.webui.eval_tab import metrics_frame
    from tunelab.webui.train_tab import loss_frame

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]
    assert set(loss_frame(history, "zh")["series"]) == {"训练集", "验证集"}
    assert set(loss_frame(history, "en")["series"]) == {"train", "validation"}
    frame = metrics_frame(SimpleNamespace(metrics={"loss": 1.25, "bleu": 10.0}), "zh")
    assert list(frame.columns) == ["指标", "数值"] and list(frame["指标"]) == ["loss", "bleu"]


# ------------------------------------------------------------------------------------------------ start checks
def test_start_refuses_missing_data_before_spawning_a_run(tmp_path):
    """The train tab runs `tunelab validate`'s data checks (tunelab.data.check) before it starts a process."""
    from tunelab.webui.jobs import JobRunner
    from tunelab.webui.train_tab import _start_job

    missing = tmp_path / "nowhere.jsonl"
    cfg = load_config(None, [f"data.datasets=[{{path: {missing}}}]", f"train.output_dir={tmp_path / 'runs'}"])
    specs, values = _form(cfg)
    ui = SimpleNamespace(runner=JobRunner())
    with pytest.raises(ConfigError, match="nowhere.jsonl"):
        _start_job(ui, specs, values, {}, resume=False)
    assert ui.runner.job is None and not (tmp_path / "runs" / "_webui").exists()


def test_chat_handlers_build_their_dataclasses_from_the_page_values():
    pytest.importorskip("gradio")
    from tunelab.config.schema import GenerationConfig
    from tunelab.inference.engine import GenerationParams
    from tunelab.webui import chat_tab

    # the page's starting values are the generation section's defaults, which are GenerationParams' own
    assert GenerationParams(**GenerationConfig().model_dump()) == GenerationParams()
    settings = chat_tab.settings_of("Be brief.", 0.7, 0.9, 32, 1.1)
    assert settings == chat_tab.ChatSettings("Be brief.", GenerationParams(max_new_tokens=32, temperature=0.7,
                                                                           top_p=0.9, repetition_penalty=1.1))
    assert chat_tab.settings_of(None, None, None, None, None) == chat_tab.ChatSettings()
    seen = []
    ui = SimpleNamespace(apply_threads=lambda: None, engines=SimpleNamespace(get=lambda m, a=None: seen.append((m, a))))
    with pytest.raises(AttributeError):  # the recorded call is enough: the fake engine cannot chat
        list(chat_tab.send_event(ui, "en", "hi", [], [], "runs/r", "ad", "", False, "", 0.0, 1.0, 8, 1.0))
    assert seen == [("runs/r", "ad")]
    assert list(chat_tab.send_event(ui, "en", " ", [], [], "runs/r", "", "", False, "", 0, 1, 8, 1)) == [
        (chat_tab.gr.skip(),) * 4]  # an empty message sends nothing
