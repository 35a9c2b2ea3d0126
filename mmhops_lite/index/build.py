"""Writing an index: build/sync from a KB folder, add, remove, repair; every step resumable and atomic."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .. import faults
from ..config import IndexConfig
from ..errors import IndexCorrupt, WriteFailed
from ..paths import sha256
from ..safeio import fsync_dir
from .index import (
    FORMAT_VERSION,
    MANIFEST,
    STORE,
    BuildReport,
    Encoder,
    _encode_batches,
    _write_json_atomic,
    writer_lock,
)
from .kb import KnowledgeBase, content_hash
from .store import KINDS, Store
from .vectors import VectorIndex


def passage_text(p) -> str:
    """What the text encoder sees of a passage: its title leads, since queries name entities."""
    return f"{p.title}. {p.text}"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@contextmanager
def _writing(root: Path):
    """A failed write (disk full, I/O error) becomes WriteFailed naming the folder; what was published stays."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as exc:
        if isinstance(exc, WriteFailed):
            raise
        why = "the disk is full" if "full" in str(exc) or getattr(exc, "errno", None) == 28 else str(exc)
        raise WriteFailed(f"writing index {root} stopped: {why}; the last published index is unchanged and stays "
                          "in use", path=root, fix=f"free space on the disk holding {root}, then run the same "
                                                   "command again: it resumes") from exc


def sync(root: str | Path, kb: KnowledgeBase, text_encoder: Encoder | None, image_encoder: Encoder | None,
         cfg: IndexConfig | None = None, *, prune: bool = True, progress: bool = True,
         reencode: bool = False) -> BuildReport:
    """Make the index at root hold the KB: encode only new or changed records; prune=True drops the rest.

    reencode=True re-encodes a kind whose encoder changed (instead of refusing to mix encoders)."""
    root, cfg = Path(root), cfg or IndexConfig()
    t0 = time.perf_counter()
    added, removed, reused, rates = {}, {}, {}, {}
    with writer_lock(root), _writing(root):
        store = Store(root / STORE)
        try:
            _check_store_encoders(store, root, {"passages": text_encoder, "images": image_encoder}, reencode)
            store.set_meta("dirty", True)
            store.commit()
            jobs = (("passages", kb.passages, text_encoder,
                     lambda p: content_hash(p.title, p.text, p.source), store.put_passages,
                     lambda chunk: text_encoder.encode([passage_text(p) for p, _ in chunk],
                                                       batch_size=cfg.encode_batch)),
                    ("images", kb.images, image_encoder,
                     lambda im: content_hash(im.title, im.caption, im.path, _file_hash(kb.image_path(im))),
                     store.put_images,
                     lambda chunk: _index_encode(image_encoder)([kb.image_path(im) for im, _ in chunk], batch_size=32)))
            for kind, records, enc, hasher, put, encode in jobs:
                have = store.hashes(kind)
                todo = []
                for r in records:
                    h = hasher(r)
                    if have.get(r.id) != h:
                        todo.append((r, h))
                if kind == "passages" and cfg.sort_by_length:
                    # Batches of like lengths: each is padded to its longest row, so file order wastes most of
                    # the encoder's work on padding. Character length is a free stand-in for token count.
                    todo.sort(key=lambda rh: len(rh[0].title) + len(rh[0].text))
                gone = set(have) - {r.id for r in records} if prune else set()
                if gone:
                    store.delete(kind, gone)
                    store.commit()
                    faults.point(f"sync:{kind}:pruned")
                if todo and enc is None:
                    raise IndexCorrupt(f"no {kind} encoder given but the KB has {len(todo)} new {kind}")

                def commit(chunk, vecs, put=put, kind=kind):
                    put(chunk, vecs)
                    store.commit()
                    faults.point(f"sync:{kind}:batch")

                t1 = time.perf_counter()
                n = _encode_batches(todo, encode, cfg.batch_size, commit, f"encoding {kind}", progress) if todo else 0
                rates[kind] = round(n / max(time.perf_counter() - t1, 1e-9), 1) if n else None
                added[kind], removed[kind], reused[kind] = n, len(gone), len(records) - len(todo)
            if prune:
                store.db.execute("DELETE FROM triples")
            store.put_triples(kb.triples)
            store.set_meta("kb", {"path": str(kb.root.resolve())})
            store.commit()
            faults.point("sync:triples")
            _publish(root, store, cfg, progress=progress)
        finally:
            store.close()
    return BuildReport(added, removed, reused, round(time.perf_counter() - t0, 2), rates)


def _index_encode(enc):
    """Encoders may embed indexed items differently from queries (e.g. a mean over several views)."""
    return getattr(enc, "encode_for_index", enc.encode)


def _check_store_encoders(store: Store, root: Path, encoders: dict, reencode: bool = False) -> None:
    known = store.get_meta("encoders", {}) or {}
    for kind, enc in encoders.items():
        if enc is None:
            continue
        want = {"id": enc.id, "dim": int(enc.dim)}
        if kind in known and known[kind] != want and store.count(kind):
            if not reencode:
                raise IndexCorrupt(f"index {root} holds {kind} encoded by {known[kind]['id']} "
                                   f"({known[kind]['dim']}-d), not {enc.id} ({enc.dim}-d)", path=root / STORE,
                                   fix=f"re-encode them: mmhops-lite index build KB_DIR -o {root} --reencode "
                                       "(or use the same encoder, or a new folder)")
            store.db.execute(f"DELETE FROM {kind}")  # every vector of this kind is re-encoded below
            store.commit()
        known[kind] = want
    store.set_meta("encoders", known)


def remove(root: str | Path, ids: list[str], cfg: IndexConfig | None = None) -> dict:
    """Remove passages or images by id; returns how many of each were removed."""
    root = Path(root)
    _require_index(root)
    with writer_lock(root), _writing(root):
        store = Store(root / STORE)
        try:
            counts = {}
            for kind in KINDS:  # one transaction per kind, in batches: a kill loses none of what was committed
                counts[kind] = 0
                step = max(1, (cfg or IndexConfig()).batch_size)
                for i in range(0, len(ids), step):
                    counts[kind] += store.delete(kind, ids[i:i + step])
                    store.commit()
                    faults.point(f"remove:{kind}")
            store.db.execute("DELETE FROM triples WHERE subject IN (SELECT value FROM json_each(?))", (json.dumps(ids),))
            store.set_meta("dirty", True)
            store.commit()
            faults.point("remove:triples")
            _publish(root, store, cfg or IndexConfig(), progress=False)
        finally:
            store.close()
    return counts


def repair(root: str | Path, cfg: IndexConfig | None = None) -> dict:
    """Rebuild the hnswlib graphs and manifest from the store's saved vectors (no re-encoding)."""
    root = Path(root)
    if not (root / STORE).is_file():
        raise IndexCorrupt(f"{root} has no {STORE}: nothing to repair from", path=root / STORE,
                           fix=f"build it: mmhops-lite index build KB_DIR -o {root}")
    with writer_lock(root), _writing(root):
        store = Store(root / STORE)
        try:
            ok = store.integrity()
            if ok != "ok":
                raise IndexCorrupt(f"{root / STORE} fails SQLite's integrity check ({ok})", path=root / STORE,
                                   fix=f"delete {root} and build it again")
            return _publish(root, store, cfg or IndexConfig(), progress=True, fresh=True)
        finally:
            store.close()


def _require_index(root: Path) -> None:
    if not (root / MANIFEST).is_file():
        raise IndexCorrupt(f"{root} is not an mmhops-lite index (no {MANIFEST})", path=root / MANIFEST,
                           fix=f"build it first: mmhops-lite index build KB_DIR -o {root}")


def _old_graph(root: Path, man: dict | None, kind: str, dim: int, cfg: IndexConfig) -> VectorIndex | None:
    """The current graph, if the manifest names one that is intact: adding to it beats rebuilding."""
    entry = (man or {}).get("files", {}).get(kind)
    if not entry or man["encoders"].get(kind, {}).get("dim") != dim or man.get("M", cfg.M) != cfg.M:
        return None
    p = root / entry["name"]
    if p.is_symlink() or not p.is_file() or p.stat().st_size != entry["size"] or sha256(p) != entry["sha256"]:
        return None
    try:
        return VectorIndex.load(p, dim, cfg.ef_search, cfg.M, cfg.ef_construction, elements=entry.get("elements"))
    except IndexCorrupt:
        return None


def _publish(root: Path, store: Store, cfg: IndexConfig, *, progress: bool, fresh: bool = False) -> dict:
    with faults.section("publish"):
        return _publish_now(root, store, cfg, fresh=fresh)


def _publish_now(root: Path, store: Store, cfg: IndexConfig, *, fresh: bool = False) -> dict:
    """Bring the graphs up to the store, save them under a new generation, then switch the manifest.

    The manifest's atomic rename is the commit point: before it, readers open the previous generation; after it,
    the new one. The previous generation's graphs are kept until the next publish, so a reader that read the old
    manifest a moment before the switch still finds its files."""
    gen = int(store.get_meta("generation", 0) or 0) + 1
    try:
        old = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        gen = max(gen, int(old.get("generation", 0)) + 1)
    except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError):
        old = None
    encoders = store.get_meta("encoders", {}) or {}
    files = {}
    for kind in KINDS:
        if kind not in encoders or store.count(kind) == 0:
            continue
        dim = encoders[kind]["dim"]
        vi = None if fresh else _old_graph(root, old, kind, dim, cfg)
        live = store.labels(kind)
        if vi is not None and len(vi.labels() - live) > 0.3 * max(len(live), 1):
            vi = None  # too many tombstones: a fresh graph is smaller and searches better
        if vi is None:
            vi = VectorIndex(dim, cfg.M, cfg.ef_construction, cfg.ef_search)
        present = vi.labels()
        new = sorted(live - present)
        for i in range(0, len(new), 5000):
            labs, vecs = store.vectors(kind, dim, new[i:i + 5000])
            vi.add(labs, vecs)
        vi.mark_deleted(present - live)
        faults.point(f"{kind}:graph")
        name = f"{kind}-{gen:06d}.hnsw"
        vi.save(root / name)
        faults.point(f"{kind}:saved")
        files[kind] = {"name": name, "size": (root / name).stat().st_size, "sha256": sha256(root / name),
                       "elements": vi.elements}
    manifest = {
        "format_version": FORMAT_VERSION,
        "generation": gen,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoders": encoders,
        "space": "cosine",
        "M": cfg.M,
        "ef_construction": cfg.ef_construction,
        "counts": {k: store.count(k) for k in (*KINDS, "triples")},
        "files": files,
        "store": STORE,
        "kb": store.get_meta("kb"),
    }
    faults.point("manifest")
    _write_json_atomic(root / MANIFEST, manifest)
    faults.point("switched")
    store.set_meta("generation", gen)
    store.set_meta("dirty", False)
    store.commit()
    faults.point("store")
    keep = {f["name"] for f in files.values()} | {f.get("name") for f in (old or {}).get("files", {}).values()
                                                  if isinstance(f, dict)}
    for p in list(root.glob("*.hnsw")) + list(root.glob(".*.tmp-*")):
        if p.name not in keep:
            p.unlink(missing_ok=True)
            faults.point("cleaned")
    fsync_dir(root)
    return manifest
