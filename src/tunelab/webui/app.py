"""Web UI (the top of the pipeline): one Gradio page with a tab per stage (data, train, evaluate, chat, export).

Every tab calls the same library functions as the CLI (prepare_data, `tunelab train`, evaluate, the inference
engine, export); the UI adds layout, a language switch and readable errors, never a second implementation.

    demo = create_ui(runs_dir="runs")
    launch_ui(demo, host="127.0.0.1", port=7860, password=None)
"""

from __future__ import annotations

import atexit
import functools
import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from tunelab.config.schema import DEFAULT_MODEL
from tunelab.webui.chat_tab import EngineCache
from tunelab.webui.i18n import LANGUAGES, Localizer, text
from tunelab.webui.jobs import JobRunner
from tunelab.webui.render import guard

log = logging.getLogger(__name__)

CSS = """
.tl-msg { padding: 8px 12px; border-radius: 6px; margin: 4px 0; border: 1px solid #d0d7de; }
.tl-ok { background: #e8f5e9; border-color: #a5d6a7; }
.tl-error { background: #fdecea; border-color: #f5a3a3; color: #8a1c1c; }
.tl-info { background: #eef4fb; border-color: #b6d0ee; }
.tl-bar { height: 8px; background: #e5e7eb; border-radius: 4px; margin-top: 6px; overflow: hidden; }
.tl-bar > div { height: 100%; background: #3b82f6; }
.tl-table { border-collapse: collapse; margin: 6px 0; }
.tl-table td, .tl-table th { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; font-size: 0.9em; }
.tl-example { border: 1px solid #d0d7de; border-radius: 6px; padding: 6px 10px; margin: 6px 0;
              white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.85em; }
.tl-example .tl-src { color: #6b7280; margin-bottom: 4px; }
.tl-trained { background: #fde68a; color: #111; }
.tl-context { color: #6b7280; }
.tl-summary { font-size: 0.85em; line-height: 1.35; white-space: pre-wrap; }
"""


@dataclass
class UIContext:
    """What every tab builder needs: the localizer, the language radio, where runs live, shared services."""

    L: Localizer
    lang: Any  # gr.Radio whose value is "en" or "zh"; the first input of every event
    runs_dir: Path
    default_model: str
    dataset_dir: str  # a folder with dataset_info.json whose datasets the forms start with ("" for none)
    runner: JobRunner = field(default_factory=JobRunner)
    engines: EngineCache = field(default_factory=EngineCache)
    threads: int | None = None  # torch threads of this process's generation (chat, evaluate); None: as training

    def apply_threads(self) -> int:
        return apply_threads(self.threads)

    def registered(self) -> list[str]:
        """Dataset names registered in dataset_dir (empty when there is none or it cannot be read)."""
        from tunelab.webui.data_tab import registered_names

        try:
            return registered_names(self.dataset_dir)
        except Exception as e:  # noqa: BLE001 - a broken registry is reported when the user uses it
            log.warning("%s: %s", self.dataset_dir, e)
            return []

    def start_datasets(self) -> list[str]:
        """The training sets among the registered datasets (the bundled demo: English and Chinese)."""
        names = self.registered()
        return [n for n in names if "train" in n] or names[:1]


def apply_threads(threads: int | None) -> int:
    """Set torch's threads for the in-process generation (chat, evaluate) by training's own rule
    (training.speed.cpu_threads: the given count, else one per usable core unless OMP_NUM_THREADS is set);
    returns the count in force. Training runs in its own process and uses its config's train.threads."""
    import torch

    from tunelab.training.speed import cpu_threads, set_threads

    wanted = cpu_threads(threads)
    return set_threads(wanted) if wanted else torch.get_num_threads()


def bundled_dataset_dir() -> str:
    """The bundled demo data (examples/demo/data) when running from a checkout, else nothing."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        folder = base / "examples" / "demo" / "data"
        if (folder / "dataset_info.json").is_file():
            return str(folder.resolve())
    return ""


def create_ui(runs_dir: str | Path = "runs", lang: str = "en", default_model: str | None = None,
              dataset_dir: str | Path | None = None, threads: int | None = None) -> gr.Blocks:
    """Build the page. `runs_dir`: where runs are listed and started; `lang`: en or zh at start; `dataset_dir`:
    a dataset_info.json folder the forms start with (default: the bundled demo data, when present); `threads`:
    CPU threads of the page's own generation (chat, evaluate; default: what training uses)."""
    from tunelab.webui import chat_tab, data_tab, eval_tab, export_tab, train_tab

    L = Localizer(lang)
    with gr.Blocks(title="tunelab") as demo:
        with gr.Row(equal_height=True):
            title = gr.Markdown(f"## {L.t('title')}", elem_id="tl-title")
            L.add(title, lambda lg: {"value": f"## {Localizer(lg).t('title')}"})
            lang_radio = L.make(gr.Radio, "lang", choices=[(v, k) for k, v in LANGUAGES.items()], value=L.lang,
                                elem_id="tl-lang", scale=0, min_width=200)
            threads_box = L.make(gr.Number, "threads", info="threads.info", precision=0, minimum=1, scale=0,
                                 value=apply_threads(threads), min_width=220, elem_id="tl-threads")
        ui = UIContext(L, lang_radio, Path(runs_dir), default_model or DEFAULT_MODEL,
                       str(dataset_dir) if dataset_dir is not None else bundled_dataset_dir(), threads=threads)
        with L.make(gr.Tab, "tab.data", id="data", elem_id="tab-data"):
            data = data_tab.build(ui)
        with L.make(gr.Tab, "tab.train", id="train", elem_id="tab-train"):
            train = train_tab.build(ui)
        with L.make(gr.Tab, "tab.eval", id="eval", elem_id="tab-eval"):
            evaluate = eval_tab.build(ui)
        with L.make(gr.Tab, "tab.chat", id="chat", elem_id="tab-chat"):
            chat_tab.build(ui)
        with L.make(gr.Tab, "tab.export", id="export", elem_id="tab-export"):
            export = export_tab.build(ui)
        data_tab.connect(ui, data, train)
        eval_tab.connect_run_lists(ui, demo, evaluate, [evaluate["model"], evaluate["compare"], export["model"]])
        lang_radio.change(L.updates, lang_radio, L.components)
        threads_status = gr.HTML(elem_id="tl-threads-status")
        threads_box.change(guard(functools.partial(set_page_threads, ui), 1, 0), [lang_radio, threads_box],
                           [threads_status], show_progress="hidden")
    demo.tunelab = ui  # tests and launch_ui reach the job runner through the app
    return demo


def set_page_threads(ui: UIContext, lang: str, value) -> str:
    """The threads input changed: torch's threads are per process, so this applies to every open page."""
    from tunelab.webui.render import esc, message, whole_number

    ui.threads = whole_number(value, "threads")
    return message(esc(text("threads.set", lang, n=ui.apply_threads())), "ok")


def launch_ui(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, password: str | None = None,
              block: bool = True, quiet: bool = False):
    """Serve the page (loopback by default). With a password, the login page accepts any user name."""
    auth = None
    if password:
        def auth(_user: str, given: str) -> bool:
            return hmac.compare_digest(given.encode(), password.encode())

    ui = getattr(demo, "tunelab", None)
    if ui is not None:
        atexit.register(ui.runner.shutdown)  # a run started here gets SIGINT on exit, as Ctrl+C would give it
    demo.queue(default_concurrency_limit=4)
    return demo.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block, quiet=quiet,
                       auth_message="tunelab: any user name, the password given to tunelab webui" if auth else None,
                       show_error=False, css=CSS, footer_links=[], inbrowser=False, share=False)
