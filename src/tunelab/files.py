"""Folders written whole or not at all: build in a hidden sibling, rename into place only when complete.

Used wherever tunelab writes a folder others read (exports, prepared-data caches, converted models, llama.cpp's
runtime), so an interrupted write never leaves a half folder under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield an empty folder named like `out_dir` inside a hidden sibling (so tools that name a model after its
    folder, like llama.cpp's converter, see the final name); on success it replaces `out_dir`, on any error (or
    Ctrl-C) it is deleted and `out_dir` is left untouched."""
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    staging = holder / out_dir.name
    staging.mkdir()
    try:
        yield staging
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def replace_folder(new: Path, out_dir: Path) -> None:
    """Move `new` to `out_dir`; an existing `out_dir` is first renamed aside, then deleted."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / out_dir.name)
    os.replace(new, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
