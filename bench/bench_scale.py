"""A million-passage index: build time, disk size, peak RSS, open time, query latency, recall@10, `ask` cold start.

    python bench/bench_scale.py [--n 1000000] [--out DIR] [--queries 1000] [--skip-ask] [--keep]

The index holds the demo KB (its real passages and images, with the vectors the demo index already computed) plus
synthetic passages up to --n: random words, and vectors drawn around 1,000 topic centres (closer to text
embeddings than uniform noise). The build runs the real code path (`index.sync`: SQLite store with FTS5, hnswlib
graphs, checksummed manifest) with encoders that return those precomputed vectors, so it times everything but
the encoder; the encoder's share is extrapolated from its rate measured here on real demo passages.

Each stage runs in its own process so its peak RSS is its own: build, then open + queries, then `mmhops-lite ask`
on a demo flag against the big index (cold: a new process). Recall@10 is against exact (brute-force) search of
the same vectors. Needs the demo index (built on first use) and ~6 GB of disk for a million.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 384
_SYN = re.compile(r"^Synthetic entity (\d+)\. ")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    out = np.empty((n, DIM), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.standard_normal((m, DIM)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


# ------------------------------------------------------------------------------------------------ stage: make
def make(work: Path, n: int, queries: int) -> dict:
    """The KB folder (demo records + synthetic passages) and the vector files the build's encoders read."""
    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.index.build import passage_text
    from mmhops_lite.index.store import Store

    cfg = Config.resolve()
    demo_idx = api.ensure_demo_index(cfg)
    demo_kb = api.demo_paths()[0]
    kb = work / "kb"
    (kb / "images").mkdir(parents=True)
    store = Store(demo_idx / "store.sqlite", readonly=True)
    real = [(r[0], r[1], r[2], r[3], np.frombuffer(r[4], np.float32))
            for r in store.db.execute("SELECT id, title, text, source, vec FROM passages")]
    images = list(store.db.execute("SELECT id, path, title, caption, vec FROM images"))
    store.close()
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(3, 10)))) for _ in range(20_000)]
    n_syn = max(0, n - len(real))
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    syn = clustered(n_syn + queries, rng, centres)
    np.save(work / "synthetic.npy", syn[:n_syn])
    np.save(work / "queries.npy", syn[n_syn:])
    real_vecs = {passage_text(type("P", (), {"title": t, "text": x})): v for _, t, x, _, v in real}
    np.save(work / "real.npy", np.stack(list(real_vecs.values())))
    (work / "real-keys.json").write_text(json.dumps(list(real_vecs)), encoding="utf-8")
    with open(kb / "passages.jsonl", "w", encoding="utf-8") as fh:
        for pid, title, text, source, _ in real:
            fh.write(json.dumps({"id": pid, "title": title, "text": text, "source": source}) + "\n")
        for i in range(n_syn):
            body = " ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(40, 90))))
            fh.write(json.dumps({"id": f"syn:{i}", "title": f"Synthetic entity {i}",
                                 "text": f"{body}. Recorded in {1000 + i % 1000}."}) + "\n")
    img_vecs = {}
    with open(kb / "images.jsonl", "w", encoding="utf-8") as fh:
        for iid, path, title, caption, vec in images:
            dst = kb / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(demo_kb / path, dst)
            except OSError:
                shutil.copyfile(demo_kb / path, dst)
            fh.write(json.dumps({"id": iid, "path": path, "title": title, "caption": caption}) + "\n")
            img_vecs[path] = np.frombuffer(vec, np.float32)
    np.save(work / "images.npy", np.stack(list(img_vecs.values())))
    (work / "image-keys.json").write_text(json.dumps(list(img_vecs)), encoding="utf-8")
    return {"passages": len(real) + n_syn, "real_passages": len(real), "synthetic": n_syn, "images": len(images)}


# ------------------------------------------------------------------------------------------------ stage: build
class Precomputed:
    """An encoder that returns the vectors computed before: real demo passages by text, synthetic by number."""

    def __init__(self, work: Path, ident: str, dim: int, kind: str):
        self.id, self.dim = ident, dim
        if kind == "text":
            self.syn = np.load(work / "synthetic.npy", mmap_mode="r")
            keys = json.loads((work / "real-keys.json").read_text(encoding="utf-8"))
            vecs = np.load(work / "real.npy")
        else:
            keys = json.loads((work / "image-keys.json").read_text(encoding="utf-8"))
            vecs = np.load(work / "images.npy")
        self.known = dict(zip(keys, vecs))

    def encode(self, items, batch_size: int = 32) -> np.ndarray:
        out = np.empty((len(items), self.dim), np.float32)
        for i, it in enumerate(items):
            m = _SYN.match(it) if isinstance(it, str) else None
            out[i] = self.syn[int(m.group(1))] if m else self.known[it if isinstance(it, str) else self._rel(it)]
        return out

    def _rel(self, path) -> str:
        parts = Path(path).parts
        return "/".join(parts[parts.index("images"):])


def build(work: Path) -> dict:
    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.index import KnowledgeBase, sync

    cfg = Config.resolve()
    t0 = time.perf_counter()
    kb = KnowledgeBase(work / "kb", check_images=False)
    t_kb = time.perf_counter() - t0
    man = json.loads((api.ensure_demo_index(cfg, progress=False) / "manifest.json").read_text(encoding="utf-8"))
    enc = man["encoders"]
    text = Precomputed(work, enc["passages"]["id"], enc["passages"]["dim"], "text")
    image = Precomputed(work, enc["images"]["id"], enc["images"]["dim"], "image")
    rep = sync(work / "index", kb, text, image, cfg.index, progress=False)
    size = sum(p.stat().st_size for p in (work / "index").iterdir() if p.is_file())
    return {"kb_read_s": round(t_kb, 1), "build_s": rep.seconds, "rates": rep.rates, "disk_bytes": size,
            "files": {p.name: p.stat().st_size for p in (work / "index").iterdir() if p.is_file()},
            "peak_rss_mb": round(peak_rss_mb())}


# ------------------------------------------------------------------------------------------------ stage: query
def query(work: Path, k: int = 10) -> dict:
    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.index import MultimodalIndex

    cfg = Config.resolve()
    import gc

    out = {}
    for verify in (False, True):  # median of 3 opens each, every index closed and freed before the next
        took = []
        for _ in range(3):
            t0 = time.perf_counter()
            idx = MultimodalIndex(work / "index", None, None, cfg.index, cfg.search, verify=verify)
            took.append(time.perf_counter() - t0)
            if len(took) < 3 or not verify:
                idx.close()
                del idx
                gc.collect()
        out[f"open_s_verify_{str(verify).lower()}"] = round(statistics.median(took), 2)
    out["rss_after_open_mb"] = round(peak_rss_mb())
    q = np.load(work / "queries.npy")
    graph = idx.vectors["passages"]
    graph._hnsw.set_num_threads(1)
    lat, found = [], []
    for v in q:
        t0 = time.perf_counter()
        hits = graph.query(v, k)
        lat.append(time.perf_counter() - t0)
        found.append([h[0] for h in hits])
    # Exact search over every stored vector (labels as the graph knows them), in chunks.
    labs, vecs = idx.store.vectors("passages", DIM)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_l = np.zeros((len(q), k), np.int64)
    for s in range(0, len(vecs), 200_000):
        sims = q @ vecs[s:s + 200_000].T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_l = np.concatenate([best_l, labs[s:s + 200_000][top]], 1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_l = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_l, order, 1)
    recall = float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, best_l.tolist())]))
    out.update(queries=len(q), dense_p50_ms=round(statistics.median(lat) * 1e3, 3),
               dense_p99_ms=round(float(np.percentile(lat, 99)) * 1e3, 3), recall_at_10=round(recall, 4))
    # Hybrid text search as `ask` runs it (real query encoder + BM25 + title links), demo-style queries.
    idx.text_encoder = api.text_encoder(cfg)
    texts = ["capital of Peru", "Eiffel Tower architect", "Andromeda galaxy constellation", "Japan population",
             "river through Vienna", "flag with a maple leaf", "Mount Fuji height", "national animal of Scotland"]
    idx.search_text(texts[0])
    hl = []
    for _ in range(5):
        for t in texts:
            t0 = time.perf_counter()
            idx.search_text(t)
            hl.append(time.perf_counter() - t0)
    out.update(hybrid_p50_ms=round(statistics.median(hl) * 1e3, 2), hybrid_p99_ms=round(max(hl) * 1e3, 2),
               peak_rss_mb=round(peak_rss_mb()))
    idx.close()
    return out


def ask_cold(work: Path) -> dict:
    from mmhops_lite import api
    from mmhops_lite.config import Config

    image, question = api.demo_question(Config.resolve())
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "ask", str(image),
                          question, "--index", str(work / "index"), "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        return {"error": res.stderr.strip()[-400:]}
    tr = json.loads(res.stdout)
    return {"wall_s": round(wall, 2), "answer": tr["answer"], "index_open_s": tr["timings"].get("index_open_s"),
            "hops": [f"{h['action']} {h['argument']}" for h in tr["hops"]]}


def encoder_rate() -> float:
    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.index.build import passage_text
    from mmhops_lite.index.kb import KnowledgeBase

    cfg = Config.resolve()
    kb = KnowledgeBase(api.demo_paths()[0], check_images=False)
    texts = sorted((passage_text(p) for p in kb.passages[:: max(1, len(kb.passages) // 1000)]), key=len)
    enc = api.text_encoder(cfg)
    enc.encode(texts[:8])
    t0 = time.perf_counter()
    for s in range(0, len(texts), cfg.index.batch_size):
        enc.encode(texts[s:s + cfg.index.batch_size], batch_size=cfg.index.encode_batch)
    return len(texts) / (time.perf_counter() - t0)


def stage(name: str, work: Path) -> dict:
    """Run one stage in a fresh process; its JSON result."""
    res = subprocess.run([sys.executable, __file__, "--stage", name, "--out", str(work)], capture_output=True,
                         text=True)
    if res.returncode:
        raise SystemExit(f"stage {name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="passages in the index")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-ask", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        fn = {"build": build, "query": query, "ask": ask_cold}[a.stage]
        print(json.dumps(fn(a.out)))
        return
    work = a.out or Path(tempfile.mkdtemp(prefix="mmhops-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        made = make(work, a.n, a.queries) if not (work / "kb" / "passages.jsonl").is_file() else {"reused": str(work)}
        print(f"KB written in {time.perf_counter() - t0:.0f} s: {made}", flush=True)
        if (work / "index" / "manifest.json").is_file():
            b = None
            print(f"index reused: {work / 'index'} (delete it to time the build again)", flush=True)
        else:
            b = stage("build", work)
        rate = encoder_rate()
        n = sum(1 for _ in open(work / "kb" / "passages.jsonl", "rb"))
        if b:
            print(f"build (everything but the text encoder): {b['build_s']:.0f} s, rates/s {b['rates']}, "
                  f"peak RSS {b['peak_rss_mb']:,} MB, KB read {b['kb_read_s']} s", flush=True)
            print(f"  disk: {b['disk_bytes'] / 2**30:.2f} GiB " + json.dumps(b["files"]), flush=True)
        print(f"  text encoder here: {rate:.0f} passages/s -> encoding {n:,} passages would add "
              f"{n / rate / 3600:.1f} h on this machine", flush=True)
        q = stage("query", work)
        print(f"open (median of 3): {q['open_s_verify_true']} s with checksums, {q['open_s_verify_false']} s without; "
              f"RSS after open {q['rss_after_open_mb']:,} MB", flush=True)
        print(f"dense query (hnswlib, 1 thread, k=10): p50 {q['dense_p50_ms']} ms  p99 {q['dense_p99_ms']} ms  "
              f"recall@10 vs exact {q['recall_at_10']} over {q['queries']} queries", flush=True)
        print(f"hybrid text search as ask runs it: p50 {q['hybrid_p50_ms']} ms  max {q['hybrid_p99_ms']} ms; "
              f"peak RSS {q['peak_rss_mb']:,} MB", flush=True)
        if not a.skip_ask:
            r = stage("ask", work)
            print(f"ask cold (new process) on this index: {json.dumps(r)}", flush=True)
    finally:
        if a.out is None and not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
