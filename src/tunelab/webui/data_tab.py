"""Web UI, Data tab: pick a file or a registered dataset, run the data stage (tunelab.data.build.build_sft_data,
the same call `tunelab data prepare` and training make) and show its summary, rejects, length histogram and a few
examples with the trained tokens highlighted."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from tunelab.webui.charts import histogram_svg
from tunelab.webui.i18n import text
from tunelab.webui.render import esc, guard, message, table_html, whole_number

if TYPE_CHECKING:
    from tunelab.config.schema import DataConfig

TRAIN_ON = ("all_assistant", "last_assistant", "everything")


def format_choices() -> list[str]:
    from tunelab.data.formats import format_choices as choices

    return choices()


def template_choices() -> list[str]:
    from tunelab.data.templates import template_names

    return ["auto", *template_names()]


def registered_names(dataset_dir: str) -> list[str]:
    from tunelab.data.sources import read_registry

    return sorted(read_registry(dataset_dir)) if dataset_dir and dataset_dir.strip() else []


@dataclass(frozen=True)
class DataChoice:
    """The page's data inputs (gradio passes them positionally, in this order: DATA_INPUTS)."""

    path: str | None = ""  # a file, folder or glob (or an upload, kept by webui.uploads)
    dataset_dir: str | None = ""
    name: str | None = ""  # a dataset registered in dataset_dir, when no path is given
    fmt: str | None = "auto"
    template: str | None = "auto"
    cutoff: Any = 1024  # a gr.Number value: float, or None when emptied
    train_on: str | None = "all_assistant"


DATA_INPUTS = tuple(f.name for f in fields(DataChoice))  # keys of `build`'s components, in DataChoice's order


def data_config(choice: DataChoice) -> DataConfig:
    """The DataConfig of the page's choices: a file/folder/glob, or a dataset registered in dataset_dir."""
    from tunelab.config.schema import DataConfig, DatasetSpec
    from tunelab.errors import TunelabError

    path, name, fmt = (choice.path or "").strip(), (choice.name or "").strip(), choice.fmt
    dataset_dir, template, cutoff, train_on = choice.dataset_dir, choice.template, choice.cutoff, choice.train_on
    if not path and not name:
        raise TunelabError("choose a data file (or upload one), or a registered dataset from data.dataset_dir")
    spec = DatasetSpec(path=path, format=fmt or "auto") if path else DatasetSpec(name=name, format=fmt or "auto")
    return DataConfig(datasets=[spec], dataset_dir=(dataset_dir or "").strip() or None, template=template or "auto",
                      cutoff_len=whole_number(cutoff, "cutoff_len"), train_on=train_on or "all_assistant", packing=False)


def prepare(model: str, cfg: DataConfig):
    """The data stage exactly as training runs it (build_sft_data), for `model` and the page's data settings."""
    from tunelab.config.schema import ModelConfig, RunConfig
    from tunelab.data.build import build_sft_data

    prepared = build_sft_data(RunConfig(model=ModelConfig(name=model), data=cfg))
    return prepared, prepared.tokenizer, prepared.template


# --------------------------------------------------------------------------------------------------- rendering
def read_rejects(path: str | None, limit: int = 50) -> list[dict]:
    """The first `limit` rejects prepare_data wrote (one JSON object per line: source, field, reason, rule)."""
    import json

    if not path or not Path(path).is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= limit:
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def summary_rows(stats: dict, lang: str = "en") -> list[list[str]]:
    """The summary `tunelab data prepare` prints (data.preview.summary), as (what, value) rows in the page language."""
    def t(key: str, **values) -> str:
        return text(f"sum.{key}", lang, **values)

    stops = ", ".join(stats["template"]["stop_strings"]) or "eos"
    rows = [[t("template"), t("template.v", name=stats["template"]["name"], stops=stops)]]
    for d in stats.get("datasets", []):
        rows.append([t("dataset", name=d["name"]), t("dataset.v", read=d["records_read"], rejected=d["rejected"],
                                                       kept=d["kept"])])
    rows.append([t("records_read"), str(stats["records_read"])])
    rejected = stats["rejected"]
    by_reason = ", ".join(f"{k}: {v}" for k, v in rejected["by_reason"].items())
    rows.append([t("rejected"), f"{rejected['total']}" + (f" ({by_reason})" if by_reason else "")])
    rows += [[t("cleaning", rule=rule), str(n)] for rule, n in stats.get("cleaning", {}).items()]
    rows += [
        [t("conversations"), str(stats["conversations"])],
        [t("examples"), t("examples.v", n=stats["examples"], train=stats["train_examples"],
                          validation=stats["validation_examples"])],
        [t("truncated"), t("truncated.v", n=stats["truncated"], cutoff=stats["cutoff_len"])],
    ]
    if stats.get("chunked_documents"):
        rows.append([t("chunked"), str(stats["chunked_documents"])])
    rows += [[t("dropped"), str(stats["dropped_no_trainable"])],
             [t("tokens"), t("tokens.v", n=stats["tokens"], trained=stats["trained_tokens"])]]
    if stats.get("turns_without_end"):
        rows.append([t("no_end"), str(stats["turns_without_end"])])
    length = stats.get("length") or {}
    if length:
        rows.append([t("length"), f"{length['p50']:.0f} / {length['p90']:.0f} / {length['p99']:.0f} / {length['max']}"])
    cache = t("cache.reused" if stats.get("cache_hit") else "cache.written")
    rows += [[t("rejects_file"), str(stats.get("rejects_file", ""))], [t("cache"), f"{cache}: {stats['fingerprint']}"]]
    return rows


def stats_html(stats: dict, lang: str = "en") -> str:
    """The summary as a two-column table, then the rejects with their file, line, field and reason."""
    parts = [table_html([text("sum.what", lang), text("sum.value", lang)], summary_rows(stats, lang),
                        cls="tl-table tl-summary-table")]
    rejects = read_rejects(stats.get("rejects_file"))
    if rejects:
        total = (stats.get("rejected") or {}).get("total", len(rejects))
        rows = [[r.get("source", ""), r.get("field", ""), r.get("rule", ""), r.get("reason", "")] for r in rejects]
        head = [text(f"rejects.{k}", lang) for k in ("record", "field", "rule", "reason")]
        parts.append(f'<div class="tl-rejects"><b>{esc(text("rejects.title", lang, n=total))}</b>'
                     + table_html(head, rows) + "</div>")
    return "".join(parts)


def spans_html(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """One encoded example as text with the trained tokens (label != -100) highlighted; runs of tokens come from
    data.preview.segments, as in `tunelab data preview`, and are decoded whole so split characters stay intact."""
    from tunelab.data.preview import segments

    return "".join(_span(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                         trained) for trained, ids in segments(list(input_ids), list(labels)))


def _span(piece: str, trained: bool) -> str:
    return f'<span class="{"tl-trained" if trained else "tl-context"}">{esc(piece)}</span>'


def examples_html(dataset, tokenizer, n: int, lang: str = "en") -> str:
    blocks = []
    for i in range(min(n, len(dataset))):
        row = dataset[i]
        tokens = len(row["input_ids"])
        trained = sum(1 for x in row["labels"] if x != -100)
        head = text("data.example_head", lang, i=i, tokens=tokens, trained=trained)
        blocks.append(f'<div class="tl-example"><div class="tl-src">{esc(head)}</div>'
                      f'{spans_html(tokenizer, row["input_ids"], row["labels"])}</div>')
    return "".join(blocks)


def example_lengths(prepared) -> list[int]:
    """Tokens per encoded example, train and validation (what the model sees, after truncation or chunking)."""
    splits = [prepared.train] + ([prepared.validation] if prepared.validation is not None else [])
    return [len(ids) for split in splits for ids in split["input_ids"]]


def prepare_event(lang, model, n, *choice):
    """Status line, summary, length histogram and highlighted examples of the chosen data (`choice`: the
    DATA_INPUTS values)."""
    cfg = data_config(DataChoice(*choice))
    prepared, tokenizer, tmpl = prepare(model, cfg)
    validation = len(prepared.validation) if prepared.validation is not None else 0
    head = text("data.prepared", lang, train=len(prepared.train), validation=validation, template=tmpl.name,
                fingerprint=prepared.fingerprint[:12])
    return (message(esc(head), "ok"), stats_html(dict(prepared.stats), lang),
            histogram_svg(example_lengths(prepared), cfg.cutoff_len, lang),
            examples_html(prepared.train, tokenizer, int(n), lang))


def upload_event(ui, lang, uploaded):
    """Keep the upload out of gradio's temporary folder (webui.uploads) and put the kept path in the form."""
    from tunelab.webui.uploads import keep_upload

    if not uploaded:
        return gr.skip(), gr.skip()
    kept = keep_upload(uploaded, ui.runs_dir)
    return message(esc(text("data.kept", lang, path=kept)), "ok"), str(kept)


def refresh_event(lang, dataset_dir):
    names = registered_names(dataset_dir)
    return "", gr.update(choices=names, value=names[0] if names else None)


# ------------------------------------------------------------------------------------------------------- layout
def build(ui) -> dict[str, Any]:
    L = ui.L
    with gr.Row():
        path = L.make(gr.Textbox, "data.path", info="data.path.info", scale=3, elem_id="data-path")
        upload = L.make(gr.File, "data.upload", type="filepath", file_count="single", scale=1, height=90,
                        elem_id="data-upload")
    with gr.Row(equal_height=True):
        dataset_dir = L.make(gr.Textbox, "data.dataset_dir", value=ui.dataset_dir, scale=2, elem_id="data-dataset-dir")
        names = ui.registered()
        name = L.make(gr.Dropdown, "data.name", choices=names, value=(ui.start_datasets() or [None])[0],
                      allow_custom_value=True, scale=2, elem_id="data-name")
        refresh = L.make(gr.Button, "data.refresh", prop="value", scale=1)
    with gr.Row():
        model = L.make(gr.Textbox, "data.model", value=ui.default_model, scale=3, elem_id="data-model")
        template = L.make(gr.Dropdown, "data.template", choices=template_choices(), value="auto",
                          allow_custom_value=True, elem_id="data-template")  # or a .jinja path
        fmt = L.make(gr.Dropdown, "data.format", choices=format_choices(), value="auto")
        cutoff = L.make(gr.Number, "data.cutoff", value=1024, precision=0, elem_id="data-cutoff")
        train_on = L.make(gr.Dropdown, "data.train_on", choices=list(TRAIN_ON), value="all_assistant")
        count = L.make(gr.Slider, "data.examples", minimum=1, maximum=20, step=1, value=3)
    with gr.Row():
        prepare_btn = L.make(gr.Button, "data.prepare", prop="value", variant="primary", elem_id="data-prepare")
        use_btn = L.make(gr.Button, "data.use", prop="value", elem_id="data-use")
    status = gr.HTML(elem_id="data-status")
    with gr.Row():
        summary = gr.HTML(elem_id="data-summary")
        histogram = gr.HTML(elem_id="data-histogram")
    L.add(gr.Markdown(L.t("data.legend")), lambda lang: {"value": text("data.legend", lang)})
    examples = gr.HTML(elem_id="data-examples")

    upload.upload(guard(functools.partial(upload_event, ui), 2, 0), [ui.lang, upload], [status, path])
    refresh.click(guard(refresh_event, 2, 0), [ui.lang, dataset_dir], [status, name])
    inputs = {"path": path, "dataset_dir": dataset_dir, "name": name, "fmt": fmt, "template": template,
              "cutoff": cutoff, "train_on": train_on}
    prepare_btn.click(guard(prepare_event, 4, 0), [ui.lang, model, count, *(inputs[k] for k in DATA_INPUTS)],
                      [status, summary, histogram, examples])
    return {"path": path, "dataset_dir": dataset_dir, "name": name, "fmt": fmt, "model": model, "template": template,
            "cutoff": cutoff, "train_on": train_on, "use": use_btn, "status": status}


def connect(ui, data: dict[str, Any], train: dict[str, Any]) -> None:
    """"Use in the Train form": copy the chosen data and model into the Train tab's config fields."""
    inputs = train["inputs"]

    def use(lang, model_v, *choice):
        import yaml

        cfg = data_config(DataChoice(*choice))
        specs = [s.model_dump(exclude_defaults=True) for s in cfg.datasets]
        datasets = yaml.safe_dump(specs, sort_keys=False, allow_unicode=True).strip()
        return (message(esc(text("data.used", lang)), "ok"), datasets, cfg.dataset_dir or "", model_v,
                cfg.template, cfg.cutoff_len, cfg.train_on)

    outputs = [data["status"], inputs["data.datasets"], inputs["data.dataset_dir"], inputs["model.name"],
               inputs["data.template"], inputs["data.cutoff_len"], inputs["data.train_on"]]
    data["use"].click(guard(use, len(outputs), 0), [ui.lang, data["model"], *(data[k] for k in DATA_INPUTS)], outputs)
