"""Extensions installed as packages: the methods, formats, metrics and engines they register reach every command.

A package declares an entry point in the `tunelab.plugins` group (pyproject: `[project.entry-points."tunelab.plugins"]
mine = "my_pkg.tunelab_plugin"`). The CLI imports each one before it builds its parser, so a registered method is
selectable from YAML in `tunelab train`, `tunelab validate`, the web UI and the training processes the web UI starts
(they run the CLI too). The target is a module that registers on import, or a function called with no arguments.
"""

from __future__ import annotations

import functools
import types

from tunelab.errors import TunelabError

ENTRY_POINT_GROUP = "tunelab.plugins"


@functools.cache
def load_plugins() -> tuple[str, ...]:
    """Import every installed plugin once; returns their names. A plugin that fails to load is an error naming it."""
    from importlib.metadata import entry_points

    names = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = point.load()
            if callable(target) and not isinstance(target, types.ModuleType):
                target()
        except Exception as e:  # any failure: say which plugin, rather than run with it half registered
            raise TunelabError(f"tunelab plugin {point.name!r} ({point.value}) failed to load: "
                               f"{type(e).__name__}: {e}") from e
        names.append(point.name)
    return tuple(names)
