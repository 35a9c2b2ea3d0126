"""Errors the CLI turns into `[error] ...` lines; each message names the path and the fix."""
from __future__ import annotations

from pathlib import Path


class MmhopsError(Exception):
    """Base of every error mmhops-lite raises on purpose."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = str(path) if path is not None else None
        self.fix = fix
        parts = [message]
        if path is not None and str(path) not in message:
            parts.append(f"(file: {path})")
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class ConfigError(MmhopsError):
    """A bad value in mmhops.toml, the environment or a flag."""


class InputError(MmhopsError):
    """Bad user input: a malformed JSONL line, a missing or unreadable image, non-UTF-8 text."""


class ModelNotFound(MmhopsError):
    """A model named in the registry is not installed, or a path does not hold a model."""


class MissingDependency(MmhopsError):
    """An optional dependency is missing; the message names the exact install command."""


class CorruptFile(MmhopsError):
    """A file mmhops-lite wrote (a bundle, a checkpoint, an index file) is truncated, altered or crafted: refused."""


class ParityFailed(MmhopsError):
    """An exported policy disagrees with the torch model more than its gate allows: the bundle is not written."""


class WriteFailed(MmhopsError):
    """A write could not complete (disk full, permissions): the previous state is kept and stays in use."""


class IndexError_(MmhopsError):
    """Base for index problems (named with a trailing underscore to avoid the builtin)."""


class IndexCorrupt(IndexError_, CorruptFile):
    """An index file is truncated, mismatched, altered or crafted; the index is not used."""


class IndexLocked(IndexError_):
    """Another process holds the index's writer lock."""


def require(module: str, extra: str):
    """Import an optional module or raise MissingDependency naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(
            f"the optional dependency '{module}' is not installed ({exc}).",
            fix=f"pip install 'mmhops-lite[{extra}]'  (or run: bash scripts/setup.sh)",
        ) from exc
