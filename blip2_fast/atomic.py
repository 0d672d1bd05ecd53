"""Writes that a reader or a crash never sees half done: one helper for files, one for folders.

- `write_file(path, write)`: `write(tmp)` fills a temporary file beside `path` (same file
  system, so the rename is atomic on POSIX), which is flushed to disk and renamed over `path`;
  the folder entry is synced too, so the rename survives a power cut. On any error, including
  KeyboardInterrupt, the temporary file is removed and `path` keeps its old content.
- `replace_folder(folder, fill)`: `fill(tmp)` builds the complete new folder in a sibling
  temporary folder, which then takes the place of `folder`. On Linux the two are swapped in one
  atomic step (renameat2 RENAME_EXCHANGE), so there is no instant without a folder; elsewhere
  the old folder is moved aside first, the new one renamed in, and the old one deleted, and a
  save killed between those two renames is undone by the next save (the old folder is put back).
  A reader sees the old folder or the new one, never a mix of their files. Leftovers of a save
  that was killed (`.NAME.saving-*`, `.NAME.old-*` beside the folder) are removed by the next one.

A write that fails because the disk is full raises `DiskFullError` naming the path (torch and
safetensors report it as a RuntimeError or their own error type, with errno 28 in the text).
"""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import tempfile
from typing import Callable


class DiskFullError(OSError):
    """No space was left where a file or folder was being written; the message names the path."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` means "no space left": an OSError with ENOSPC, or a library's error whose
    text carries it (torch's RuntimeError, safetensors' SafetensorError wrap the OS error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def raise_if_disk_full(err: BaseException, path: str) -> None:
    """Re-raise `err` as a one-line `DiskFullError` naming `path` when it means the disk is full."""
    if not is_disk_full(err):
        return
    try:
        free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    raise DiskFullError(f"the disk is full: cannot write {path} ({free}); free some space and run again") from None


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
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise_if_disk_full(err, path)
        raise
    if durable:
        _sync_folder(folder)


def remove_leftovers(folder: str) -> list[str]:
    """Delete what killed saves of `folder` left beside it; returns the removed paths. A save
    killed between its two renames left no `folder`, the old one being in `.NAME.old-*`: that
    one is put back in place first (the new one, never swapped in, is discarded)."""
    parent, name = os.path.split(os.path.abspath(folder))
    if not os.path.exists(folder):
        for aside in sorted(glob.glob(os.path.join(parent, f".{name}.old-*", name)), key=os.path.getmtime):
            os.replace(aside, folder)
            break
    removed = []
    for pattern in (f".{name}.saving-*", f".{name}.old-*"):
        for path in glob.glob(os.path.join(parent, pattern)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or the file system cannot, so that the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28, or not Linux
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {b} with its new version {a}: {os.strerror(code)}")


def _swap_by_renames(tmp: str, folder: str) -> None:
    """The portable swap: the old folder aside, the new one in, the old one deleted."""
    parent, name = os.path.split(folder)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.replace(folder, os.path.join(old, name))
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(os.path.join(old, name), folder)  # put the old folder back rather than leave none
        raise
    _sync_folder(parent)
    shutil.rmtree(old, ignore_errors=True)


def replace_folder(folder: str, fill: Callable[[str], None]) -> str:
    """Build the new content with `fill(tmp_folder)`, then swap it in for `folder`; returns `folder`."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(folder)
    tmp = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        fill(tmp)
        if not os.path.exists(folder):
            os.replace(tmp, folder)
            _sync_folder(parent)
        elif exchange(tmp, folder):  # `tmp` now holds the old content
            _sync_folder(parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _swap_by_renames(tmp, folder)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(err, folder)
        raise
    return folder


__all__ = ["write_file", "replace_folder", "remove_leftovers", "exchange", "DiskFullError", "is_disk_full",
           "raise_if_disk_full"]
