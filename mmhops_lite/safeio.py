"""Atomic, checked writes: every file mmhops-lite publishes goes through here.

A file is written under a temporary name in its own folder, flushed, fsynced, checked for its full size, then
renamed over the old one and the folder fsynced. A failed write (disk full, permissions) removes the temporary
file, leaves the old file in place and raises WriteFailed naming the folder.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from . import faults
from .errors import InputError, WriteFailed


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or unlink inside `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - not every filesystem lets a folder be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A unique hidden sibling of `path` for writing it (one convention for every temporary file)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def failed(path: Path, exc: OSError, what: str = "") -> WriteFailed:
    """The error for a write that did not complete, naming the folder and what stays in use."""
    why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    keep = f"; the previous {what} is unchanged and stays in use" if what else "; nothing was replaced"
    return WriteFailed(f"could not write {path.name} in {path.parent}: {why}{keep}", path=path.parent,
                       fix=f"free space on (or fix permissions of) {path.parent}, then run the command again")


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable, *, what: str = "") -> None:
    """Write `data` (bytes, text, or a function given the open binary file) to `path` atomically."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        faults.no_space(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                blob = data.encode("utf-8") if isinstance(data, str) else data
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
            if not callable(data) and os.fstat(f.fileno()).st_size != len(blob):
                raise OSError(errno.EIO, "short write", str(tmp))
        faults.point(f"write:{path.name}:written")
        os.replace(tmp, path)
        faults.point(f"write:{path.name}:renamed")
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise failed(path, exc, what) from exc


def atomic_json(path: str | os.PathLike, obj, *, what: str = "") -> None:
    """Write a JSON document atomically (UTF-8, indented, newline at the end)."""
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", what=what)


_RENAME_EXCHANGE = 2


def swap_dirs(new: Path, target: Path) -> Path | None:
    """Put folder `new` at `target` in one step; returns where the old target now is (to delete), or None.

    Linux's renameat2(RENAME_EXCHANGE) swaps the two names atomically, so `target` is at every moment either the
    old folder or the new one. Elsewhere the old folder is renamed aside first (a short window without `target`)."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        fsync_dir(target.parent)
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        at_fdcwd = -100
        if fn(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(target), _RENAME_EXCHANGE) == 0:
            fsync_dir(target.parent)
            return new
    aside = temp_name(target)
    os.replace(target, aside)
    os.replace(new, target)
    fsync_dir(target.parent)
    return aside


def remove_tree(path: Path | None) -> None:
    """Delete a folder mmhops-lite made (errors ignored: it is already out of use)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def open_lock(path: Path):
    """Open (creating) a lock file without following a symlink and without truncating it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path} is a symbolic link; a lock file must be a plain file", path=path,
                             fix=f"remove the link: rm {path}") from exc
        raise failed(path, exc) from exc
    return os.fdopen(fd, "r+b")


def inside(root: Path, rel: str, what: str, where: str) -> Path:
    """`root/rel` for a relative path that stays inside root with no symbolic link on the way, else InputError."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise InputError(f"{where}: {what} path {rel!r} leaves its folder {root}", path=root,
                         fix=f"give a path relative to {root}, without '..' (copy the file into the folder)")
    full = root / p
    cur = root
    for part in p.parts:
        cur = cur / part
        if cur.is_symlink():
            raise InputError(f"{where}: {what} {cur} is a symbolic link; links are not followed", path=cur,
                             fix="copy the file itself into the folder")
    return full
