"""Writes that a reader or a crash never sees half done: one helper for files, one for folders.

- `write_file(path, write)`: `write(tmp)` fills a temporary file beside `path` (same file
  system, so the rename is atomic on POSIX), which is flushed to disk and renamed over `path`;
  the folder entry is synced too, so the rename survives a power cut. On any error, including
  KeyboardInterrupt, the temporary file is removed and `path` keeps its old content.
- `replace_folder(folder, fill)`: `fill(tmp)` builds the complete new folder in a sibling
  temporary folder, which then takes the place of `folder` by renames: the old folder is moved
  aside first and deleted after. A reader sees the old folder or the new one, never a mix of
  their files; only between the two renames is there briefly no folder. Leftovers of a save
  that was killed (`.NAME.saving-*`, `.NAME.old-*` beside the folder) are removed by the next one.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from typing import Callable


def _sync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) cannot open a folder: the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync of a folder is unsupported there; nothing more can be done
    finally:
        os.close(fd)


def write_file(path: str, write: Callable[[str], None], durable: bool = True) -> None:
    """Atomically replace `path` with what `write(tmp_path)` writes; `durable` also fsyncs."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        _sync_folder(folder)


def remove_leftovers(folder: str) -> list[str]:
    """Delete what killed saves of `folder` left beside it; returns the removed paths."""
    parent, name = os.path.split(os.path.abspath(folder))
    removed = []
    for pattern in (f".{name}.saving-*", f".{name}.old-*"):
        for path in glob.glob(os.path.join(parent, pattern)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def replace_folder(folder: str, fill: Callable[[str], None]) -> str:
    """Build the new content with `fill(tmp_folder)`, then swap it in for `folder`; returns `folder`."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(folder)
    tmp = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        fill(tmp)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(folder, os.path.join(old, name))
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old is not None:  # put the old folder back rather than leave none
                os.replace(os.path.join(old, name), folder)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_folder(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


__all__ = ["write_file", "replace_folder", "remove_leftovers"]
