"""The on-disk multimodal index: hnswlib graphs for text and images, a SQLite store, and a manifest."""
from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import IndexConfig, SearchConfig
from ..encoders.base import Encoder
from ..errors import IndexCorrupt, IndexLocked, InputError
from ..paths import sha256
from ..safeio import atomic_json, open_lock
from ..types import Entity, PassageHit
from .store import Store
from .vectors import VectorIndex

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE = "store.sqlite"
GRAPH_NAME = re.compile(r"(passages|images)-(\d{6})\.hnsw")
OPEN_WAIT_S = 10.0  # how long an open keeps retrying while a writer publishes a new generation


@dataclass
class BuildReport:
    """What a build or sync did."""

    added: dict
    removed: dict
    reused: dict
    seconds: float
    rates: dict




def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_json(path, obj, what="index")


@contextmanager
def writer_lock(root: Path):
    """Exclusive writer lock (flock: released by the kernel even after kill -9); the lock file is never
    followed through a symbolic link."""
    root.mkdir(parents=True, exist_ok=True)
    fh = open_lock(root / ".lock")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise IndexLocked(f"index {root} is being written by another process", path=root,
                          fix="wait for the other build/add/remove to finish, then retry") from exc
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n".encode())
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class _Moved(Exception):
    """The manifest changed while an open was reading it: a writer published; open again."""


class MultimodalIndex:
    """Open (and verify) an index folder, search it, or change it under the writer lock."""

    def __init__(self, root: str | Path, text_encoder: Encoder | None = None, image_encoder: Encoder | None = None,
                 cfg: IndexConfig | None = None, search_cfg: SearchConfig | None = None, verify: bool = True,
                 shared: bool = False):
        """`shared`: searches may come from several threads, one at a time (a server holds a lock around them)."""
        self.root = Path(root)
        self.shared = shared
        self.cfg = cfg or IndexConfig()
        self.search_cfg = search_cfg or SearchConfig()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                self._open(verify)
                break
            except _Moved:
                if time.monotonic() > deadline:
                    raise IndexCorrupt(f"index {self.root} kept changing for {OPEN_WAIT_S:.0f}s while being opened",
                                       path=self.root, fix="open it again once the writer has finished") from None
                time.sleep(0.02)
        self._check_encoders()

    # opening ----------------------------------------------------------------------------------------
    def _open(self, verify: bool) -> None:
        """Read the manifest, check and load every file it names. A failure while a writer switches generations
        (the manifest changed under us) retries; any other failure is the index's own and is raised.

        The store may run ahead of the graphs (a write committed records, then stopped before publishing): a
        graph hit the store no longer holds is dropped, and a record not yet in a graph is found by BM25 only."""
        mpath = self.root / MANIFEST
        before = _stat_key(mpath)
        store = None
        try:
            self.manifest = self._check(verify)
            store = Store(self.root / STORE, readonly=True, shared=self.shared)
            vectors: dict[str, VectorIndex] = {}
            for kind in ("passages", "images"):
                entry = self.manifest["files"].get(kind)
                if entry:
                    dim = self.manifest["encoders"][kind]["dim"]
                    vectors[kind] = VectorIndex.load(self.root / entry["name"], dim, self.cfg.ef_search,
                                                     self.manifest.get("M", self.cfg.M),
                                                     elements=entry.get("elements"))
        except (IndexCorrupt, OSError) as exc:
            if store is not None:
                store.close()
            if _stat_key(mpath) != before:
                raise _Moved() from exc
            if isinstance(exc, OSError):
                raise IndexCorrupt(f"index {self.root} cannot be read: {exc}", path=self.root,
                                   fix=f"run: mmhops-lite index repair {self.root}") from exc
            raise
        if _stat_key(mpath) != before:
            store.close()
            raise _Moved()
        self.store, self.vectors = store, vectors

    def _check(self, verify: bool) -> dict:
        mpath = self.root / MANIFEST
        if mpath.is_symlink():
            raise IndexCorrupt(f"{mpath} is a symbolic link", path=mpath, fix="an index folder holds its own files")
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
        _check_fields(man, mpath, self.root)
        for kind, entry in man["files"].items():
            p = self.root / entry["name"]
            if p.is_symlink() or not p.is_file():
                raise IndexCorrupt(f"index file {p} is missing", path=p, fix=f"run: mmhops-lite index repair {self.root}")
            if p.stat().st_size != entry["size"]:
                raise IndexCorrupt(f"index file {p} is truncated or altered ({p.stat().st_size} bytes, manifest "
                                   f"says {entry['size']})", path=p, fix=f"run: mmhops-lite index repair {self.root}")
            if verify and sha256(p) != entry["sha256"]:
                raise IndexCorrupt(f"index file {p} does not match its checksum", path=p,
                                   fix=f"run: mmhops-lite index repair {self.root}")
        if (self.root / STORE).is_symlink():
            raise IndexCorrupt(f"{self.root / STORE} is a symbolic link", path=self.root / STORE,
                               fix="an index folder holds its own files; rebuild it")
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
        return self.search_texts([query], k)[0]

    def search_texts(self, queries: list[str], k: int | None = None) -> list[list[PassageHit]]:
        """`search_text` for several queries, their embeddings computed in one batch; same hits, in order."""
        k = k or self.search_cfg.top_k
        dense_on = "passages" in self.vectors and self.text_encoder is not None
        vecs = self.text_encoder.encode(list(queries)) if dense_on and queries else None
        return [self._search_text(q, k, vecs[i] if vecs is not None else None) for i, q in enumerate(queries)]

    def _search_text(self, query: str, k: int, vec) -> list[PassageHit]:
        n = self.search_cfg.candidates
        dense: list[tuple[int, float]] = []
        if vec is not None:
            dense = self.vectors["passages"].query(vec, max(n, k))
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
        return self.search_images([image], k)[0]

    def search_images(self, images: list, k: int | None = None) -> list[list[Entity]]:
        """`search_image` for several images (paths, PIL images or embeddings), encoded in one batch."""
        k = k or self.search_cfg.top_k
        if "images" not in self.vectors:
            return [[] for _ in images]
        todo = [i for i, im in enumerate(images) if not isinstance(im, np.ndarray)]
        vecs = list(images)
        if todo:
            if self.image_encoder is None:
                raise InputError("this index was opened without an image encoder", fix="pass image_encoder=")
            for i, v in zip(todo, self.image_encoder.encode([images[i] for i in todo])):
                vecs[i] = v
        return [self._entities(self.vectors["images"].query(v, k)) for v in vecs]

    def _entities(self, hits: list[tuple[int, float]]) -> list[Entity]:
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


def _stat_key(path: Path):
    """What changes when a file is replaced (inode, size, mtime), or None when it is absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _check_fields(man, mpath: Path, root: Path) -> None:
    """Refuse a manifest whose fields would make the reader touch anything but this index's own files."""
    def bad(why: str):
        return IndexCorrupt(f"{mpath} is not a manifest this index wrote: {why}", path=mpath,
                            fix="do not use this folder as an index; rebuild it from its KB")

    if not isinstance(man, dict) or not isinstance(man.get("files"), dict) or not isinstance(man.get("encoders"), dict):
        raise bad("files/encoders missing")
    if not isinstance(man.get("generation"), int) or man.get("store", STORE) != STORE:
        raise bad("generation/store fields are wrong")
    if not isinstance(man.get("M", 32), int) or not 2 <= man.get("M", 32) <= 256:
        raise bad(f"M is {man.get('M')!r}")
    for kind, entry in man["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad(f"entry {kind!r} has no file name")
        m = GRAPH_NAME.fullmatch(entry["name"])
        if kind not in ("passages", "images") or not m or m.group(1) != kind:
            raise bad(f"file name {entry['name']!r} for {kind!r} is not '{kind}-NNNNNN.hnsw' inside {root}")
        if not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise bad(f"entry {kind!r} lacks its size or sha256")
        if "elements" in entry and not isinstance(entry["elements"], int):
            raise bad(f"entry {kind!r} has a non-integer element count")
        enc = man["encoders"].get(kind)
        if not isinstance(enc, dict) or not isinstance(enc.get("dim"), int) or not 1 <= enc["dim"] <= 8192:
            raise bad(f"the {kind} encoder's dimension is {enc!r}")


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
