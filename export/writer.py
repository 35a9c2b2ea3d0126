"""Writing export bundles (mmhops_lite/bundle.py reads them): the format's policy files (export/formats.py),
the vision tower's ONNX, the grammar version and a manifest with the sha256 of every file and the parity measured
against the torch model; verified before use, refused when altered."""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from mmhops_lite import grammar
from mmhops_lite.bundle import (
    FORMAT,
    KINDS,
    _listed_names,
    _manifest,
    bundle_generator,
    check_bundle,
    is_bundle,
    owned_files_only,
)
from mmhops_lite.errors import CorruptFile, InputError, ParityFailed
from mmhops_lite.paths import sha256
from mmhops_lite.safeio import atomic_json, remove_tree, swap_dirs

from .formats import Job, choose


def parity_prompts(n: int = 50, questions: str | Path | None = None, index=None, count_tokens=None,
                   cfg=None) -> tuple[list, str]:
    """Prompts for the parity gate, and where they came from.

    With a questions file and an open index ("dev-gold"): the dev questions' real prompts, i.e. their perception
    text and the gold trajectory run through the loop over the index, one prompt per question (`spread` over the
    question kinds), cut inside one of its policy turns (the turn cycles over the question's turns, the cut after a
    seeded number of words). Without them ("synthetic", e.g. a tiny test model): question texts with fixed
    trajectory tails.
    """
    from mmhops_lite.data.questions import load_questions

    qs = load_questions(questions, check_images=index is not None) if questions and Path(questions).is_file() else []
    if qs and index is not None:
        items = _gold_prompts(qs, n, index, count_tokens, cfg)
        if len(items) >= min(n, 10):
            return items, "dev-gold"
    problems = [q.problem for q in qs] or ["<image> What is the capital of the country whose flag is shown?"]
    tails = ["", "<think>", "<think>First identify what image 1 shows.</think>",
             "<think>First identify what image 1 shows.</think><image_search>1</image_search>\n<information>\n"
             "[1] France (image match 0.94): France is a country in Western Europe.\n</information>\n<think>"]
    out = []
    for i in range(n):
        msgs = grammar.messages(problems[i % len(problems)], ["looks like: flag (0.40)"])
        out.append((msgs, tails[i % len(tails)]))
    return out, "synthetic"


def spread(qs: Sequence) -> list:
    """The questions in round-robin over their kinds (template, else split), each kind in file order: the first
    n are then a sample of every kind, however the file is sorted (a synthesised dev file lists its kinds one
    after another, so its first 50 questions held no comparison at all).

    >>> from types import SimpleNamespace as Q
    >>> qs = [Q(id=i, extra={"template": t}, split="Bridge") for i, t in enumerate("aaabbc")]
    >>> [q.id for q in spread(qs)]
    [0, 3, 5, 1, 4, 2]
    """
    kinds: dict = {}
    for q in qs:
        kinds.setdefault(q.extra.get("template") or q.split, []).append(q)
    lanes = list(kinds.values())
    return [lane[i] for i in range(max(map(len, lanes), default=0)) for lane in lanes if i < len(lane)]


def _gold_prompts(qs, n: int, index, count_tokens, cfg) -> list:
    from mmhops_lite.config import Config
    from mmhops_lite.data.gold import gold_episode
    from mmhops_lite.grammar import render_chatml
    from mmhops_lite.loop import perceive

    cfg = cfg or Config.resolve()
    count = count_tokens or (lambda text: len(text) // 4)
    out, cache = [], {}
    rng = random.Random(0)
    for q in spread(qs):
        if len(out) >= n:
            break
        perc = perceive(q.images, index.image_encoder, ocr=cfg.encoders.ocr) if q.images else []
        got = gold_episode(q, render_chatml, count, index, cfg, perc, cache)
        if got is None:
            continue
        segs = got[0].segments
        cuts = [0] + [i + 1 for i, (_, by_policy) in enumerate(segs) if not by_policy and i + 1 < len(segs)]
        k = cuts[len(out) % len(cuts)]
        # Cut inside the next policy turn, after a seeded number of its words: the next token is then an entity,
        # a search argument, an answer or a tag, not only the "<think>" every turn opens with.
        words = segs[k][0].split(" ") if k < len(segs) and segs[k][1] else [""]
        j = rng.randrange(len(words))
        tail = "".join(t for t, _ in segs[:k]) + " ".join(words[:j])
        out.append((grammar.messages(q.problem, [p.text for p in perc]), tail))
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


def export_bundle(fmt: str, base: str, adapter: str | None, out: Path, quant: str | None = None, prompts: int = 50,
                  questions: str | Path | None = None, force: bool = False, index=None, progress=None) -> dict:
    """Write a verified bundle in a format of the FORMATS table: build its files, measure parity against torch,
    refuse below the format's gate for that quantization, then swap the folder in atomically.

    `index` (an open MultimodalIndex) with `questions` makes the parity prompts the dev split's real ones.
    """
    from mmhops_lite.convert import base_folder

    say = progress or (lambda msg: None)
    spec, quant = choose(fmt, quant)
    t0 = time.perf_counter()
    base_dir, base_gguf = base_folder(base)
    out = Path(out)
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".mmhops-export-", dir=str(out.parent)))
    try:
        files = spec.build(Job(str(base), base_dir, base_gguf, adapter, quant, work, say))
        candidate = KINDS[spec.kind].load(work, base_gguf, 4096, 0)
        say("measuring parity against the torch model")
        reference = _reference(base_dir, adapter)
        items, source = parity_prompts(prompts, questions, index, reference.count_tokens)
        agree = agreement(greedy_next(reference, items), greedy_next(candidate, items))
        del candidate, reference
        gate = spec.gates[quant]
        if agree < gate and not force:
            raise ParityFailed(f"parity {agree:.3f} is below the gate {gate} for {fmt} {quant}: bundle not written",
                               fix="use a higher-precision --quant (f16, q8_0; fp32 for ONNX), or --force to write "
                                   "it anyway")
        vision = _vision_onnx()
        if vision:
            (work / "vision").mkdir()
            shutil.copyfile(vision, work / "vision" / "image-encoder.onnx")
            files["vision/image-encoder.onnx"] = work / "vision" / "image-encoder.onnx"
        manifest = {
            "format_version": FORMAT, "kind": spec.kind, "format": fmt,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base": str(base), "base_gguf_sha256": sha256(base_gguf) if (spec.kind == "gguf-adapter" and base_gguf) else None,
            "adapter": str(adapter) if adapter else None, "quant": quant,
            "grammar_version": grammar.GRAMMAR_VERSION, "runtimes": _versions(),
            "parity": {"prompts": len(items), "source": source, "greedy_top1_agreement": round(agree, 4),
                       "gate": gate, "forced": bool(force and agree < gate)},
            "files": {name: {"sha256": sha256(p), "size": p.stat().st_size} for name, p in files.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        stage = work / "bundle"
        stage.mkdir()
        for name, p in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, stage / name)
        atomic_json(stage / "manifest.json", manifest, what="bundle")
        check_target(out)  # again: the folder may have changed during the export
        remove_tree(swap_dirs(stage, out))  # one atomic exchange: `out` is the old bundle or the new, never neither
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_target(out: Path) -> None:
    """Refuse an export folder that is not new, empty, or an old bundle holding only its own files: export
    replaces what it wrote, never an index, a KB or anything else."""
    if out.is_symlink():
        raise InputError(f"{out} is a symbolic link", path=out, fix="give the real folder for -o")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} is a file, not a bundle folder", path=out, fix="choose a new folder for -o")
    if not any(out.iterdir()):
        return
    why = None
    if not is_bundle(out):
        why = "it is not an mmhops-lite bundle" + (" (it is an index)" if (out / "store.sqlite").exists() else "")
    else:
        try:
            extra = owned_files_only(out, _listed_names(out, _manifest(out)))
        except CorruptFile as exc:
            extra, why = [], f"its manifest is not a bundle's ({exc})"
        if extra:
            why = f"it holds files the bundle does not list ({', '.join(extra[:3])})"
    if why:
        raise InputError(f"will not replace {out}: {why}", path=out,
                         fix="choose a new or empty folder for -o (export only ever replaces an old bundle)")


def _reference(base_dir: Path, adapter: str | None):
    """The torch model an export is measured against: the base with the PEFT adapter merged in."""
    from mmhops_lite.backends.base import adapter_for
    from mmhops_lite.backends.torch_backend import TorchGenerator

    return TorchGenerator(base_dir, n_ctx=4096, adapter=adapter_for("torch", adapter) if adapter else None)


def verify_bundle(bundle: Path, parity: bool = False, prompts: int = 50, questions: str | Path | None = None,
                  index=None) -> dict:
    """Check every file against the manifest (and optionally recompute parity); raise CorruptFile naming the file."""
    man = check_bundle(bundle)
    out = {"ok": True, "files": len(man["files"]), "parity": man["parity"]}
    if parity:
        from mmhops_lite.convert import base_folder

        base_dir, _ = base_folder(man["base"])
        reference = _reference(base_dir, man["adapter"])
        items, source = parity_prompts(prompts, questions, index, reference.count_tokens)
        out["parity_now"] = round(agreement(greedy_next(reference, items),
                                            greedy_next(bundle_generator(bundle), items)), 4)
        out["parity_source"] = source
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
    for pkg in ("llama-cpp-python", "torch", "transformers", "peft", "onnxruntime", "optimum", "optimum-onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
