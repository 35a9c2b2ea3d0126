"""Export bundles: policy files, the vision tower's ONNX, the grammar version and a manifest with the sha256 of
every file and the parity measured against the torch model; verified before use, refused when altered."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from mmhops_lite import grammar
from mmhops_lite.bundle import FORMAT, bundle_generator, check_bundle
from mmhops_lite.errors import IndexCorrupt, InputError
from mmhops_lite.paths import sha256

from . import gguf as G

PARITY_GATE = {"f16": 0.98, "adapter": 0.98, "q8_0": 0.95, "q4_k_m": 0.0}  # q4_k_m: reported, not gated


def parity_prompts(n: int = 50, questions: str | Path | None = None) -> list[str]:
    """Chat messages for parity checks: dev questions at several points of a gold-like trajectory."""
    from mmhops_lite.data.questions import load_questions

    problems = ["<image> What is the capital of the country whose flag is shown?"]
    if questions and Path(questions).is_file():
        problems = [q.problem for q in load_questions(questions, check_images=False)]
    tails = ["", "<think>", "<think>First identify what image 1 shows.</think>",
             "<think>First identify what image 1 shows.</think><image_search>1</image_search>\n<information>\n"
             "[1] France (image match 0.94): France is a country in Western Europe.\n</information>\n<think>"]
    out = []
    for i in range(n):
        msgs = grammar.messages(problems[i % len(problems)], ["looks like: flag (0.40)"])
        out.append((msgs, tails[i % len(tails)]))
    return out


def greedy_next(gen, items) -> list[str]:
    """The greedy next token (as text) of each prompt under a generator."""
    return [gen.generate(gen.render(m) + tail, [], max_tokens=1, temperature=0.0).text for m, tail in items]


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of prompts whose greedy next token is the same.

    >>> agreement(["a", "b"], ["a", "c"])
    0.5
    """
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def export_gguf(base: str, adapter: str | None, out: Path, quant: str = "q8_0", adapter_only: bool = False,
                prompts: int = 50, questions: str | Path | None = None, force: bool = False) -> dict:
    """Export a GGUF bundle (merged + quantized, or the adapter over the base GGUF) and gate it on parity."""
    from mmhops_lite.backends.llamacpp import LlamaCppGenerator
    from mmhops_lite.backends.torch_backend import TorchGenerator
    from mmhops_lite.train.policy import adapter_to_gguf, base_folder

    t0 = time.perf_counter()
    base_dir, base_gguf = base_folder(base)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise InputError(f"{out} exists and is not an mmhops-lite bundle", path=out, fix="choose a new folder")
    work = Path(tempfile.mkdtemp(prefix="mmhops-export-", dir=str(out.parent) if out.parent.exists() else None))
    try:
        files = {}
        if adapter_only:
            if adapter is None or base_gguf is None:
                raise InputError("--adapter-only needs --adapter and a GGUF base", fix="e.g. --model "
                                 "smollm2-135m-instruct --adapter runs/train --adapter-only")
            from mmhops_lite.backends.base import adapter_for

            adapter_to_gguf(adapter_for("torch", adapter), base_dir, work / "adapter.gguf")
            files["adapter.gguf"] = work / "adapter.gguf"
            candidate = LlamaCppGenerator(base_gguf, n_ctx=2048, lora_path=work / "adapter.gguf")
            gate = PARITY_GATE["adapter"]
            kind = "gguf-adapter"
        else:
            merged = G.merge(base, adapter, work / "merged")
            G.convert(merged, work / "f16.gguf", "f16")
            G.quantize(work / "f16.gguf", work / "policy.gguf", quant)
            files["policy.gguf"] = work / "policy.gguf"
            candidate = LlamaCppGenerator(work / "policy.gguf", n_ctx=2048)
            gate = PARITY_GATE[quant]
            kind = "gguf"
        from mmhops_lite.backends.base import adapter_for

        reference = TorchGenerator(base_dir, n_ctx=2048, adapter=adapter_for("torch", adapter) if adapter else None)
        items = parity_prompts(prompts, questions)
        agree = agreement(greedy_next(reference, items), greedy_next(candidate, items))
        del candidate
        if agree < gate and not force:
            raise IndexCorrupt(f"parity {agree:.3f} is below the gate {gate} for {kind} {quant}: bundle not written",
                               fix="use a higher-precision --quant (f16, q8_0), or --force to write it anyway")
        vision = _vision_onnx()
        if vision:
            (work / "vision").mkdir()
            shutil.copyfile(vision, work / "vision" / "image-encoder.onnx")
            files["vision/image-encoder.onnx"] = work / "vision" / "image-encoder.onnx"
        manifest = {
            "format_version": FORMAT, "kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base": str(base), "base_gguf_sha256": sha256(base_gguf) if (adapter_only and base_gguf) else None,
            "adapter": str(adapter) if adapter else None, "quant": None if adapter_only else quant,
            "grammar_version": grammar.GRAMMAR_VERSION, "runtimes": _versions(),
            "parity": {"prompts": len(items), "greedy_top1_agreement": round(agree, 4), "gate": gate,
                       "forced": bool(force and agree < gate)},
            "files": {name: {"sha256": sha256(p), "size": p.stat().st_size} for name, p in files.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        stage = work / "bundle"
        stage.mkdir()
        for name, p in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, stage / name)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(stage, out)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verify_bundle(bundle: Path, parity: bool = False, prompts: int = 50) -> dict:
    """Check every file against the manifest (and optionally recompute parity); raise IndexCorrupt naming the file."""
    man = check_bundle(bundle)
    out = {"ok": True, "files": len(man["files"]), "parity": man["parity"]}
    if parity:
        from mmhops_lite.backends.base import adapter_for
        from mmhops_lite.backends.torch_backend import TorchGenerator
        from mmhops_lite.train.policy import base_folder

        base_dir, _ = base_folder(man["base"])
        reference = TorchGenerator(base_dir, n_ctx=2048,
                                   adapter=adapter_for("torch", man["adapter"]) if man["adapter"] else None)
        items = parity_prompts(prompts)
        out["parity_now"] = round(agreement(greedy_next(reference, items),
                                            greedy_next(bundle_generator(bundle), items)), 4)
        out["ok"] = out["parity_now"] >= man["parity"]["gate"]
    return out


def _vision_onnx() -> Path | None:
    try:
        from mmhops_lite.encoders import get_image_encoder

        p = get_image_encoder("onnx").onnx_path()
        return p if p.is_file() else None
    except Exception:  # noqa: BLE001 - a bundle without the vision tower is still a valid policy bundle
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llama-cpp-python", "torch", "transformers", "peft", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
