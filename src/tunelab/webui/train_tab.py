"""Web UI, Train tab: the config form (generated from the schema), YAML save/load, and a `tunelab train` process
started, watched (log, loss curve, progress, ETA) and stopped from the page."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import gradio as gr

from tunelab.webui.form import (
    DEFAULT_METHOD,
    RUN_SECTION,
    FieldSpec,
    config_to_values,
    form_sections,
    form_specs,
    form_to_dict,
    is_visible,
    to_input,
)
from tunelab.webui.i18n import field_info, text
from tunelab.webui.jobs import TrainingJob
from tunelab.webui.render import esc, guard, message, progress_html

POLL_S = 1.0  # how often a running job is redrawn
SCROLL_LOG = "() => { const t = document.querySelector('#train-log textarea'); if (t) t.scrollTop = t.scrollHeight; }"


def _input(spec: FieldSpec, lang: str, start: Any):
    """One gradio input for a config field: label = YAML key, hint = the schema description."""
    common = {"label": spec.name, "info": field_info(spec.key, spec.description, lang),
              "elem_id": f"cfg-{spec.section}-{spec.name}", "visible": is_visible(spec, DEFAULT_METHOD)}
    value = to_input(spec, start)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind in ("int", "float") and spec.optional:  # a Number input cannot be left empty (it shows 0)
        return gr.Textbox(value=value, placeholder=text("form.none", lang), **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if spec.kind == "int" else None, **common)
    if spec.kind == "choice":
        choices = [(str(c).lower() if isinstance(c, bool) else str(c), to_input(spec, c)) for c in spec.choices]
        if spec.optional:
            choices.insert(0, (text("form.default", lang), ""))
        return gr.Dropdown(choices=choices, value=value if value is not None else "", **common)
    if spec.kind == "yaml":
        return gr.Textbox(value=value, lines=3, max_lines=12, **common)
    return gr.Textbox(value=value, **common)


def _relabel(spec: FieldSpec, lang: str) -> dict:
    """What a language switch changes on a config input: its hint, and the placeholder of an optional number."""
    out = {"info": field_info(spec.key, spec.description, lang)}
    if spec.kind in ("int", "float") and spec.optional:
        out["placeholder"] = text("form.none", lang)
    return out


def start_values(ui) -> dict[str, Any]:
    """Where the form starts instead of the schema defaults: the page's model, runs folder and data."""
    starts: dict[str, Any] = {"model.name": ui.default_model, "train.output_dir": str(ui.runs_dir)}
    if ui.start_datasets():
        starts["data.dataset_dir"] = ui.dataset_dir
        starts["data.datasets"] = [{"name": name} for name in ui.start_datasets()]
    return starts


def build_form(ui) -> tuple[list[FieldSpec], list[Any], dict[str, Any]]:
    """Accordions per config section; returns the specs, their inputs (same order) and inputs by dotted key."""
    specs = form_specs()
    starts = start_values(ui)
    inputs, by_key = [], {}
    for section in form_sections():
        section_specs = [s for s in specs if s.section == section]
        if not section_specs:
            continue
        with ui.L.make(gr.Accordion, f"train.section.{section}", open=True):
            with gr.Row(equal_height=False):
                columns = [gr.Column(min_width=240) for _ in range(3)]
            for i, spec in enumerate(section_specs):
                with columns[i % 3]:
                    component = _input(spec, ui.L.lang, starts.get(spec.key, spec.default))
                ui.L.add(component, functools.partial(_relabel, spec))
                inputs.append(component)
                by_key[spec.key] = component
    return specs, inputs, by_key


def _abs_paths(data: dict) -> dict:
    """Dataset paths typed relative to where the UI runs; the YAML lives elsewhere, so make them absolute."""
    section = data.get("data") or {}
    if isinstance(section.get("dataset_dir"), str) and Path(section["dataset_dir"]).exists():
        section["dataset_dir"] = str(Path(section["dataset_dir"]).resolve())
    for spec in section.get("datasets") or []:
        if isinstance(spec, dict) and isinstance(spec.get("path"), str) and Path(spec["path"]).exists():
            spec["path"] = str(Path(spec["path"]).resolve())
    return data


class TrainEvents:
    """The Train tab's event handlers; each takes the page language first (see render.guard)."""

    def __init__(self, ui, specs: list[FieldSpec]):
        self.ui, self.specs = ui, specs

    def visibility(self, method: str, stage: str = "sft") -> list:
        return [gr.update(visible=is_visible(s, method, stage or "sft")) for s in self.specs]

    def save(self, lang, path, extra_state, *values):
        text_yaml = _yaml_of(self.specs, values, extra_state)
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text_yaml, encoding="utf-8")
        return message(esc(text("train.saved", lang, path=target)), "ok"), gr.update(value=text_yaml, visible=True)

    def load(self, lang, path):
        """Fill the form from a YAML file (validated as `tunelab train` would); unknown sections are kept."""
        import yaml

        from tunelab.config.load import load_config

        target = Path(path).expanduser()
        cfg = load_config(target)
        raw = yaml.safe_load(target.read_text(encoding="utf-8")) or {}
        stage = getattr(cfg, "stage", "sft")
        shown = [gr.update(value=v, visible=u["visible"])
                 for v, u in zip(config_to_values(self.specs, cfg), self.visibility(cfg.method.name, stage))]
        return (message(esc(text("train.loaded", lang, path=target)), "ok"), raw, *shown)

    def preview(self, lang, extra_state, *values):
        return "", gr.update(value=_yaml_of(self.specs, values, extra_state), visible=True)

    def start(self, lang, resume, extra_state, *values):
        job = _start_job(self.ui, self.specs, values, extra_state, resume)
        cmd = "tunelab " + " ".join(job.command[job.command.index("train"):])  # what a person would type
        return message(esc(text("train.started", lang, cmd=cmd)), "ok"), gr.Timer(active=True), *_poll(self.ui, lang)

    def stop(self, lang):
        if self.ui.runner.stop() is None:
            return message(esc(text("train.idle", lang))), gr.skip()
        return message(esc(text("train.stopping", lang))), gr.Timer(active=True)

    def tick(self, lang):
        job = self.ui.runner.job
        return (*_poll(self.ui, lang), gr.Timer(active=job is not None and job.running))


def build(ui) -> dict[str, Any]:
    """Lay out the Train tab and wire its events; returns the config inputs by dotted key (the Data tab fills
    data.datasets) and the status box."""
    L = ui.L
    extra = gr.State({})  # config sections the form does not show (eval, export, serve), kept from a loaded YAML
    with gr.Row(equal_height=True):
        yaml_path = L.make(gr.Textbox, "train.yaml_path", value=str(ui.runs_dir / "webui-config.yaml"), scale=3,
                           elem_id="train-yaml-path")
        load_btn = L.make(gr.Button, "train.load", prop="value", elem_id="train-load")
        save_btn = L.make(gr.Button, "train.save", prop="value", elem_id="train-save")
        preview_btn = L.make(gr.Button, "train.preview", prop="value", elem_id="train-preview")
    with gr.Row(equal_height=True):
        start_btn = L.make(gr.Button, "train.start", prop="value", variant="primary", elem_id="train-start")
        stop_btn = L.make(gr.Button, "train.stop", prop="value", variant="stop", elem_id="train-stop")
        resume = L.make(gr.Checkbox, "train.resume", elem_id="train-resume")
    status = gr.HTML(elem_id="train-status")
    yaml_view = L.make(gr.Code, "train.yaml", language="yaml", visible=False, max_lines=12, elem_id="train-yaml")
    progress = gr.HTML(elem_id="train-progress")
    with gr.Row(equal_height=True):
        plot = L.make(gr.LinePlot, "train.loss", x="step", y="loss", color="series", elem_id="train-loss",
                      height=280, x_title=L.t("train.axis.step"), y_title=L.t("train.axis.loss"),
                      color_title=L.t("train.axis.series"))
        L.add(plot, lambda lg: {k: text(f"train.axis.{v}", lg) for k, v in
                                (("x_title", "step"), ("y_title", "loss"), ("color_title", "series"))})
        log_box = L.make(gr.Textbox, "train.log", lines=13, max_lines=13, autoscroll=True, elem_id="train-log",
                         interactive=False)
    specs, inputs, by_key = build_form(ui)  # below the controls: a run is watched without scrolling
    timer = gr.Timer(POLL_S, active=False)

    ev = TrainEvents(ui, specs)
    switches = [by_key["method.name"], *([by_key[f"{RUN_SECTION}.stage"]] if f"{RUN_SECTION}.stage" in by_key else [])]
    for switch in switches:  # the selected method's fields; the align section for stages other than sft
        switch.change(ev.visibility, switches, inputs)
    save_btn.click(guard(ev.save, 2, 0), [ui.lang, yaml_path, extra, *inputs], [status, yaml_view])
    load_btn.click(guard(ev.load, 2 + len(inputs), 0), [ui.lang, yaml_path], [status, extra, *inputs])
    preview_btn.click(guard(ev.preview, 2, 0), [ui.lang, extra, *inputs], [status, yaml_view])
    start_btn.click(guard(ev.start, 5, 0), [ui.lang, resume, extra, *inputs], [status, timer, progress, plot, log_box])
    stop_btn.click(guard(ev.stop, 2, 0), [ui.lang], [status, timer])
    timer.tick(guard(ev.tick, 4, 0), [ui.lang], [progress, plot, log_box, timer])
    log_box.change(None, None, None, js=SCROLL_LOG)  # keep the newest lines in view while the run writes
    return {"inputs": by_key, "status": status}


def _form_config(specs, values, extra_state):
    """The validated RunConfig of the form, with dataset paths made absolute (the YAML is written elsewhere) and
    files still in gradio's upload folder replaced by their kept copies (see webui.uploads)."""
    from tunelab.config.load import config_from_dict
    from tunelab.config.schema import TrainConfig
    from tunelab.webui.uploads import keep_uploaded_datasets

    data = _abs_paths(form_to_dict(specs, list(values), extra_state))
    config_from_dict(data, "from the form")  # every form error is listed before any file is copied
    keep_uploaded_datasets(data, (data.get("train") or {}).get("output_dir") or TrainConfig().output_dir)
    return config_from_dict(data, "from the form")


def _yaml_of(specs, values, extra_state) -> str:
    from tunelab.config.load import dump_config

    return dump_config(_form_config(specs, values, extra_state))


def _start_job(ui, specs, values, extra_state, resume: bool) -> TrainingJob:
    """Validate the form (errors appear before anything starts), write the YAML, launch `tunelab train`."""
    from tunelab.config.load import dump_config
    from tunelab.data.check import check_data
    from tunelab.methods import check_method_available
    from tunelab.models.load import pick_device
    from tunelab.runs.rundir import select_run_dir

    cfg = _form_config(specs, values, extra_state)
    check_data(cfg, "from the form")  # a missing file or an unknown dataset name is listed now, not after a process has started
    check_method_available(cfg.method, pick_device(cfg.model.device))  # the same check training makes, shown now
    # The folder training will use (a new name, or the run to resume), chosen by training's own rule: the UI must
    # know it to watch the run, and a refused choice (checkpoints already there) shows before anything starts.
    cfg.train.run_name = select_run_dir(cfg, resume).path.name
    out = Path(cfg.train.output_dir).expanduser()
    side = out / "_webui"  # the config and log of runs started here; not a run folder itself
    side.mkdir(parents=True, exist_ok=True)
    config_path = side / f"{cfg.train.run_name}.yaml"
    config_path.write_text(dump_config(cfg), encoding="utf-8")
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else None
    job = TrainingJob(config_path, out / cfg.train.run_name, side / f"{cfg.train.run_name}.log", total, resume,
                      started=time.time())
    return ui.runner.start(job)


def _poll(ui, lang: str) -> tuple:
    """(progress html, loss dataframe, log text) of the current job."""
    job = ui.runner.job
    if job is None:
        return message(esc(text("train.idle", lang))), gr.skip(), gr.skip()
    snap = job.snapshot()
    return progress_html(snap, job.run_dir, lang), loss_frame(snap["history"], lang), job.log_tail()


def loss_frame(history: list[dict], lang: str = "en"):
    """metrics.jsonl events -> the live plot's long-format frame (step, loss, series): loss, validation loss and,
    for alignment runs, reward accuracy (webui/charts.py)."""
    import pandas as pd

    from tunelab.webui.charts import curve_rows

    rows = curve_rows(history, lang)
    if not rows:  # an empty (object-typed) frame would make the plot treat step and loss as categories for good
        return gr.skip()
    return pd.DataFrame(rows).astype({"step": "float64", "loss": "float64"})
