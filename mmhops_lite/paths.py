"""Where mmhops-lite keeps converted models and caches (MMHOPS_HOME)."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The user dir: $MMHOPS_HOME, else $XDG_CACHE_HOME/mmhops-lite, else ~/.cache/mmhops-lite."""
    env = os.environ.get("MMHOPS_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "mmhops-lite"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the user dir, created on demand."""
    p = home().joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def free_cores() -> int:
    """Cores not busy with other processes (at least 1): torch slows ~10x when it oversubscribes.

    Read from the kernel's count of runnable tasks now (a few samples of /proc/loadavg's fourth field), not from
    the load average: that lags by a minute, so a job started right after another ended would take one thread
    for its whole run. MMHOPS_THREADS=N overrides the estimate."""
    forced = os.environ.get("MMHOPS_THREADS", "")
    if forced.isdigit() and int(forced) > 0:
        return int(forced)
    n = os.cpu_count() or 1
    try:
        import time

        samples = []
        for _ in range(5):
            with open("/proc/loadavg", encoding="ascii") as f:
                samples.append(int(f.read().split()[3].split("/")[0]))
            time.sleep(0.002)
        busy = sorted(samples)[len(samples) // 2] - 1  # minus this process, which is running while it reads
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except OSError:  # pragma: no cover - not on every platform
            return n
    return max(1, min(n, round(n - busy + 0.25)))


LLAMA_CPP_VERSION = "0.3.36"


def llama_cpp_source() -> Path:
    """llama.cpp's converter scripts and gguf-py, unpacked from llama-cpp-python's source package by setup."""
    from .errors import MissingDependency

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    candidates = [os.environ.get("MMHOPS_LLAMA_CPP_SRC"), str(home() / f"llama.cpp-{LLAMA_CPP_VERSION}"),
                  str(Path(base) / "mmhops-lite" / f"llama.cpp-{LLAMA_CPP_VERSION}")]
    for c in candidates:
        if c and (Path(c) / "convert_hf_to_gguf.py").is_file():
            return Path(c)
    raise MissingDependency("llama.cpp's GGUF converter is not unpacked (it ships only in llama-cpp-python's "
                            "source package)", fix="run: bash scripts/setup.sh")
