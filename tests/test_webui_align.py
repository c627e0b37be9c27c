"""Web UI without a browser, alignment: the Train form offers `stage` and the align section from the schema, and
the live curves plot reward accuracy beside the loss."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from tunelab.config.schema import RunConfig, Section
from tunelab.webui import form
from tunelab.webui.charts import curve_rows


class _AlignStandIn(Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="DPO loss.")


class _RunWithAlign(RunConfig):
    """The schema as issue 14 extends it (used only while this branch's RunConfig has no stage yet)."""

    stage: Literal["sft", "dpo", "orpo", "simpo", "kto", "rm"] = Field("sft", description="Training stage.")
    align: _AlignStandIn = Field(default_factory=_AlignStandIn)


@pytest.fixture()
def schema(monkeypatch):
    if "stage" in RunConfig.model_fields and "align" in RunConfig.model_fields:
        return RunConfig
    monkeypatch.setattr(form, "RunConfig", _RunWithAlign)
    return _RunWithAlign


def _set(specs, values, key, value):
    values[[s.key for s in specs].index(key)] = value


def test_the_form_offers_the_stage_and_every_align_field_from_the_schema(schema):
    specs = form.form_specs()
    keys = [s.key for s in specs]
    assert keys[0] == "run.stage"  # the run's own field comes first
    assert {f"align.{name}" for name in schema.model_fields["align"].annotation.model_fields} <= set(keys)
    assert keys.index("align.beta") > keys.index("train.lr")  # after the training section
    assert form.form_sections()[-1] == "align"
    beta = next(s for s in specs if s.key == "align.beta")
    assert beta.description == schema.model_fields["align"].annotation.model_fields["beta"].description


def test_align_fields_show_and_are_written_only_for_alignment_stages(schema):
    specs = form.form_specs()
    values = form.config_to_values(specs, schema())
    beta = next(s for s in specs if s.key == "align.beta")
    assert not form.is_visible(beta, "lora", "sft") and form.is_visible(beta, "lora", "dpo")
    sft = form.form_to_dict(specs, values)
    assert sft["stage"] == "sft" and "align" not in sft and "run" not in sft
    _set(specs, values, "run.stage", "dpo")
    _set(specs, values, "align.beta", form.to_input(beta, 0.25))  # as the input shows it (text if optional)
    dpo = form.form_to_dict(specs, values)
    assert dpo["stage"] == "dpo" and dpo["align"]["beta"] == 0.25
    cfg = schema.model_validate(dpo)
    assert cfg.stage == "dpo" and cfg.align.beta == 0.25
    assert form.config_to_values(specs, cfg) == values  # and back into the same inputs


def test_a_loaded_yaml_keeps_the_sections_the_form_does_not_show(schema):
    specs = form.form_specs()
    values = form.config_to_values(specs, schema())
    data = form.form_to_dict(specs, values, extra={"eval": {"max_samples": 3}, "stage": "kto"})
    assert data["eval"] == {"max_samples": 3} and data["stage"] == "sft"  # the form's stage wins


def test_live_curves_plot_reward_accuracy_beside_the_loss():
    history = [{"step": 1, "loss": 0.693, "rewards/accuracies": 0.0}, {"step": 2, "loss": 0.61,
               "rewards/accuracies": 0.75}, {"step": 2, "eval_loss": 0.65, "eval_rewards/accuracies": 0.5},
               {"epoch": 1.0}]
    rows = curve_rows(history, "en")
    series = {r["series"] for r in rows}
    assert series == {"train", "validation", "reward accuracy", "validation reward accuracy"}
    accuracy = [(r["step"], r["loss"]) for r in rows if r["series"] == "reward accuracy"]
    assert accuracy == [(1, 0.0), (2, 0.75)]
    assert {r["series"] for r in curve_rows(history, "zh")} >= {"奖励准确率", "训练集"}
    sft = curve_rows([{"step": 1, "loss": 2.0}], "en")
    assert sft == [{"step": 1, "loss": 2.0, "series": "train"}]  # an SFT run shows its loss only


def test_a_free_string_stage_is_offered_as_the_registered_stages(monkeypatch):
    import sys
    import types

    class _StrStage(RunConfig):
        stage: str = Field("sft", description="Training stage (validated against the stage registry).")

    registry = types.ModuleType("tunelab.training.stages")
    registry.known_stages = lambda: ["dpo", "sft"]
    monkeypatch.setitem(sys.modules, "tunelab.training.stages", registry)
    monkeypatch.setattr(form, "RunConfig", _StrStage)
    (stage,) = form.section_specs(form.RUN_SECTION)
    assert stage.kind == "choice" and stage.choices == ("dpo", "sft")
