"""Reading export bundles (written by export/): every file listed, named by a fixed pattern, checksum-verified
before use; unlisted files, links and paths leaving the folder are refused."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import grammar
from .errors import CorruptFile
from .paths import sha256

FORMAT = 1
MANIFEST = "manifest.json"
VISION = "vision/image-encoder.onnx"


def _load_gguf(folder: Path, base_gguf: Path | None, n_ctx: int, threads: int):
    from .backends.llamacpp import LlamaCppGenerator

    return LlamaCppGenerator(folder / "policy.gguf", n_ctx=n_ctx, threads=threads)


def _load_gguf_adapter(folder: Path, base_gguf: Path | None, n_ctx: int, threads: int):
    from .backends.llamacpp import LlamaCppGenerator

    return LlamaCppGenerator(base_gguf, n_ctx=n_ctx, threads=threads, lora_path=folder / "adapter.gguf")


def _load_onnx(folder: Path, base_gguf: Path | None, n_ctx: int, threads: int):
    from .backends.onnx_backend import OnnxGenerator

    return OnnxGenerator(folder / "policy-onnx", n_ctx=n_ctx, threads=threads)


@dataclass(frozen=True)
class Kind:
    """A bundle kind: the pattern its file names match, the file (or folder/) its loader opens, and the loader
    (folder, base GGUF for adapters, n_ctx, threads) -> generator. The writer (export/) and this reader both
    open a bundle through this table."""

    names: re.Pattern
    opened: str
    load: Callable


KINDS = {
    "gguf": Kind(re.compile(r"policy\.gguf"), "policy.gguf", _load_gguf),
    "gguf-adapter": Kind(re.compile(r"adapter\.gguf"), "adapter.gguf", _load_gguf_adapter),
    "onnx": Kind(re.compile(r"policy-onnx/[A-Za-z0-9][A-Za-z0-9._-]{0,120}"), "policy-onnx/", _load_onnx),
}


def _manifest(bundle: Path) -> dict | None:
    try:
        man = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return man if isinstance(man, dict) else None


def is_bundle(path) -> bool:
    """Does the path hold an export bundle (a manifest of a bundle kind, not an index's or a model's)?"""
    p = Path(str(path)).expanduser()
    if not p.is_dir() or (p / "config.json").is_file() or (p / MANIFEST).is_symlink():
        return False
    man = _manifest(p)
    return bool(man) and man.get("kind") in KINDS and isinstance(man.get("files"), dict) and "store" not in man


def _listed_names(bundle: Path, man: dict) -> list[str]:
    """The manifest's file names after checking each against its kind's pattern, or CorruptFile."""
    mpath = bundle / MANIFEST
    pattern, opened = KINDS[man["kind"]].names, KINDS[man["kind"]].opened
    names = list(man["files"])
    for name in names:
        entry = man["files"][name]
        if not isinstance(name, str) or not (pattern.fullmatch(name) or name == VISION) or ".." in name:
            raise CorruptFile(f"{mpath} lists {name!r}, which is not a file a {man['kind']} bundle holds", path=mpath,
                              fix="export the bundle again; do not edit bundle manifests")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) \
                or not isinstance(entry.get("sha256"), str):
            raise CorruptFile(f"{mpath} gives no size/sha256 for {name}", path=mpath, fix="export the bundle again")
    if not any(n == opened or (opened.endswith("/") and n.startswith(opened)) for n in names):
        raise CorruptFile(f"{mpath} does not list {opened}, the file its loader opens", path=mpath,
                          fix="export the bundle again")
    return names


def owned_files_only(bundle: Path, names) -> list[str]:
    """Files (and links) in the bundle folder that its manifest does not list."""
    extra = []
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_symlink() or (p.is_file() and rel not in names and rel != MANIFEST):
            extra.append(rel)
        elif p.is_dir() and not any(n.startswith(rel + "/") for n in names):
            extra.append(rel + "/")
    return extra


def check_bundle(bundle: str | Path) -> dict:
    """The bundle's manifest, after checking every name, size, sha256, that no other file is present, and the
    grammar version."""
    bundle = Path(bundle)
    mpath = bundle / MANIFEST
    if not mpath.is_file() or mpath.is_symlink():
        raise CorruptFile(f"{bundle} is not an mmhops-lite bundle (no manifest.json)", path=mpath,
                          fix="export one: mmhops-lite export --gguf -o DIR")
    man = _manifest(bundle)
    if man is None:
        raise CorruptFile(f"{mpath} is not valid JSON", path=mpath, fix="export the bundle again")
    if man.get("format_version") != FORMAT or man.get("kind") not in KINDS or not isinstance(man.get("files"), dict):
        raise CorruptFile(f"{mpath} is not a bundle manifest this version reads", path=mpath,
                          fix="export the bundle again with this version")
    names = _listed_names(bundle, man)
    extra = owned_files_only(bundle, names)
    if extra:
        raise CorruptFile(f"bundle {bundle} holds files its manifest does not list: {', '.join(extra[:5])}",
                          path=bundle, fix="remove them, or export the bundle again")
    for name in names:
        p, entry = bundle / name, man["files"][name]
        if not p.is_file():
            raise CorruptFile(f"bundle file {p} is missing", path=p, fix="export the bundle again")
        if p.stat().st_size != entry["size"] or sha256(p) != entry["sha256"]:
            raise CorruptFile(f"bundle file {p} is truncated or altered (checksum mismatch)", path=p,
                              fix="export the bundle again; do not edit bundle files")
    if man.get("grammar_version") != grammar.GRAMMAR_VERSION:
        raise CorruptFile(f"{bundle} speaks grammar version {man.get('grammar_version')}, this mmhops-lite "
                          f"{grammar.GRAMMAR_VERSION}", path=mpath, fix="export the policy again with this version")
    if man["kind"] == "gguf-adapter" and not (isinstance(man.get("base"), str)
                                              and isinstance(man.get("base_gguf_sha256"), str)):
        raise CorruptFile(f"{mpath} names no base model with its sha256", path=mpath,
                          fix="export the adapter bundle again (it records the base it was made for)")
    return man


def bundle_generator(bundle: str | Path, n_ctx: int = 4096, threads: int = 0):
    """The generator of a verified bundle, loaded by its kind's loader (llama.cpp for GGUF, onnxruntime for ONNX)."""
    from .registry import resolve

    man = check_bundle(bundle)
    base = None
    if man["kind"] == "gguf-adapter":
        base = resolve(man["base"], "policy")
        if sha256(base) != man["base_gguf_sha256"]:
            raise CorruptFile(f"the base GGUF {base} is not the one this adapter bundle was made for", path=base,
                              fix=f"install the base it names ({man['base']}) or export a merged bundle")
    return KINDS[man["kind"]].load(Path(bundle), base, n_ctx, threads)
