"""Offline model registry: manifests in models/*.json name the PyPI packages that carry each model's files."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelNotFound
from .paths import cache_dir, home, sha256
from .safeio import atomic_write

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class ModelSpec:
    """One manifest of models/: what the model is and where its files come from."""

    name: str
    role: str
    format: str
    description: str
    packages: tuple[dict, ...]
    files: tuple[str, ...]
    size: int
    sha256: str | None
    license: str
    install: str
    default: bool = False
    origin: str = ""
    joined_name: str | None = None
    part_sha256: tuple[str, ...] = ()
    file_sha256: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Build from a manifest dict, ignoring keys this version does not know."""
        known = set(cls.__dataclass_fields__)
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)

    def to_dict(self) -> dict:
        """Plain dict for JSON output."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Verified:
    """The outcome of checking one model's files."""

    name: str
    ok: bool
    status: str  # ok | missing | mismatch
    path: str | None
    message: str
    install: str = ""
    details: list = field(default_factory=list)


def manifests(models_dir: Path | None = None) -> dict[str, ModelSpec]:
    """All model manifests, by name."""
    out = {}
    for p in sorted((models_dir or MODELS_DIR).glob("*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelNotFound(f"model manifest {p} is unreadable: {exc}", path=p,
                                fix="restore it from the repository (git checkout -- models/)") from exc
        if "name" in d and "role" in d:
            out[d["name"]] = ModelSpec.from_dict(d)
    return out


def default_for(role: str) -> ModelSpec:
    """The default model of a role (policy, text_encoder, image_encoder, ocr)."""
    for spec in manifests().values():
        if spec.role == role and spec.default:
            return spec
    raise ModelNotFound(f"no default model for role '{role}' in {MODELS_DIR}")


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _file_paths(spec: ModelSpec) -> list[Path | None]:
    # Single-package models keep every file in that package; split models keep one part per package.
    if len(spec.packages) == len(spec.files) and spec.joined_name:
        dirs = [package_dir(p["module"]) for p in spec.packages]
        return [d / f if d else None for d, f in zip(dirs, spec.files)]
    d = package_dir(spec.packages[0]["module"])
    return [d / f if d else None for f in spec.files]


def sha256_file(path: Path, _memo: dict = {}) -> str:  # noqa: B006 - process-wide memo on purpose
    """sha256 of a file, memoised per (path, size, mtime) in this process and on disk."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _memo:
        return _memo[key]
    store = home() / "sha256-cache.json"
    try:
        disk = json.loads(store.read_text())
    except (OSError, json.JSONDecodeError):
        disk = {}
    if key not in disk:
        disk[key] = sha256(path)
        atomic_write(store, json.dumps(disk))
    _memo[key] = disk[key]
    return disk[key]


def verify(spec: ModelSpec) -> Verified:
    """Check that a model's files are installed and match their recorded sha256."""
    paths = _file_paths(spec)
    missing = [f for f, p in zip(spec.files, paths) if p is None or not p.is_file()]
    if missing and not spec.default and spec.role == "policy":  # a preset: installed on request (setup.sh --qwen)
        return Verified(spec.name, True, "optional", None, "optional preset, not installed", spec.install)
    if missing:
        return Verified(spec.name, False, "missing", None,
                        f"not installed (missing {', '.join(missing)})", spec.install)
    expected = spec.part_sha256 or spec.file_sha256 or ((spec.sha256,) if spec.sha256 else ())
    bad = [str(p) for p, want in zip(paths, expected) if sha256_file(p) != want]
    if bad:
        return Verified(spec.name, False, "mismatch", str(paths[0]),
                        f"checksum mismatch: {', '.join(bad)}", spec.install.replace("pip install", "pip install --force-reinstall", 1))
    return Verified(spec.name, True, "ok", str(paths[0].parent if len(paths) > 1 else paths[0]), "ok")


def _join_parts(spec: ModelSpec, parts: list[Path]) -> Path:
    """Join a split model's parts once into the user dir (atomic, checksum-checked)."""
    out = cache_dir("models") / spec.joined_name
    if out.is_file() and out.stat().st_size == spec.size:
        return out
    tmp = out.with_suffix(f".part{os.getpid()}")
    h = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    dst.write(chunk)
    if spec.sha256 and h.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelNotFound(f"joined parts of {spec.name} do not match the recorded sha256", path=out,
                            fix="reinstall the parts: " + spec.install.replace("pip install", "pip install --force-reinstall", 1))
    os.replace(tmp, out)
    return out


def resolve(name_or_path: str | os.PathLike, role: str | None = None) -> Path:
    """A registry name or a local path (GGUF file, HF model folder, any model file) -> a local path."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file() and not any(p.glob("*.gguf")):
            raise ModelNotFound(f"{p} is a folder but holds no config.json nor *.gguf", path=p,
                                fix="pass a Hugging Face model folder, a .gguf file, or a registry name "
                                    "(see: mmhops-lite models list)")
        return p
    specs = manifests()
    spec = specs.get(str(name_or_path))
    if spec is None:
        names = ", ".join(sorted(n for n, s in specs.items() if role in (None, s.role)))
        raise ModelNotFound(f"'{name_or_path}' is neither a local path nor a known model",
                            fix=f"use one of: {names}; or a path to a .gguf file or model folder")
    paths = _file_paths(spec)
    if any(q is None or not q.is_file() for q in paths):
        raise ModelNotFound(f"model '{spec.name}' is not installed", fix=spec.install)
    if spec.joined_name:
        return _join_parts(spec, paths)
    if spec.format == "hf":
        return paths[0].parent
    return paths[0]


def shipped_adapter(policy: str) -> Path | None:
    """The LoRA adapter shipped in models/adapters/<policy>/ for a registry policy, if there is one."""
    folder = MODELS_DIR / "adapters" / str(policy)
    return folder if (folder / "adapter.gguf").is_file() or (folder / "adapter_config.json").is_file() else None


def choose_adapter(policy: str, adapter) -> Path | str | None:
    """The adapter a setting names: `auto` -> the shipped one for the policy (or None), `none`/empty -> None, else
    the path as given. The one place `auto` and `none` are read.

    >>> choose_adapter("no-such-policy", "auto") is None, choose_adapter("x", "none"), choose_adapter("x", "runs/a")
    (True, None, 'runs/a')
    """
    if adapter == "auto":
        return shipped_adapter(policy)
    return None if adapter in (None, "", "none") else adapter
