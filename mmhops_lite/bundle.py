"""Reading export bundles (written by export/): checksum-verified before use, refused when altered."""
from __future__ import annotations

import json
from pathlib import Path

from . import grammar
from .errors import IndexCorrupt
from .paths import sha256

FORMAT = 1


def is_bundle(path) -> bool:
    """Does the path hold an export bundle?"""
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / "manifest.json").is_file() and not (p / "config.json").is_file()


def check_bundle(bundle: str | Path) -> dict:
    """The bundle's manifest, after checking every file's size and sha256 and the grammar version."""
    bundle = Path(bundle)
    mpath = bundle / "manifest.json"
    if not mpath.is_file():
        raise IndexCorrupt(f"{bundle} is not an mmhops-lite bundle (no manifest.json)", path=mpath,
                           fix="export one: mmhops-lite export --gguf -o DIR")
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexCorrupt(f"{mpath} is not valid JSON", path=mpath, fix="export the bundle again") from exc
    if man.get("format_version") != FORMAT or "files" not in man:
        raise IndexCorrupt(f"{mpath} is not a bundle manifest this version reads", path=mpath,
                           fix="export the bundle again with this version")
    for name, entry in man["files"].items():
        p = bundle / name
        if not p.is_file():
            raise IndexCorrupt(f"bundle file {p} is missing", path=p, fix="export the bundle again")
        if p.stat().st_size != entry["size"] or sha256(p) != entry["sha256"]:
            raise IndexCorrupt(f"bundle file {p} is truncated or altered (checksum mismatch)", path=p,
                               fix="export the bundle again; do not edit bundle files")
    if man.get("grammar_version") != grammar.GRAMMAR_VERSION:
        raise IndexCorrupt(f"{bundle} speaks grammar version {man.get('grammar_version')}, this mmhops-lite "
                           f"{grammar.GRAMMAR_VERSION}", path=mpath, fix="export the policy again with this version")
    return man


def bundle_generator(bundle: str | Path, n_ctx: int = 4096, threads: int = 0):
    """The generator of a verified bundle: llama.cpp for GGUF bundles, onnxruntime for ONNX ones."""
    from .backends.llamacpp import LlamaCppGenerator
    from .registry import resolve

    man = check_bundle(bundle)
    if man["kind"] == "onnx":
        from .backends.onnx_backend import OnnxGenerator

        return OnnxGenerator(Path(bundle) / "policy-onnx", n_ctx=n_ctx, threads=threads)
    if man["kind"] == "gguf-adapter":
        base = resolve(man["base"], "policy")
        if man.get("base_gguf_sha256") and sha256(base) != man["base_gguf_sha256"]:
            raise IndexCorrupt(f"the base GGUF {base} is not the one this adapter bundle was made for", path=base,
                               fix=f"install the base it names ({man['base']}) or export a merged bundle")
        return LlamaCppGenerator(base, n_ctx=n_ctx, threads=threads, lora_path=Path(bundle) / "adapter.gguf")
    return LlamaCppGenerator(Path(bundle) / "policy.gguf", n_ctx=n_ctx, threads=threads)
