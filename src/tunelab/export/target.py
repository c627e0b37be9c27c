"""Export, step 0: decide where an export may be written, and replace a previous export atomically.

A user's folder is never written into: an existing, non-empty folder without tunelab's export marker
(tunelab_export.json) is refused unless `overwrite` is given, and so is a previous tunelab export. Every export
is written into a fresh hidden sibling folder and renamed into place only when complete, so an interrupted
export leaves the old folder as it was (and no half-old, half-new mix is ever visible under the final name).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.artifacts import EXPORT_MARKER

MODELFILE_HEADER = "# Written by tunelab export."


class ExportTargetError(TunelabError):
    """The output folder holds files that the export would replace, and replacing was not asked for."""

    def __init__(self, message: str, folder: Path | None = None):
        super().__init__(message)
        self.folder = folder  # set when a non-empty output folder was refused (the web UI offers --overwrite)


def check_target(out_dir: Path, overwrite: bool = False, sources: tuple[Path, ...] = ()) -> None:
    """Raise ExportTargetError unless `out_dir` may receive an export: missing, empty, or (with `overwrite`) a
    previous export or any folder the user explicitly gave up. Never the folder being exported from."""
    out_dir = out_dir.expanduser()
    for source in sources:
        if source is not None and _same_or_inside(Path(source), out_dir):
            raise ExportTargetError(
                f"output folder {out_dir} holds the model being exported ({source}); choose another --out"
            )
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportTargetError(f"output {out_dir} is a file, not a folder; choose another --out")
    if overwrite or not any(out_dir.iterdir()):
        return
    if (out_dir / EXPORT_MARKER).is_file():
        raise ExportTargetError(
            f"{out_dir} already holds a tunelab export; pass --overwrite to replace it (atomically: the old export "
            "stays until the new one is complete), or choose a new --out", folder=out_dir,
        )
    sample = ", ".join(sorted(p.name for p in out_dir.iterdir())[:5])
    raise ExportTargetError(
        f"refusing to export into {out_dir}: the folder is not empty ({sample}) and was not written by tunelab "
        "export (no tunelab_export.json). Choose a new --out, or pass --overwrite to REPLACE the whole folder "
        "and everything in it", folder=out_dir,
    )


def refuse_existing_file(path: Path, overwrite: bool, written_by_tunelab: bool) -> None:
    """The same rule for single files (a GGUF, a Modelfile) written outside a staged folder."""
    if not path.exists() or overwrite:
        return
    whose = "a previous tunelab export" if written_by_tunelab else "a file tunelab did not write"
    raise ExportTargetError(f"{path} already exists ({whose}); pass --overwrite to replace it, or choose a new --out")


def is_tunelab_modelfile(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(MODELFILE_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def _same_or_inside(source: Path, out_dir: Path) -> bool:
    source, out_dir = source.expanduser().resolve(), out_dir.resolve()
    return source == out_dir or out_dir in source.parents
