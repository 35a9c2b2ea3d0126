"""The Encoder protocol, the per-process encoder factories and the stamped ONNX export cache."""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, ModelNotFound, require
from ..paths import free_cores, sha256
from ..safeio import atomic_write

BACKENDS = ("onnx", "torch")
OPSET = 17
# Bump when the exported graphs change shape or meaning, so every user's cache is rebuilt once.
EXPORT_FORMAT = 1


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns a list of items into L2-normalised float32 rows of width `dim`."""

    id: str
    dim: int

    def encode(self, items: list, batch_size: int = 32) -> np.ndarray:
        """Embed `items` as a float32 (N, dim) array of unit rows, in input order."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero) as float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def package_dir(package: str, install: str) -> Path:
    """The folder of an installed model package (found without importing it), or ModelNotFound with `install`."""
    from ..registry import package_dir as find

    folder = find(package)
    if folder is None:
        raise ModelNotFound(f"the model package '{package}' is not installed.", fix=install)
    return folder


def same_as_packaged(path: Path, packaged: Callable[[], Path]) -> bool:
    """Is `path` the packaged model (so it keeps the default id and cache)? False when no package is installed."""
    try:
        return path.resolve() == packaged().resolve()
    except ModelNotFound:
        return False


def slug(name: str) -> str:
    """A stable, lowercase encoder id from a user's folder or file name."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


def check_backend(backend: str) -> str:
    """The backend name, validated."""
    b = (backend or "onnx").lower()
    if b not in BACKENDS:
        raise ConfigError(f"unknown encoder backend '{backend}'.", fix="set encoders.backend to 'onnx' or 'torch'")
    return b


def torch_threads():
    """torch, with its thread pool sized to the free cores (it slows badly when it oversubscribes)."""
    torch = require("torch", "all")
    torch.set_num_threads(free_cores())
    return torch


def providers(ort) -> list[str]:
    """onnxruntime providers for the encoders: CUDA first where the installed onnxruntime has it (the
    onnxruntime-gpu package on a CUDA machine) unless MMHOPS_ENCODERS_DEVICE=cpu; the CPU otherwise (the default
    and tested path: the plain onnxruntime package has no CUDA provider)."""
    want = os.environ.get("MMHOPS_ENCODERS_DEVICE", "auto").lower()
    if want not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"MMHOPS_ENCODERS_DEVICE is '{want}'", fix="set it to auto, cpu or cuda")
    have = ort.get_available_providers()
    if want == "cuda" and "CUDAExecutionProvider" not in have:
        raise ConfigError("MMHOPS_ENCODERS_DEVICE=cuda, but this onnxruntime has no CUDA provider",
                          fix="pip install onnxruntime-gpu (in place of onnxruntime) on a CUDA machine, or unset it")
    if want != "cpu" and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_session(path: Path):
    """An onnxruntime session (CPU unless a CUDA provider is installed: see providers()) with full graph
    optimisation and CPU threads from free_cores()."""
    ort = require("onnxruntime", "all")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = free_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # the NCHWc/fusion notices are noise for users
    return ort.InferenceSession(str(path), sess_options=so, providers=providers(ort))


# ---------------------------------------------------------------- stamped ONNX cache



def _fingerprint(path: Path, known: dict | None = None) -> dict:
    """size, mtime and sha256 of a file; the hash is reused when size and mtime match the stamp (saves ~0.2 s)."""
    st = path.stat()
    fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and known.get("size") == fp["size"] and known.get("mtime_ns") == fp["mtime_ns"] and known.get("sha256"):
        fp["sha256"] = known["sha256"]
    else:
        fp["sha256"] = sha256(path)
    return fp


def _same(a: dict, b: dict) -> bool:
    return a.get("size") == b.get("size") and a.get("sha256") == b.get("sha256")


def stamp_ok(onnx_path: Path, sources: list[Path], meta: dict) -> bool:
    """True when the cached ONNX file is complete and was exported from exactly these sources and settings."""
    stamp_path = onnx_path.with_suffix(".stamp.json")
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        if stamp.get("meta") != meta or not onnx_path.is_file():
            return False
        if not _same(_fingerprint(onnx_path, stamp["onnx"]), stamp["onnx"]):
            return False
        recorded = stamp["sources"]
        if sorted(recorded) != sorted(str(s) for s in sources):
            return False
        return all(_same(_fingerprint(Path(s), recorded[str(s)]), recorded[str(s)]) for s in sources)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


_export_lock = threading.Lock()


def cached_onnx(onnx_path: Path, sources: list[Path], meta: dict, export: Callable[[Path], None],
                force: bool = False) -> Path:
    """The ONNX file at `onnx_path`, (re-)exported by `export(tmp_path)` unless its stamp matches the sources."""
    meta = {"format": EXPORT_FORMAT, "opset": OPSET, **meta}
    with _export_lock:
        if not force and stamp_ok(onnx_path, sources, meta):
            return onnx_path
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        # A temp name per process: two processes exporting at once each write their own file, and os.replace
        # makes whichever finishes last win whole; readers never see a half-written graph.
        tmp = onnx_path.with_name(f".{onnx_path.stem}.{os.getpid()}.tmp.onnx")
        try:
            export(tmp)
            os.replace(tmp, onnx_path)
        finally:
            tmp.unlink(missing_ok=True)
        stamp = {"meta": meta, "onnx": _fingerprint(onnx_path),
                 "sources": {str(s): _fingerprint(Path(s)) for s in sources}}
        # The stamp is written last, so a crash mid-export leaves no stamp and the next run exports again.
        _atomic_write_text(onnx_path.with_suffix(".stamp.json"), json.dumps(stamp, indent=1))
        return onnx_path


def cache_key(model_id: str, source: Path, default: bool) -> str:
    """Cache folder name: the model id, plus a hash of the source path for a user's own model."""
    if default:
        return model_id
    return f"{model_id}-{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------- factories

_instances: dict[tuple, object] = {}
_instances_lock = threading.Lock()


def _cached(kind: str, backend: str, model_path, build: Callable[[], object]):
    key = (kind, backend, str(Path(model_path).expanduser().resolve()) if model_path else None)
    with _instances_lock:
        if key not in _instances:
            _instances[key] = build()
        return _instances[key]


def get_text_encoder(backend: str = "onnx", model_path: str | Path | None = None):
    """The process-wide text encoder (MiniLM by default, or a sentence-transformers folder) on `backend`."""
    from .text import TextEncoder

    b = check_backend(backend)
    return _cached("text", b, model_path, lambda: TextEncoder(backend=b, model_path=model_path))


def get_image_encoder(backend: str = "onnx", model_path: str | Path | None = None):
    """The process-wide image encoder (EfficientNet-lite0 by default, or a user's .pth) on `backend`."""
    from .image import ImageEncoder

    b = check_backend(backend)
    return _cached("image", b, model_path, lambda: ImageEncoder(backend=b, model_path=model_path))


def clear_cache() -> None:
    """Forget the cached encoder instances (tests, or after changing MMHOPS_HOME)."""
    with _instances_lock:
        _instances.clear()
