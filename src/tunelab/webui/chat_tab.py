"""Web UI, Chat tab: streaming chat through the inference engine (the same loader, template and stop tokens as
`tunelab chat` and the API server), alone or side by side with the base model."""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from tunelab.inference.engine import GenerationParams
from tunelab.webui.i18n import text
from tunelab.webui.render import esc, guard, message


@dataclass(frozen=True)
class ChatModels:
    """Which models answer: the tuned one (model + adapter) and, side by side, its base (given, else the run's)."""

    model: str
    adapter: str = ""
    base: str = ""
    side: bool = False


@dataclass(frozen=True)
class ChatSettings:
    """The settings accordion: the system prompt and the sampling of every answer."""

    system: str = ""
    params: GenerationParams = field(default_factory=GenerationParams)


class EngineCache:
    """Loaded engines by (model, adapter); at most `keep` stay in memory (tuned + base for side by side)."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._engines: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()

    def get(self, model: str, adapter: str | None = None):
        from tunelab.errors import TunelabError
        from tunelab.inference.hf import load_engine

        key = (model.strip(), (adapter or "").strip() or None)
        if not key[0]:
            raise TunelabError("no model given: fill in the model field")
        with self._lock:
            if key not in self._engines:
                while len(self._engines) >= self.keep:
                    self._engines.pop(next(iter(self._engines)))
                self._engines[key] = load_engine(key[0], key[1])
            return self._engines[key]

    def clear(self) -> None:
        with self._lock:
            self._engines.clear()


def base_of(model: str, adapter: str | None, base: str | None) -> str:
    """The base model to compare with: given explicitly, else the one the run or adapter was trained from."""
    from tunelab.errors import TunelabError
    from tunelab.runs.artifacts import resolve_artifact

    if base and base.strip():
        return base.strip()
    art = resolve_artifact(model, adapter or None)
    if art.adapter_path is None and art.run_dir is None:
        raise TunelabError(f"{model} is not a run or adapter, so its base model is unknown: fill in the base model "
                           "for side-by-side chat")
    return art.model_cfg.name


def plain(content: Any) -> str:
    """Chatbot message content (a string or gradio's list of content blocks) -> text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(plain(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    return "" if content is None else str(content)


def settings_of(system, temperature, top_p, max_new_tokens, repetition_penalty) -> ChatSettings:
    """The accordion's values (as _settings lists them) -> ChatSettings."""
    params = GenerationParams(max_new_tokens=int(max_new_tokens or 256), temperature=float(temperature or 0.0),
                              top_p=float(top_p or 1.0), repetition_penalty=float(repetition_penalty or 1.0))
    return ChatSettings(system or "", params)


def _session(engine, history: list[dict], settings: ChatSettings):
    from tunelab.inference.chat import ChatSession

    return ChatSession(engine, system=settings.system or None, params=settings.params,
                       history=[{"role": m["role"], "content": plain(m["content"])} for m in history])


def _stream_into(session, user: str, out: queue.Queue, slot: int, cancel: threading.Event) -> None:
    """Worker: stream one session's answer into `out` as (slot, text so far, done)."""
    try:
        shown = ""
        for event in session.ask_stream(user, cancel=cancel):
            shown += event.delta
            out.put((slot, shown, event.completion is not None))
    except Exception as e:  # noqa: BLE001 - handed to the page's thread, which shows it
        out.put((slot, e, True))


def stream_answers(engines: list, histories: list[list[dict]], user: str, settings: ChatSettings):
    """Stream the same message to every engine at once; yields the list of partial answers."""
    out: queue.Queue = queue.Queue()
    cancel = threading.Event()
    sessions = [_session(e, h, settings) for e, h in zip(engines, histories)]
    workers = [threading.Thread(target=_stream_into, args=(s, user, out, i, cancel), daemon=True)
               for i, s in enumerate(sessions)]
    for w in workers:
        w.start()
    answers, done = [""] * len(engines), [False] * len(engines)
    try:
        while not all(done):
            slot, value, finished = out.get()
            if isinstance(value, Exception):
                raise value
            answers[slot], done[slot] = value, finished
            yield list(answers)
    finally:
        cancel.set()  # the page went away or an engine failed: stop the others too


def load_event(ui, lang: str, *values):
    """Gradio handler of Load; values: model, adapter, base, side (ChatModels' fields, in order)."""
    return load_models(ui, lang, ChatModels(*values))


def load_models(ui, lang: str, models: ChatModels):
    """Load (or find loaded) the tuned model, and the base model too in side-by-side mode."""
    ui.apply_threads()
    t0 = time.perf_counter()
    names = [ui.engines.get(models.model, models.adapter).name]
    if models.side:
        names.append(ui.engines.get(base_of(models.model, models.adapter, models.base)).name)
    seconds = time.perf_counter() - t0
    return message(esc(text("chat.loaded", lang, name=" + ".join(names), seconds=seconds)), "ok")


def unload_models(ui, lang):
    ui.engines.clear()
    return message(esc(text("chat.unloaded", lang)))


def send_event(ui, lang: str, user, tuned_hist, base_hist, *values):
    """Gradio handler of Send; values: ChatModels' fields (model, adapter, base, side), then _settings' controls."""
    models, settings = ChatModels(*values[:4]), settings_of(*values[4:])
    yield from send_message(ui, lang, user, (tuned_hist, base_hist), models, settings)


def send_message(ui, lang: str, user: str, histories: tuple, models: ChatModels, settings: ChatSettings):
    """Stream the answer(s) into the chat box(es): outputs are (message box, tuned chat, base chat, status).
    `histories`: the tuned and the base chat box's messages so far."""
    if not (user or "").strip():
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    ui.apply_threads()  # the page's threads setting (torch's count is per process; see app.apply_threads)
    tuned_hist, base_hist = histories
    engines, histories = [ui.engines.get(models.model, models.adapter)], [list(tuned_hist or [])]
    if models.side:
        engines.append(ui.engines.get(base_of(models.model, models.adapter, models.base)))
        histories.append(list(base_hist or []))
    turn = [{"role": "user", "content": user}]
    t0 = time.perf_counter()
    for answers in stream_answers(engines, histories, user, settings):
        shown = [h + turn + [{"role": "assistant", "content": a}] for h, a in zip(histories, answers)]
        yield "", shown[0], shown[1] if models.side else gr.skip(), ""
    took = text("done", lang, seconds=time.perf_counter() - t0)
    yield gr.skip(), gr.skip(), gr.skip(), message(esc(f"{' | '.join(e.name for e in engines)} · {took}"), "ok")


def _settings(L) -> list:
    """System prompt and sampling controls: [system, temperature, top_p, max_new_tokens, repetition_penalty]."""
    def label(lang: str) -> dict:
        return {"label": f"{text('chat.system', lang)} / {text('chat.temperature', lang)}"}

    from tunelab.config.schema import GenerationConfig

    start = GenerationConfig()  # the generation section's defaults, as `tunelab chat` starts
    with gr.Accordion(open=True, elem_id="chat-settings", **label(L.lang)) as acc:
        system = L.make(gr.Textbox, "chat.system", lines=2, elem_id="chat-system")
        with gr.Row():
            controls = [
                L.make(gr.Slider, "chat.temperature", minimum=0, maximum=2, step=0.05, value=start.temperature),
                L.make(gr.Slider, "chat.top_p", minimum=0.05, maximum=1, step=0.05, value=start.top_p),
                L.make(gr.Slider, "chat.max_new_tokens", minimum=1, maximum=4096, step=1, value=start.max_new_tokens,
                       elem_id="chat-max-new"),
                L.make(gr.Slider, "chat.repetition_penalty", minimum=1.0, maximum=2.0, step=0.05,
                       value=start.repetition_penalty),
            ]
    L.add(acc, label)
    return [system, *controls]


def build(ui) -> dict[str, Any]:
    L = ui.L
    with gr.Row():
        model = L.make(gr.Textbox, "chat.model", info="chat.model.info", value=ui.default_model, scale=3,
                       elem_id="chat-model")
        adapter = L.make(gr.Textbox, "chat.adapter", scale=2, elem_id="chat-adapter")
        base = L.make(gr.Textbox, "chat.base", scale=2, elem_id="chat-base")
    with gr.Row(equal_height=True):
        load_btn = L.make(gr.Button, "chat.load", prop="value", elem_id="chat-load")
        unload_btn = L.make(gr.Button, "chat.unload", prop="value", elem_id="chat-unload")
        side = L.make(gr.Checkbox, "chat.side", elem_id="chat-side")
    settings = _settings(L)
    status = gr.HTML(elem_id="chat-status")
    with gr.Row():
        tuned_box = L.make(gr.Chatbot, "chat.tuned", height=380, elem_id="chat-tuned")
        base_box = L.make(gr.Chatbot, "chat.base_label", height=380, visible=False, elem_id="chat-basebox")
    with gr.Row(equal_height=True):
        msg = L.make(gr.Textbox, "chat.message", scale=5, elem_id="chat-message")
        send_btn = L.make(gr.Button, "chat.send", prop="value", variant="primary", elem_id="chat-send")
        clear_btn = L.make(gr.Button, "chat.clear", prop="value", elem_id="chat-clear")

    send = guard(functools.partial(send_event, ui), 4, 3)
    models = [model, adapter, base, side]  # ChatModels' fields, in order
    inputs = [ui.lang, msg, tuned_box, base_box, *models, *settings]
    outputs = [msg, tuned_box, base_box, status]
    load_btn.click(guard(functools.partial(load_event, ui), 1, 0), [ui.lang, *models], [status])
    unload_btn.click(guard(functools.partial(unload_models, ui), 1, 0), [ui.lang], [status])
    send_btn.click(send, inputs, outputs)
    msg.submit(send, inputs, outputs)
    clear_btn.click(lambda: ([], [], ""), None, [tuned_box, base_box, status])
    side.change(lambda v: gr.update(visible=bool(v)), side, base_box)
    return {"model": model, "adapter": adapter}
