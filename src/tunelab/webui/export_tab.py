"""Web UI, Export tab: merge an adapter, write GGUF files and an Ollama Modelfile with tunelab.export.export_model
(the same call as `tunelab export`), then list every written file with its size and the template checks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, get_args

import gradio as gr

from tunelab.webui.i18n import text
from tunelab.webui.render import esc, guard, human_size, message, table_html


def schema_choices(field: str) -> list[str]:
    """The allowed values of an ExportConfig field, read from the schema (gguf types, dtypes, quantize)."""
    from tunelab.config.schema import ExportConfig

    annotation = ExportConfig.model_fields[field].annotation
    args = get_args(annotation)
    if args and not isinstance(args[0], str):  # list[Literal[...]]
        args = get_args(args[0])
    return [str(a) for a in args]


def export_config(source: str, output: str, dtype: str, gguf: list[str], ollama: bool, quantize: str):
    """The run's own export section (as `tunelab export` uses it) with the page's choices on top."""
    from tunelab.config.schema import ExportConfig
    from tunelab.inference.artifacts import is_run_dir, read_run_config

    path = Path(source).expanduser()
    cfg = read_run_config(path).export if is_run_dir(path) else ExportConfig()
    update = {"dtype": dtype or cfg.dtype, "gguf": list(gguf or []), "ollama": bool(ollama),
              "quantize": quantize or "none", "output_dir": (output or "").strip() or cfg.output_dir}
    return ExportConfig.model_validate({**cfg.model_dump(), **update})


def result_html(result, lang: str) -> str:
    """Output folder, every file with its size, notes, template and Modelfile checks, GGUF round trips."""
    rows = [[str(path.relative_to(result.out_dir)), human_size(size)] for path, size in result.files()]
    total = sum(size for _, size in result.files())
    parts = [f"<div><b>{esc(result.kind)}</b> → <code>{esc(result.out_dir)}</code> ({esc(human_size(total))})</div>",
             table_html([text("export.files", lang), text("export.size", lang)], rows)]
    checks = [("chat template", result.template_problems)]
    if result.modelfile is not None:
        checks.append((f"Modelfile {result.modelfile} (ollama create NAME -f {result.modelfile})",
                       result.modelfile_problems))
    for what, problems in checks:
        state = "identical to training" if not problems else "DIFFERS: " + "; ".join(problems)
        parts.append(f"<div>{esc(what)}: {esc(state)}</div>")
    for rt in result.round_trips:
        parts.append(f"<div>GGUF {esc(rt.gguf.name)}: {rt.identical}/{rt.total} greedy answers identical</div>")
    parts += [f"<div>note: {esc(n)}</div>" for n in result.notes]
    return "".join(parts)


def build(ui) -> dict[str, Any]:
    L = ui.L
    with gr.Row():
        source = L.make(gr.Dropdown, "export.model", choices=[], allow_custom_value=True, scale=3,
                        elem_id="export-model")
        adapter = L.make(gr.Textbox, "chat.adapter", scale=2, elem_id="export-adapter")
    with gr.Row():
        output = L.make(gr.Textbox, "export.output", scale=3, elem_id="export-output")
        dtype = L.make(gr.Dropdown, "export.dtype", choices=schema_choices("dtype"), value="auto")
        quantize = L.make(gr.Dropdown, "export.quantize", choices=schema_choices("quantize"), value="none")
    with gr.Row():
        gguf = L.make(gr.CheckboxGroup, "export.gguf", choices=schema_choices("gguf"), value=[], elem_id="export-gguf")
        ollama = L.make(gr.Checkbox, "export.ollama", elem_id="export-ollama")
        verify = L.make(gr.Checkbox, "export.verify", elem_id="export-verify")
    run_btn = L.make(gr.Button, "export.run", prop="value", variant="primary", elem_id="export-run")
    status = gr.HTML(elem_id="export-status")
    files = gr.HTML(elem_id="export-files")

    def export(lang, source_v, adapter_v, output_v, dtype_v, quantize_v, gguf_v, ollama_v, verify_v):
        from tunelab.errors import TunelabError
        from tunelab.export.pipeline import export_model

        if not (source_v or "").strip():
            raise TunelabError("choose what to export: a run folder, an adapter or a model folder")
        cfg = export_config(source_v, output_v, dtype_v, gguf_v, ollama_v, quantize_v)
        t0 = time.perf_counter()
        result = export_model(source_v.strip(), cfg, adapter=(adapter_v or "").strip() or None, verify=bool(verify_v))
        done = text("done", lang, seconds=time.perf_counter() - t0)
        kind = "ok" if not result.template_problems and not result.modelfile_problems else "error"
        return message(esc(done), kind), result_html(result, lang)

    run_btn.click(guard(export, 2, 0), [ui.lang, source, adapter, output, dtype, quantize, gguf, ollama, verify],
                  [status, files])
    return {"model": source}
