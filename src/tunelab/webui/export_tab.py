"""Web UI, Export tab: merge an adapter, write GGUF files and an Ollama Modelfile with tunelab.export.export_model
(the same call as `tunelab export`), show beforehand what will be written, then list every written file with its
size and the template checks. Every text it shows comes from i18n (English and Chinese)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

import gradio as gr

from tunelab.webui.i18n import text
from tunelab.webui.render import esc, guard, human_size, message, table_html


@dataclass(frozen=True)
class ExportForm:
    """What the Export tab's fields hold: `tunelab export SOURCE --adapter ADAPTER` and its export.* flags. The
    handlers receive the fields positionally, in this order (FORM), and build it first."""

    source: str = ""
    adapter: str = ""
    output: str = ""  # export.output_dir; empty: the run's own (<run>/export)
    dtype: str = "auto"
    quantize: str = "none"
    gguf: list[str] = field(default_factory=list)
    ollama: bool = False
    verify: bool = False
    overwrite: bool = False


FORM = [f.name for f in fields(ExportForm)]


def schema_choices(name: str) -> list[str]:
    """The allowed values of an ExportConfig field, read from the schema (gguf types, dtypes, quantize)."""
    from tunelab.config.schema import ExportConfig

    annotation = ExportConfig.model_fields[name].annotation
    args = get_args(annotation)
    if args and not isinstance(args[0], str):  # list[Literal[...]]
        args = get_args(args[0])
    return [str(a) for a in args]


def export_config(form: ExportForm):
    """The run's own export section (as `tunelab export` uses it) with the page's choices on top."""
    from tunelab.config.schema import ExportConfig
    from tunelab.runs.read import read_run_config
    from tunelab.runs.rundir import is_run_dir

    path = Path(form.source).expanduser()
    cfg = read_run_config(path).export if is_run_dir(path) else ExportConfig()
    update = {"dtype": form.dtype or cfg.dtype, "gguf": list(form.gguf or []), "ollama": bool(form.ollama),
              "quantize": form.quantize or "none", "output_dir": (form.output or "").strip() or cfg.output_dir,
              "verify": bool(form.verify), "overwrite": bool(form.overwrite)}
    return ExportConfig.model_validate({**cfg.model_dump(), **update})


def refresh_runs(runs_dir: Path) -> dict:
    """The run picker's choices read again (a run finished since the page loaded appears without a reload)."""
    from tunelab.webui.eval_tab import run_choices

    return gr.update(choices=run_choices(Path(runs_dir)))


def with_modelfile_gguf(gguf: list[str], ollama: bool):
    """Ticking the Modelfile with no GGUF type ticks q8_0: the Modelfile needs a GGUF, and this one is written."""
    from tunelab.config.schema import ExportConfig
    from tunelab.export.pipeline import planned_gguf_types

    planned = planned_gguf_types(ExportConfig(gguf=list(gguf or []), ollama=bool(ollama)))
    return gr.update(value=planned) if planned != list(gguf or []) else gr.skip()


def plan_event(lang: str, *values) -> str:
    """Gradio handler: the form's values (in FORM order) -> plan_html."""
    return plan_html(lang, ExportForm(*values))


def plan_html(lang: str, form: ExportForm) -> str:
    """What the Export button will write, before it is pressed."""
    from tunelab.config.schema import ExportConfig
    from tunelab.export.pipeline import planned_gguf_types

    cfg = ExportConfig(gguf=list(form.gguf or []), ollama=bool(form.ollama))
    source = (form.source or "").strip()
    out = (form.output or "").strip() or (f"{source}/export" if source else "<run>/export")
    items = [text("export.plan.merged", lang, dtype=form.dtype or "auto")]
    items += [f"gguf/…-{t}.gguf" for t in planned_gguf_types(cfg)]
    if form.ollama:
        items.append(text("export.plan.modelfile", lang))
    if form.quantize and form.quantize != "none":
        items.append(text("export.plan.quantized", lang, method=form.quantize))
    body = "".join(f"<li>{esc(i)}</li>" for i in items)
    return f"<div>{esc(text('export.plan', lang, out=out))}<ul>{body}</ul></div>"


def _state(problems: list[str], lang: str) -> str:
    return text("export.identical", lang) if not problems else text("export.differs", lang) + "; ".join(problems)


def _note(note: str, lang: str) -> str:
    from tunelab.export.merge import PREFIX_NOTE

    known = {PREFIX_NOTE: "export.note.prefix"}
    key = next((k for prefix, k in known.items() if note.startswith(prefix)), None)
    if key is None and note.startswith("Modelfile has no TEMPLATE"):
        key = "export.note.no_template"
    return text(key, lang) if key else note


def result_html(result, lang: str) -> str:
    """Output folder, every file with its size, notes, template and Modelfile checks, GGUF round trips."""
    rows = [[str(path.relative_to(result.out_dir)), human_size(size)] for path, size in result.files()]
    total = sum(size for _, size in result.files())
    kind = text(f"export.kind.{result.kind}", lang)
    parts = [f"<div><b>{esc(kind)}</b> → <code>{esc(result.out_dir)}</code> ({esc(human_size(total))})</div>",
             table_html([text("export.files", lang), text("export.size", lang)], rows)]
    parts.append(f"<div>{esc(text('export.template', lang))}: {esc(_state(result.template_problems, lang))}</div>")
    if result.modelfile is not None:
        what = text("export.modelfile", lang, path=result.modelfile)
        parts.append(f"<div>{esc(what)}: {esc(_state(result.modelfile_problems, lang))}</div>")
    for rt in result.round_trips:
        line = text("export.round_trip", lang, name=rt.gguf.name, identical=rt.identical, total=rt.total)
        parts.append(f"<div>{esc(line)}</div>")
    parts += [f"<div>{esc(text('export.note', lang))}: {esc(_note(n, lang))}</div>" for n in result.notes]
    if result.table:
        head = [text(f"export.table.{k}", lang) for k in ("artifact", "size", "perplexity", "speed")]
        rows = [[r.artifact, human_size(r.size_bytes), f"{r.perplexity:.3f}" if r.perplexity is not None else "-",
                 _speed_cell(r, lang)] for r in result.table]
        parts.append(table_html(head, rows))
    return "".join(parts)


def _speed_cell(row, lang: str) -> str:
    """Tokens/s and the runtime that measured it; else why not (a GPTQ folder that cannot load here says so)."""
    from tunelab.export.table import NO_LLAMA_CPP

    if row.tokens_per_s is not None:
        return f"{row.tokens_per_s:.1f}" + (f" ({row.runtime})" if row.runtime else "")
    return row.note if row.note and row.note != NO_LLAMA_CPP else text("export.table.no_speed", lang)


def refusal_html(error, lang: str) -> str:
    """The output folder is not empty: say whose files are there and offer the Overwrite box."""
    from tunelab.runs.artifacts import EXPORT_MARKER

    folder = Path(error.folder)
    key = "export.refused.export" if (folder / EXPORT_MARKER).is_file() else "export.refused.user"
    return message(esc(text(key, lang, folder=folder)), "error")


def export_event(lang: str, *values) -> tuple[str, str]:
    """Gradio handler of the Export button: the form's values (in FORM order) -> run_export."""
    return run_export(lang, ExportForm(*values))


def run_export(lang: str, form: ExportForm) -> tuple[str, str]:
    from tunelab.errors import TunelabError
    from tunelab.export.pipeline import export_model
    from tunelab.export.target import ExportTargetError

    if not (form.source or "").strip():
        raise TunelabError(text("export.missing_source", lang))
    cfg = export_config(form)
    t0 = time.perf_counter()
    try:
        result = export_model(form.source.strip(), cfg, adapter=(form.adapter or "").strip() or None)
    except ExportTargetError as e:
        if getattr(e, "folder", None) is None:
            raise
        return refusal_html(e, lang), ""
    done = text("done", lang, seconds=time.perf_counter() - t0)
    kind = "ok" if not result.template_problems and not result.modelfile_problems else "error"
    return message(esc(done), kind), result_html(result, lang)


def build(ui) -> dict[str, Any]:
    L = ui.L
    with gr.Row():
        source = L.make(gr.Dropdown, "export.model", choices=[], allow_custom_value=True, scale=3,
                        elem_id="export-model")
        adapter = L.make(gr.Textbox, "chat.adapter", scale=2, elem_id="export-adapter")
    with gr.Row():
        output = L.make(gr.Textbox, "export.output", scale=3, elem_id="export-output")
        dtype = L.make(gr.Dropdown, "export.dtype", info="export.dtype.info", choices=schema_choices("dtype"),
                       value="auto")
        quantize = L.make(gr.Dropdown, "export.quantize", choices=schema_choices("quantize"), value="none")
    with gr.Row():
        gguf = L.make(gr.CheckboxGroup, "export.gguf", choices=schema_choices("gguf"), value=[], elem_id="export-gguf")
        ollama = L.make(gr.Checkbox, "export.ollama", info="export.ollama.info", elem_id="export-ollama")
        verify = L.make(gr.Checkbox, "export.verify", elem_id="export-verify")
        overwrite = L.make(gr.Checkbox, "export.overwrite", info="export.overwrite.info", elem_id="export-overwrite")
    plan = gr.HTML(plan_html(L.lang, ExportForm()), elem_id="export-plan")
    run_btn = L.make(gr.Button, "export.run", prop="value", variant="primary", elem_id="export-run")
    status = gr.HTML(elem_id="export-status")
    files = gr.HTML(elem_id="export-files")

    source.focus(lambda: refresh_runs(ui.runs_dir), None, source)
    ollama.change(with_modelfile_gguf, [gguf, ollama], gguf)
    form = {"source": source, "adapter": adapter, "output": output, "dtype": dtype, "quantize": quantize,
            "gguf": gguf, "ollama": ollama, "verify": verify, "overwrite": overwrite}
    inputs = [ui.lang, *(form[name] for name in FORM)]  # the handlers build an ExportForm from them, in order
    for component in (ui.lang, source, output, dtype, gguf, ollama, quantize):
        component.change(plan_event, inputs, plan)
    run_btn.click(guard(export_event, 2, 0), inputs, [status, files])
    return {"model": source}
