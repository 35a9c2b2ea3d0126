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
    """Cores not busy with other processes (at least 1): torch slows ~10x when it oversubscribes."""
    n = os.cpu_count() or 1
    try:
        load1 = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return n
    return max(1, min(n, round(n - load1 + 0.5)))


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
