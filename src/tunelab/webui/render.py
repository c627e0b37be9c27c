"""Web UI: HTML fragments (messages, errors, progress, file lists) and the error guard around every event.

Library errors (bad config, bad data, a method this device cannot run) carry messages written for people; the
guard puts them in the page. Anything else is logged with its traceback on the server and shown as a one-line
"unexpected error": never a stack trace in the page, never a silent nothing.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.webui.i18n import text

log = logging.getLogger(__name__)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def message(body: str, kind: str = "info") -> str:
    """A status box; kind is info, ok or error (styled by the CSS in app.py)."""
    return f'<div class="tl-msg tl-{kind}">{body}</div>'


def user_facing(exc: BaseException) -> bool:
    """Errors whose message is meant for the user (the CLI prints these without a traceback too)."""
    from pydantic import ValidationError

    from tunelab.config.load import ConfigError
    from tunelab.errors import TunelabError
    from tunelab.models.resolve import ModelNotFoundError

    return isinstance(exc, (TunelabError, ConfigError, ModelNotFoundError, ValidationError, FileNotFoundError))


def error_html(exc: BaseException, lang: str = "en") -> str:
    if user_facing(exc):
        body = esc(str(exc)).replace("\n", "<br>")
        return message(f"<b>{esc(text('error', lang))}</b> ({esc(type(exc).__name__)}): {body}", "error")
    log.error("web UI: unexpected error", exc_info=exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return message(f"<b>{esc(text('unexpected', lang))}</b>: {esc(type(exc).__name__)}: {esc(first)}", "error")


def guard(fn: Callable, n_outputs: int, status_at: int) -> Callable:
    """Wrap an event handler whose first input is the page language: an exception becomes an error message in
    output `status_at` and leaves the other outputs as they were. Works for plain and generator handlers."""
    import gradio as gr

    def failed(exc: BaseException, lang: str):
        outs = [gr.skip()] * n_outputs
        outs[status_at] = error_html(exc, lang)
        return outs[0] if n_outputs == 1 else tuple(outs)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(lang, *args):
            try:
                yield from fn(lang, *args)
            except Exception as e:  # noqa: BLE001 - shown in the page; unexpected ones logged with traceback
                yield failed(e, lang)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(lang, *args):
        try:
            return fn(lang, *args)
        except Exception as e:  # noqa: BLE001 - see above
            return failed(e, lang)

    return wrapper


def whole_number(value: Any, what: str, minimum: int = 1) -> int:
    """A page number input -> int. Such an input sends None both when emptied and when it holds text that is not a
    number, so None is an error naming the input, never a silent default."""
    from tunelab.errors import TunelabError

    if value is None or (isinstance(value, str) and not value.strip()):
        raise TunelabError(f"{what}: expected a whole number, got an empty or non-numeric entry")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TunelabError(f"{what}: expected a whole number, got {value!r}") from None
    if not number.is_integer() or number < minimum:
        raise TunelabError(f"{what}: expected a whole number >= {minimum}, got {value!r}")
    return int(number)


def human_size(n: float) -> str:
    """Decimal units, as `tunelab export` prints them, so the page and the terminal show the same numbers."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_html(snap: dict[str, Any], run_dir: Path, lang: str = "en") -> str:
    """Status, a progress bar, step/total, elapsed and ETA of a training run."""
    status = snap["status"]
    step, total = snap.get("step") or 0, snap.get("total")
    share = min(1.0, step / total) if total else (1.0 if status == "finished" else 0.0)
    steps = f"{step}/{total}" if total else str(step)
    kind = {"failed": "error", "finished": "ok"}.get(status, "info")
    parts = [
        f'<b class="tl-status" data-status="{esc(status)}">{esc(text("status." + status, lang))}</b>',
        f'{esc(text("progress.step", lang))} {esc(steps)}',
        f'{esc(text("progress.elapsed", lang))} {format_seconds(snap.get("elapsed_s"))}',
        f'{esc(text("progress.eta", lang))} {format_seconds(snap.get("eta_s"))}',
        f'{esc(text("progress.run", lang))} <code>{esc(run_dir)}</code>',
    ]
    bar = f'<div class="tl-bar"><div style="width:{share * 100:.1f}%"></div></div>'
    error = f'<div class="tl-run-error">{esc(snap["error"])}</div>' if snap.get("error") else ""
    return message(" · ".join(parts) + bar + error, kind)


def table_html(head: list[str] | None, rows: list[list[Any]], cls: str = "tl-table") -> str:
    th = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{th}{body}</table>'


def open_image(path: str | Path | None):
    """A PNG written by the library (data cache, run folder) as an image object: gradio serves only files under
    its allowed paths, and these live wherever the user keeps caches and runs."""
    if not path or not Path(path).is_file():
        return None
    from PIL import Image

    with Image.open(path) as img:
        return img.copy()
