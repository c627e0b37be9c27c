"""Web UI: uploaded data files kept where a run can find them again.

Gradio stores an upload in its temporary folder (GRADIO_TEMP_DIR or <tmp>/gradio), which is cleaned when the server
restarts or the OS clears /tmp. A run whose config.yaml names that path cannot be re-made later, so every upload is
copied into a content-addressed folder next to the runs, `<runs>/_data/<sha256>/<file name>`, and that path is the
one the form, the YAML and the run's config.yaml record. The folder name is the file's SHA-256 (a SHA256SUMS file
beside it, `sha256sum -c` format, says so again); the same content uploaded twice is stored once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

DATA_FOLDER = "_data"  # under the runs folder; not a run (no run.json), so run lists skip it


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_folder() -> Path:
    """Where gradio keeps uploads (the same rule as gradio.utils.get_upload_folder)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def is_temporary(path: str | Path) -> bool:
    """True for a file inside gradio's upload folder."""
    try:
        return Path(path).expanduser().resolve().is_relative_to(upload_folder())
    except (OSError, ValueError):
        return False


def keep_upload(path: str | Path, runs_dir: str | Path) -> Path:
    """Copy `path` to `<runs_dir>/_data/<sha256>/<name>` (once per content) and return the copy's absolute path."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the uploaded file is gone (upload it again)")
    digest = sha256_of(source)
    folder = Path(runs_dir).expanduser().resolve() / DATA_FOLDER / digest
    target = folder / source.name
    if target.is_file() and sha256_of(target) == digest:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{source.name}.partial"
    shutil.copyfile(source, partial)
    os.replace(partial, target)  # a crash mid-copy never leaves a file that looks complete
    (folder / "SHA256SUMS").write_text(f"{digest}  {source.name}\n", encoding="utf-8")
    return target


def keep_uploaded_datasets(data: dict, runs_dir: str | Path) -> list[tuple[str, str]]:
    """In a config dict, replace every `data.datasets[].path` inside gradio's upload folder by its kept copy.
    Returns the (old, new) pairs. Globs and folders there are left alone (an upload is always one file)."""
    moved = []
    for spec in (data.get("data") or {}).get("datasets") or []:
        path = spec.get("path") if isinstance(spec, dict) else None
        if isinstance(path, str) and Path(path).expanduser().is_file() and is_temporary(path):
            spec["path"] = str(keep_upload(path, runs_dir))
            moved.append((path, spec["path"]))
    return moved
