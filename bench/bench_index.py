"""Index benchmark: hnswlib query p50 and recall@10 at 100k vectors against exact search, and build rates.

    python bench/bench_index.py [--n 100000] [--dim 384] [--kb DIR]

With --kb, also builds an index of that KB folder with the real encoders and prints images/s and passages/s.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around 1,000 topic centres: closer to text embeddings than uniform noise."""
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_hnsw(n: int, dim: int, queries: int = 1000) -> None:
    from mmhops_lite.config import IndexConfig
    from mmhops_lite.index.vectors import VectorIndex

    rng = np.random.default_rng(0)
    data = clustered(n + queries, dim, rng)
    base, q = data[:n], data[n:]
    cfg = IndexConfig()
    vi = VectorIndex(dim, cfg.M, cfg.ef_construction, cfg.ef_search)
    t0 = time.perf_counter()
    vi.add(np.arange(n), base)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        vi.save(Path(tmp) / "g.hnsw")
        t0 = time.perf_counter()
        vi = VectorIndex.load(Path(tmp) / "g.hnsw", dim, cfg.ef_search)
        load_s = time.perf_counter() - t0
    vi._hnsw.set_num_threads(1)
    lat, found = [], []
    for v in q:
        t0 = time.perf_counter()
        hits = vi.query(v, 10)
        lat.append(time.perf_counter() - t0)
        found.append([h[0] for h in hits])
    t0 = time.perf_counter()
    exact = np.argsort(-(q @ base.T), axis=1)[:, :10]
    exact_s = (time.perf_counter() - t0) / queries
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    p50 = statistics.median(lat) * 1e3
    print(f"hnswlib  n={n:,} dim={dim} M={cfg.M} ef_construction={cfg.ef_construction} ef={cfg.ef_search}")
    print(f"  build {build_s:.1f} s ({n / build_s:,.0f} vectors/s), load {load_s * 1e3:.0f} ms")
    print(f"  query p50 {p50:.3f} ms  p99 {np.percentile(lat, 99) * 1e3:.3f} ms  (target <= 1 ms)")
    print(f"  recall@10 vs exact {recall:.4f} (target >= 0.99); exact numpy search {exact_s * 1e3:.2f} ms/query "
          f"-> hnswlib is {exact_s * 1e3 / p50:.1f}x faster")


def bench_build(kb: Path) -> None:
    from mmhops_lite import api
    from mmhops_lite.config import Config

    out = Path(tempfile.mkdtemp(prefix="mmhops-bench-"))
    try:
        rep = api.build_index(kb, out, Config.resolve(), progress=False)
        print(f"index build of {kb}: {rep.added} in {rep.seconds} s; rates/s {rep.rates}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--kb", type=Path, help="a KB folder to time a real build on")
    a = ap.parse_args()
    bench_hnsw(a.n, a.dim)
    if a.kb:
        bench_build(a.kb)
