"""Progress bars for long data work (rich, on stderr), silent when disabled or when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable


class Progress:
    """Named bars created on first use: `advance("load", n)`, or `counter("encode", total)` -> callback(n)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _task(self, name: str, total: int | None = None) -> int:
        if name not in self._tasks:
            self._tasks[name] = self._bar.add_task(name, total=total)
        return self._tasks[name]

    def advance(self, name: str, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task(name), n)

    def counter(self, name: str, total: int) -> Callable[[int], None] | None:
        if self._bar is None:
            return None
        task = self._task(name, total)
        return lambda n: self._bar.advance(task, n)
