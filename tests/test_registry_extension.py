"""A new method and a new record format are one module plus one registration each, made here, outside tunelab:
selected from YAML, trained end to end, listed by `tunelab runs` with the method's summary key, and exported.

The toy method is BitFit-style: only the normalization weights (and biases, where a model has them) train.
The toy format is {"q": ..., "a": ...} records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field

from tunelab.config import load_config
from tunelab.config.load import ConfigError
from tunelab.config.schema import ExportConfig, MethodSection, RunConfig
from tunelab.data.formats import (
    FormatOptions,
    RecordError,
    RecordFormat,
    detect_format,
    register_format,
    unregister_format,
)
from tunelab.data.types import Conversation, Message
from tunelab.methods import Method, get_method, register_method, unregister_method


# ------------------------------------------------------------------------------------- the toy method (one file)
class BitFitConfig(MethodSection):
    name: Literal["bitfit"] = "bitfit"
    targets: list[str] = Field(default_factory=lambda: ["norm", "bias"],
                               description="Train the parameters whose name contains one of these.")


def apply_bitfit(model, cfg: BitFitConfig):
    for name, param in model.named_parameters():
        param.requires_grad_(any(t in name for t in cfg.targets))
    return model


BITFIT = Method("bitfit", apply_bitfit, BitFitConfig, description="only norm weights and biases",
                summary_keys=("targets",), trains_base_weights=True)


# ------------------------------------------------------------------------------------- the toy format (one file)
def qa_to_conversation(record: dict, _options) -> Conversation:
    for key in ("q", "a"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise RecordError(key, f"expected a non-empty string in {key!r}")
    return Conversation([Message("user", record["q"]), Message("assistant", record["a"])])


QA = RecordFormat("qa", qa_to_conversation, description="question/answer pairs", keys=("q", "a"))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The one registration of each; removed afterwards so other test modules see only the built-ins."""
    register_method(BITFIT)
    register_format(QA)
    yield
    unregister_method("bitfit")
    unregister_format("qa")


def write_config(tmp_path: Path, model: Path, fmt: str = "qa", method: str = "{name: bitfit, targets: [norm]}") -> Path:
    rows = [{"q": f"Reverse: {w} {i}", "a": f"{i} {w}"} for i, w in enumerate(["apple", "river", "stone", "cloud"] * 3)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    text = f"""
model: {{name: {model}}}
data:
  datasets: [{{path: qa.jsonl, format: {fmt}}}]
  cutoff_len: 64
method: {method}
train: {{output_dir: {tmp_path / 'runs'}, run_name: bitfit-run, max_steps: 3, batch_size: 4, lr: 1.0e-2,
         logging_steps: 1, save_steps: 100, report_to: [], mixed_precision: "no"}}
"""
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_registered_method_and_format_are_selected_from_yaml(tmp_path, tiny_llama):
    cfg = load_config(write_config(tmp_path, tiny_llama))
    assert isinstance(cfg.method, BitFitConfig) and cfg.method.targets == ["norm"]
    assert cfg.data.datasets[0].format == "qa"
    again = RunConfig.model_validate(cfg.model_dump(mode="json"))  # the resolved config.yaml reads back
    assert again == cfg
    schema = json.dumps(RunConfig.model_json_schema())
    assert "Train the parameters whose name contains" in schema  # the web UI / validate descriptions
    assert '"enum": ["auto", "alpaca", "sharegpt", "openai", "text", "qa", "trl", "kto"]' in schema  # then preference-only


def test_config_errors_stay_as_good_for_registered_entries(tmp_path, tiny_llama):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, tiny_llama, method="{name: bitfit, target: [norm]}"))
    assert "method.target: unknown key; valid keys here: name, targets" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=bitfitt"])
    assert "'bitfitt'" in str(e.value) and "'bitfit'" in str(e.value) and "'lora'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, tiny_llama, fmt="qaa"))
    assert "data.datasets.0.format: unknown record format; known: auto, alpaca" in str(e.value)
    assert "qa, trl, kto (got 'qaa')" in str(e.value)  # the preference-only formats come last


def test_auto_detection_and_the_web_form_know_the_new_entries():
    from tunelab.config.schema import DatasetSpec
    from tunelab.webui.form import _spec, method_specs

    assert detect_format({"q": "x", "a": "y"}, FormatOptions()) == "qa"
    assert detect_format({"instruction": "x", "output": "y"}, FormatOptions()) == "alpaca"  # built-ins still first
    with pytest.raises(RecordError, match=r"qa \(q, a\)"):
        detect_format({"question": "x"}, FormatOptions())
    by_name = {s.name: s for s in method_specs()}
    assert "bitfit" in by_name["name"].choices and by_name["targets"].methods == ("bitfit",)
    assert "bitfit: only norm weights and biases" in by_name["name"].description
    assert "qa" in _spec("data", "format", DatasetSpec.model_fields["format"]).choices


def test_a_registered_method_trains_lists_and_exports(tmp_path, tiny_llama, capsys):
    from transformers import AutoModelForCausalLM

    from tunelab.cli.main import main
    from tunelab.export.pipeline import export_model
    from tunelab.training.sft import train

    cfg = load_config(write_config(tmp_path, tiny_llama))
    result = train(cfg, echo=False)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).named_parameters())
    tuned = dict(AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float32).named_parameters())
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed and all("norm" in n for n in changed)  # the contract: norms trained, nothing else moved
    assert any("layernorm" in n for n in changed)

    assert main(["runs", str(tmp_path / "runs")]) == 0
    listing = capsys.readouterr().out
    assert "bitfit-run" in listing and "bitfit targets=['norm']" in listing

    exported = export_model(str(result.run_dir), ExportConfig(table=False), out=str(tmp_path / "export"))
    assert exported.kind == "full"  # no adapter: the trained model as is
    again = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).named_parameters())
    assert all(torch.equal(again[n], tuned[n]) for n in changed)
    assert json.loads((tmp_path / "export" / "tunelab_export.json").read_text())["method"] == "bitfit"


def test_registration_refuses_an_entry_that_does_not_describe_itself():
    class Unnamed(MethodSection):
        name: Literal["other"] = "other"

    with pytest.raises(ValueError, match="must declare"):
        Method("bitfit2", apply_bitfit, Unnamed)
    with pytest.raises(ValueError, match="not fields"):
        Method("bitfit", apply_bitfit, BitFitConfig, summary_keys=("rank",))
    with pytest.raises(ValueError, match="already registered"):
        register_method(BITFIT)
    assert get_method("bitfit").trains_base_weights




def test_a_registered_metric_is_a_valid_config_value_and_knows_its_direction():
    from pydantic import ValidationError

    from tunelab.config.schema import EvalConfig
    from tunelab.evaluation.metrics import register_metric, score_example, unregister_metric
    from tunelab.evaluation.results import lower_is_better

    with pytest.raises(ValidationError, match="unknown metric; known: loss, perplexity"):
        EvalConfig(metrics=["length_gap"])
    register_metric("length_gap", lambda p, r: {"length_gap": abs(len(p) - len(r))}, higher_is_better=False,
                    description="characters between prediction and reference lengths")
    try:
        assert EvalConfig(metrics=["length_gap"]).metrics == ["length_gap"]
        assert score_example("abc", "a", ["length_gap", "exact_match"]) == {"length_gap": 2, "exact_match": 0.0}
        assert lower_is_better("length_gap") and not lower_is_better("exact_match")
    finally:
        unregister_metric("length_gap")


def test_an_installed_plugin_registers_before_a_command_runs(tmp_path, monkeypatch, capsys):
    """A package's `tunelab.plugins` entry point: `tunelab validate` accepts the method it registers."""
    import importlib.metadata

    from tunelab.cli.main import main
    from tunelab.plugins import ENTRY_POINT_GROUP, load_plugins

    (tmp_path / "toy_plugin.py").write_text(
        "from test_registry_extension import BitFitConfig, apply_bitfit\n"
        "from tunelab.methods import Method, register_method\n"
        "def register():\n"
        "    register_method(Method('bitfit_plugin', apply_bitfit, Config))\n"
        "class Config(BitFitConfig):\n"
        "    name: __import__('typing').Literal['bitfit_plugin'] = 'bitfit_plugin'\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint("toy", "toy_plugin:register", ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [point] if group == ENTRY_POINT_GROUP else [])
    load_plugins.cache_clear()
    try:
        (tmp_path / "c.yaml").write_text("method: {name: bitfit_plugin, targets: [norm]}\n", encoding="utf-8")
        assert main(["validate", "--no-data", str(tmp_path / "c.yaml")]) == 0
        assert "bitfit_plugin" in capsys.readouterr().out
    finally:
        load_plugins.cache_clear()
        unregister_method("bitfit_plugin")
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_here:register", ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [broken])
    try:
        assert main(["validate", "--no-data", str(tmp_path / "c.yaml")]) == 2
        assert "tunelab plugin 'broken' (no_such_module_here:register) failed to load" in capsys.readouterr().err
    finally:
        load_plugins.cache_clear()
