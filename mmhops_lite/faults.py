"""Fault injection for the fault suite (tests/test_faults.py); inert unless its environment variables are set.

Write paths call `point(name)` between their steps. With MMHOPS_FAULT_KILL=N (or SCOPE:N) the process kills
itself with SIGKILL at the Nth point (counting only points whose name starts with SCOPE), which is what a power
cut or `kill -9` does at that moment. MMHOPS_FAULT_TRACE=FILE appends every point's name to FILE, so a test
learns how many points an operation has. MMHOPS_FAULT_ENOSPC=WORD makes `no_space(path)` raise "No space left on
device" for writes whose target name contains WORD.
"""
from __future__ import annotations

import errno
import os
import signal
from contextlib import contextmanager

_KILL = os.environ.get("MMHOPS_FAULT_KILL", "")
_TRACE = os.environ.get("MMHOPS_FAULT_TRACE", "")
_ENOSPC = os.environ.get("MMHOPS_FAULT_ENOSPC", "")
_scope, _, _at = _KILL.rpartition(":")
_AT = int(_at) if _at.isdigit() else 0
_hits = 0
_sections: list[str] = []


@contextmanager
def section(name: str):
    """Name the points inside a step (e.g. "publish"), so a test can kill only there: "publish/..."."""
    _sections.append(name)
    try:
        yield
    finally:
        _sections.pop()


def point(name: str) -> None:
    """A numbered place where a write path may be killed."""
    global _hits
    if not (_AT or _TRACE):
        return
    name = "/".join([*_sections, name])
    if not name.startswith(_scope):
        return
    _hits += 1
    if _TRACE:
        with open(_TRACE, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if _hits == _AT:
        os.kill(os.getpid(), signal.SIGKILL)


def no_space(path) -> None:
    """Raise ENOSPC for a write to `path` when the fault suite asks for it."""
    if _ENOSPC and _ENOSPC in os.path.basename(str(path)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def cut_short(written, target) -> None:
    """What a full disk does to a stream that is not checked: the file ends early (the fault suite's ENOSPC on a
    graph, since hnswlib writes graphs with an unchecked C++ stream)."""
    if _ENOSPC and _ENOSPC in os.path.basename(str(target)):
        size = os.path.getsize(written)
        os.truncate(written, size // 2)
