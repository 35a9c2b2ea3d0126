"""The on-disk multimodal index: hnswlib graphs for text and images, a SQLite store, and a manifest."""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from ..config import IndexConfig, SearchConfig
from ..errors import IndexCorrupt, IndexLocked, InputError
from ..paths import sha256
from ..types import Entity, PassageHit
from .store import Store
from .vectors import VectorIndex

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE = "store.sqlite"


class Encoder(Protocol):
    id: str
    dim: int

    def encode(self, items: Sequence, batch_size: int = 32) -> np.ndarray: ...


@dataclass
class BuildReport:
    """What a build or sync did."""

    added: dict
    removed: dict
    reused: dict
    seconds: float
    rates: dict




def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def writer_lock(root: Path):
    """Exclusive writer lock (flock: released by the kernel even after kill -9)."""
    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise IndexLocked(f"index {root} is being written by another process", path=root,
                          fix="wait for the other build/add/remove to finish, then retry") from exc
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class MultimodalIndex:
    """Open (and verify) an index folder, search it, or change it under the writer lock."""

    def __init__(self, root: str | Path, text_encoder: Encoder | None = None, image_encoder: Encoder | None = None,
                 cfg: IndexConfig | None = None, search_cfg: SearchConfig | None = None, verify: bool = True):
        self.root = Path(root)
        self.cfg = cfg or IndexConfig()
        self.search_cfg = search_cfg or SearchConfig()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.manifest = self._check(verify)
        self.store = Store(self.root / STORE, readonly=True)
        gen = self.store.get_meta("generation")
        if gen != self.manifest["generation"]:
            raise IndexCorrupt(f"index {self.root} was interrupted during a write (store generation {gen}, "
                               f"manifest {self.manifest['generation']})", path=self.root / STORE,
                               fix=f"run: mmhops-lite index repair {self.root}")
        self._check_encoders()
        self.vectors: dict[str, VectorIndex] = {}
        for kind in ("passages", "images"):
            entry = self.manifest["files"].get(kind)
            if entry:
                dim = self.manifest["encoders"][kind]["dim"]
                self.vectors[kind] = VectorIndex.load(self.root / entry["name"], dim, self.cfg.ef_search)

    # opening ----------------------------------------------------------------------------------------
    def _check(self, verify: bool) -> dict:
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            hint = "an interrupted build resumes if you run it again" if (self.root / STORE).exists() else \
                "build one with: mmhops-lite index build KB_DIR -o " + str(self.root)
            raise IndexCorrupt(f"{self.root} is not a finished mmhops-lite index (no {MANIFEST})", path=mpath, fix=hint)
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexCorrupt(f"{mpath} is not valid JSON", path=mpath,
                               fix=f"run: mmhops-lite index repair {self.root}") from exc
        if man.get("format_version") != FORMAT_VERSION:
            raise IndexCorrupt(f"{mpath} has format version {man.get('format_version')}, this mmhops-lite reads "
                               f"{FORMAT_VERSION}", path=mpath, fix="rebuild the index with this version")
        for kind, entry in man.get("files", {}).items():
            p = self.root / entry["name"]
            if not p.is_file():
                raise IndexCorrupt(f"index file {p} is missing", path=p, fix=f"run: mmhops-lite index repair {self.root}")
            if p.stat().st_size != entry["size"]:
                raise IndexCorrupt(f"index file {p} is truncated or altered ({p.stat().st_size} bytes, manifest "
                                   f"says {entry['size']})", path=p, fix=f"run: mmhops-lite index repair {self.root}")
            if verify and sha256(p) != entry["sha256"]:
                raise IndexCorrupt(f"index file {p} does not match its checksum", path=p,
                                   fix=f"run: mmhops-lite index repair {self.root}")
        return man

    def _check_encoders(self) -> None:
        for kind, enc in (("passages", self.text_encoder), ("images", self.image_encoder)):
            want = self.manifest["encoders"].get(kind)
            if enc is None or want is None:
                continue
            if (enc.id, enc.dim) != (want["id"], want["dim"]):
                raise IndexCorrupt(f"index {self.root} was built with {kind} encoder {want['id']} ({want['dim']}-d), "
                                   f"not {enc.id} ({enc.dim}-d)", path=self.root / MANIFEST,
                                   fix=f"use --text-model/--image-model {want['id']}, or rebuild the index")

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # searching --------------------------------------------------------------------------------------
    def search_text(self, query: str, k: int | None = None) -> list[PassageHit]:
        """Hybrid text search: dense (hnswlib), BM25 (FTS5) and entity-title rankings fused by reciprocal rank.

        The third ranking links the query to entities: passages whose title the query names word for word
        (longest names first), since multi-hop queries carry the entity found in the previous hop."""
        k = k or self.search_cfg.top_k
        n = self.search_cfg.candidates
        dense: list[tuple[int, float]] = []
        if "passages" in self.vectors and self.text_encoder is not None:
            dense = self.vectors["passages"].query(self.text_encoder.encode([query])[0], max(n, k))
        bm25 = self.store.bm25(query, max(n, k)) if self.search_cfg.hybrid or not dense else []
        fused: dict[int, float] = {}
        rrf = self.search_cfg.rrf_k
        for rank, (lab, _) in enumerate(dense):
            fused[lab] = fused.get(lab, 0.0) + 1.0 / (rrf + rank + 1)
        for rank, (lab, _) in enumerate(bm25):
            fused[lab] = fused.get(lab, 0.0) + 1.0 / (rrf + rank + 1)
        if self.search_cfg.hybrid:
            named = self.store.labels_for_titles(_ngrams(query))
            named.sort(key=lambda lt: -len(lt[1]))
            for rank, (lab, _) in enumerate(named):
                fused[lab] = fused.get(lab, 0.0) + 1.0 / (rrf + rank + 1)
        best = sorted(fused, key=lambda lab: -fused[lab])[:k]
        rows = self.store.passages_by_label(best)
        dsim = dict(dense)
        brank = {lab: r + 1 for r, (lab, _) in enumerate(bm25)}
        return [PassageHit(rows[lab], round(fused[lab], 6), dsim.get(lab), brank.get(lab)) for lab in best if lab in rows]

    def search_image(self, image, k: int | None = None) -> list[Entity]:
        """Entities whose KB images look most like the query image (path, PIL image or embedding)."""
        k = k or self.search_cfg.top_k
        if "images" not in self.vectors:
            return []
        if isinstance(image, np.ndarray):
            vec = image
        else:
            if self.image_encoder is None:
                raise InputError("this index was opened without an image encoder", fix="pass image_encoder=")
            vec = self.image_encoder.encode([image])[0]
        hits = self.vectors["images"].query(vec, k)
        rows = self.store.images_by_label([lab for lab, _ in hits])
        out = []
        for lab, sim in hits:
            im = rows.get(lab)
            if im is None:
                continue
            p = self.store.passage_for_title(im.title)
            out.append(Entity(im.id, im.title, round(sim, 6), im.caption, im.path,
                              p.id if p else None, (p.text[:300] if p else "")))
        return out

    def info(self) -> dict:
        """The manifest plus live counts."""
        return {**self.manifest, "path": str(self.root)}


def _ngrams(query: str, longest: int = 6) -> list[str]:
    """Word n-grams of a query (punctuation at word ends dropped): the candidate entity names it may carry.

    >>> _ngrams("Peru capital?", 2)
    ['Peru', 'Peru capital', 'capital']
    """
    words = [w.strip(".,;:!?\"'()[]") for w in query.split()]
    words = [w for w in words if w]
    return [" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, min(len(words), i + longest) + 1)]


def _encode_batches(items, encode: Callable, batch: int, commit: Callable, label: str, progress: bool) -> int:
    """Encode items in batches and commit each batch (the unit an interrupted build resumes from)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    done = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not progress,
                  transient=False) as bar:
        task = bar.add_task(label, total=len(items), rate="")
        t0 = time.perf_counter()
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            commit(chunk, encode(chunk))
            done += len(chunk)
            bar.update(task, advance=len(chunk), rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}/s")
    return done
