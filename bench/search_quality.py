"""Retrieval-quality benchmark: image search with perturbed queries and text search with one-fact queries.

    python bench/search_quality.py [--index DIR] [--kb DIR] [--n-images N] [--n-passages 100] [--seed 0]
                                   [--variants] [--json]

Image bar (target top-1 >= 0.9): every KB image (or a seeded sample) becomes a query by a random crop of 80% of
each side (a 0.8w x 0.8h box at a random position), a resize by a random factor in 0.6-1.4 (aspect kept) and
JPEG quality 60, all in memory. Correct = the top hit's title equals the query image's title (KB images that
share a title, e.g. two "Frog" stamps, count as the same entity).

Text bar (target top-3 >= 0.95): seeded passages (80% Wikipedia when there are enough), query = title plus one
random non-first sentence of the passage cut to 20 words. Correct = the passage id in the top 3. Dense-only and
BM25-only top-3 are printed beside the hybrid for comparison.

--variants also re-embeds the KB and the same queries with alternative image preprocessing (exact search in
numpy, nothing written to the index) so preprocessing changes can be judged by their measured effect.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_TARGET, TEXT_TARGET = 0.9, 0.95
CROP_SIDE, SCALE, JPEG_Q = 0.8, (0.6, 1.4), 60
HIST_WEIGHTS = (0.35, 0.5)
VIEW_SIDE = 0.8  # side of the corner/centre crops in the multicrop variant's index-time views
WIKI_SHARE, SENTENCE_WORDS = 0.8, 20
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def p50_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 2) if seconds else float("nan")


# ---------------------------------------------------------------- image queries

def perturbed_query(src: Path, rng: random.Random, crop: float = CROP_SIDE) -> bytes:
    """JPEG bytes of a random (crop*w) x (crop*h) box of `src`, resized by 0.6-1.4x, quality 60."""
    from PIL import Image

    from mmhops_lite.encoders.image import to_rgb

    with Image.open(src) as im:
        im = to_rgb(im)
        w, h = im.size
        cw, ch = max(1, round(w * crop)), max(1, round(h * crop))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = im.crop((x, y, x + cw, y + ch))
        s = rng.uniform(*SCALE)
        im = im.resize((max(8, round(cw * s)), max(8, round(ch * s))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=JPEG_Q)
    return buf.getvalue()


def image_queries(kb: Path, n: int | None, seed: int) -> tuple[list[dict], list[bytes]]:
    """The (seeded sample of) KB images and one perturbed query per image, in the same order."""
    images = read_jsonl(kb / "images.jsonl")
    rng = random.Random(seed)
    if n and n < len(images):
        images = sorted(rng.sample(images, n), key=lambda r: r["id"])
    return images, [perturbed_query(kb / r["path"], random.Random(f"{seed}:{r['id']}")) for r in images]


def kind_of(image_id: str) -> str:
    return image_id.split(":", 1)[0] if ":" in image_id else "other"


def summarise_image(images: list[dict], top_titles: list[list[str]], twins: dict | None = None) -> dict:
    """Top-1 / top-5 title accuracy overall and per kind, the most frequent confusions, errors on pixel twins."""
    ok1 = [t[:1] == [r["title"]] for r, t in zip(images, top_titles)]
    ok5 = [r["title"] in t[:5] for r, t in zip(images, top_titles)]
    kinds: dict[str, list[int]] = {}
    for r, o in zip(images, ok1):
        kinds.setdefault(kind_of(r["id"]), []).append(o)
    conf = Counter((r["title"], t[0] if t else "-") for r, t, o in zip(images, top_titles, ok1) if not o)
    return {"n": len(images), "top1": round(float(np.mean(ok1)), 4), "top5": round(float(np.mean(ok5)), 4),
            "by_kind": {k: {"n": len(v), "top1": round(float(np.mean(v)), 4)} for k, v in sorted(kinds.items())},
            "worst_confusions": [{"query": q, "top1": t, "count": c} for (q, t), c in conf.most_common(10)],
            "errors_on_pixel_twins": sum(1 for r, t, o in zip(images, top_titles, ok1)
                                         if not o and t and t[0] in (twins or {}).get(r["id"], ())),
            "errors": [r["id"] for r, o in zip(images, ok1) if not o]}


def bench_images(idx, images: list[dict], queries: list[bytes], twins: dict) -> dict:
    """Search the index with every perturbed query through the public search_image path."""
    from PIL import Image

    tops, lat = [], []
    for q in queries:
        im = Image.open(io.BytesIO(q))
        t0 = time.perf_counter()
        hits = idx.search_image(im, 5)
        lat.append(time.perf_counter() - t0)
        tops.append([h.title for h in hits])
    out = summarise_image(images, tops, twins)
    out["p50_ms"] = p50_ms(lat)
    return out


def pixel_twins(kb: Path, images: list[dict], thresh: float = 0.02) -> dict[str, set[str]]:
    """id -> other titles whose KB image is near-identical in pixels (32x32 squashed, mean abs diff < thresh).

    These differ at most in a small emblem or stroke (Poland/Thuringia, El Salvador/Nicaragua, Estonian county
    flags, filled I/l, the dreidel stamps): errors that land on such a twin are the intrinsically hard part.
    """
    from PIL import Image

    from mmhops_lite.encoders.image import load_image

    kb_all = read_jsonl(kb / "images.jsonl")
    thumbs = np.stack([np.asarray(load_image(kb / r["path"]).resize((32, 32), Image.BILINEAR), np.float32).ravel()
                       for r in kb_all]) / 255.0
    pos = {r["id"]: i for i, r in enumerate(kb_all)}
    out = {}
    for r in images:
        i = pos.get(r["id"])
        if i is None:
            continue
        near = {kb_all[j]["title"] for j in np.nonzero(np.abs(thumbs - thumbs[i]).mean(1) < thresh)[0]}
        near.discard(r["title"])
        if near:
            out[r["id"]] = near
    return out


# ---------------------------------------------------------------- image preprocessing variants

def _letterbox(im, size: int):
    from PIL import Image

    w, h = im.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0), ((size - nw) // 2, (size - nh) // 2))
    return canvas


RESIZE = 256 / 224  # the usual ImageNet eval crop, kept here for comparison with what we ship


def _views(im, size: int, mode: str, side: float = VIEW_SIDE) -> list:
    """PIL views (each size x size) of one RGB image for a preprocessing mode."""
    from PIL import Image

    w, h = im.size
    if mode == "center":  # the former preprocessing: centre square of side shorter/RESIZE
        sq = min(w, h) / RESIZE
        l, t = (w - sq) / 2, (h - sq) / 2
        return [im.resize((size, size), Image.BICUBIC, box=(l, t, l + sq, t + sq), reducing_gap=3.0)]
    if mode == "pad":
        return [_letterbox(im, size)]
    if mode == "squash":
        return [im.resize((size, size), Image.BICUBIC, reducing_gap=3.0)]
    if mode == "multicrop":  # index-time views: the whole image plus `side` crops at the centre and corners
        out = [im.resize((size, size), Image.BICUBIC, reducing_gap=3.0)]
        cw, ch = w * side, h * side
        for fx, fy in ((0.5, 0.5), (0, 0), (1, 0), (0, 1), (1, 1)):
            l, t = fx * (w - cw), fy * (h - ch)
            out.append(im.resize((size, size), Image.BICUBIC, box=(l, t, l + cw, t + ch), reducing_gap=3.0))
        return out
    raise ValueError(mode)


def _pixels(view) -> np.ndarray:
    from mmhops_lite.encoders.image import MEAN, STD

    return ((np.asarray(view, dtype=np.float32) - MEAN) / STD).transpose(2, 0, 1)


def embed_views(enc, items: list, mode: str, batch: int = 16, side: float = VIEW_SIDE) -> list[np.ndarray]:
    """Per item: (n_views, dim) unit embeddings under a preprocessing mode, via the encoder's own network."""
    from mmhops_lite.encoders.base import l2_normalize
    from mmhops_lite.encoders.image import load_image

    views = [_views(load_image(it), enc.size, mode, side) for it in items]
    flat = [v for vs in views for v in vs]
    embs = np.zeros((len(flat), enc.dim), np.float32)
    for s in range(0, len(flat), batch):
        embs[s:s + batch] = enc._run(np.ascontiguousarray(np.stack([_pixels(v) for v in flat[s:s + batch]])))[0]
    embs = l2_normalize(embs)
    out, i = [], 0
    for vs in views:
        out.append(embs[i:i + len(vs)])
        i += len(vs)
    return out


def colour_hist(item, bins: int = 4) -> np.ndarray:
    """Unit-norm square-rooted RGB histogram (bins^3): layout-free colour evidence that survives cropping."""
    from mmhops_lite.encoders.image import load_image

    a = np.asarray(load_image(item).resize((64, 64)), dtype=np.int64) * bins // 256
    h = np.bincount(((a[..., 0] * bins + a[..., 1]) * bins + a[..., 2]).ravel(), minlength=bins ** 3).astype(np.float32)
    h = np.sqrt(h / h.sum())
    return h / np.linalg.norm(h)


def top_titles(q: np.ndarray, db: np.ndarray, owner: np.ndarray, titles: list[str], k: int = 5) -> list[list[str]]:
    """Exact cosine search; db rows may be several views of one image (owner maps row -> image), max-pooled."""
    sims = q @ db.T
    if len(owner) == int(owner.max()) + 1:
        best = sims
    else:
        best = np.full((len(q), int(owner.max()) + 1), -np.inf, np.float32)
        np.maximum.at(best.T, owner, sims.T)
    order = np.argsort(-best, axis=1)[:, :k]
    return [[titles[j] for j in row] for row in order]


def bench_variants(enc, kb: Path, images: list[dict], queries: list[bytes], twins: dict, log) -> dict:
    """Top-1 title accuracy of each preprocessing variant (KB and queries re-embedded, exact search)."""
    kb_all = read_jsonl(kb / "images.jsonl")
    titles = [r["title"] for r in kb_all]
    paths = [kb / r["path"] for r in kb_all]
    single = np.arange(len(kb_all))
    res: dict[str, dict] = {}

    def summarise(tops: list[list[str]]) -> dict:
        return summarise_image(images, tops, twins)

    def show(name: str, seconds: float | None = None) -> None:
        r = res[name]
        kinds = ", ".join(f"{k} {v['top1']:.3f}" for k, v in r["by_kind"].items())
        took = f"  ({seconds:.0f} s)" if seconds is not None else ""
        log(f"  {name:<24} top-1 {r['top1']:.3f}  ({kinds}; {r['errors_on_pixel_twins']} errors on twins){took}")

    def mix(emb: np.ndarray, hist: np.ndarray, w: float) -> np.ndarray:
        """Concatenate a colour histogram with weight w: cosine = (1 - w^2) emb-cosine + w^2 hist-cosine."""
        return np.hstack([emb * np.sqrt(1 - w * w), hist * w])

    hq = np.stack([colour_hist(q) for q in queries])
    hdb = np.stack([colour_hist(p) for p in paths])
    q_by_mode = {}
    for mode in ("center", "pad", "squash"):
        t0 = time.perf_counter()
        db = np.concatenate(embed_views(enc, paths, mode))
        q = q_by_mode[mode] = np.concatenate(embed_views(enc, queries, mode))
        res[mode] = summarise(top_titles(q, db, single, titles))
        show(mode, time.perf_counter() - t0)
        for w in HIST_WEIGHTS:
            res[f"{mode}+hist{w}"] = summarise(top_titles(mix(q, hq, w), mix(db, hdb, w), single, titles))
            show(f"{mode}+hist{w}")
    # Index-time views (whole image + 5 crops), queried with the single squashed view: "max" keeps 6 vectors
    # per image, "mean" averages them into the one vector the index format already stores.
    t0 = time.perf_counter()
    qs = q_by_mode["squash"]
    mv = embed_views(enc, paths, "multicrop")
    owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(mv)])
    res["multicrop-max"] = summarise(top_titles(qs, np.concatenate(mv), owner, titles))
    show("multicrop-max", time.perf_counter() - t0)
    mean = np.stack([v.mean(0) for v in mv])
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    res["multicrop-mean"] = summarise(top_titles(qs, mean, single, titles))
    show("multicrop-mean")
    for w in HIST_WEIGHTS:
        res[f"multicrop-mean+hist{w}"] = summarise(top_titles(mix(qs, hq, w), mix(mean, hdb, w), single, titles))
        show(f"multicrop-mean+hist{w}")
    return res


# ---------------------------------------------------------------- text queries

def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text.strip()) if s.strip()]


def text_queries(kb: Path, n: int, seed: int) -> list[tuple[dict, str]]:
    """(passage, query) pairs: title + one random non-first sentence (<= 20 words); 80% Wikipedia if possible."""
    rng = random.Random(seed)
    passages = read_jsonl(kb / "passages.jsonl")
    wiki = [p for p in passages if p["id"].startswith("wiki:")]
    rest = [p for p in passages if not p["id"].startswith("wiki:")]
    n_wiki = min(len(wiki), round(n * WIKI_SHARE) if rest else n)
    pick = rng.sample(wiki, n_wiki) + rng.sample(rest, min(len(rest), n - n_wiki))
    out = []
    for p in pick:
        sents = sentences(p["text"])
        s = rng.choice(sents[1:]) if len(sents) > 1 else sents[0] if sents else ""
        out.append((p, f"{p['title']} {' '.join(s.split()[:SENTENCE_WORDS])}"))
    return out


def bench_text(idx, pairs: list[tuple[dict, str]]) -> dict:
    """Hybrid top-1/top-3 through search_text, with dense-only and BM25-only top-3 for comparison."""
    hyb1 = hyb3 = dense3 = bm3 = 0
    lat = []
    by_source: dict[str, list[int]] = {}
    misses = []
    for p, q in pairs:
        t0 = time.perf_counter()
        hits = idx.search_text(q, 3)
        lat.append(time.perf_counter() - t0)
        ids = [h.passage.id for h in hits]
        ok = p["id"] in ids[:3]
        hyb1 += ids[:1] == [p["id"]]
        hyb3 += ok
        by_source.setdefault(kind_of(p["id"]), []).append(ok)
        if not ok:
            misses.append({"id": p["id"], "query": q, "top3": ids})
        dl = [lab for lab, _ in idx.vectors["passages"].query(idx.text_encoder.encode([q])[0], 3)]
        bl = [lab for lab, _ in idx.store.bm25(q, 3)]
        rows = idx.store.passages_by_label(dl + bl)
        dense3 += p["id"] in [rows[lab].id for lab in dl if lab in rows]
        bm3 += p["id"] in [rows[lab].id for lab in bl if lab in rows]
    n = max(1, len(pairs))
    return {"n": len(pairs), "mix": dict(Counter(kind_of(p["id"]) for p, _ in pairs)),
            "top1": round(hyb1 / n, 4), "top3": round(hyb3 / n, 4), "dense_top3": round(dense3 / n, 4),
            "bm25_top3": round(bm3 / n, 4), "p50_ms": p50_ms(lat),
            "top3_by_source": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_source.items())},
            "misses": misses[:10]}


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    from mmhops_lite import api
    from mmhops_lite.config import Config

    kb_default, idx_default = api.demo_paths()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=idx_default, help="index folder (default: the demo index)")
    ap.add_argument("--kb", type=Path, default=kb_default, help="the KB folder the index was built from")
    ap.add_argument("--n-images", type=int, default=None, help="seeded sample of KB images (default: all)")
    ap.add_argument("--n-passages", type=int, default=100, help="seeded sample of passages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", action="store_true", help="also measure alternative image preprocessing")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    cfg = Config.resolve()
    idx = api.open_index(args.index, cfg)
    report: dict = {"index": str(args.index), "kb": str(args.kb), "seed": args.seed,
                    "query_perturbation": f"crop {CROP_SIDE:.0%} of each side at a random position, resize "
                                          f"x{SCALE[0]}-{SCALE[1]} (aspect kept), JPEG q{JPEG_Q}"}
    with idx:
        images, queries = image_queries(args.kb, args.n_images, args.seed)
        twins = pixel_twins(args.kb, images)
        im = report["image"] = bench_images(idx, images, queries, twins)
        im["queries_with_pixel_twins"] = len(twins)
        log(f"image search  n={im['n']}  top-1 {im['top1']:.3f}  top-5 {im['top5']:.3f}  "
            f"(target >= {IMAGE_TARGET})  p50 {im['p50_ms']} ms/query")
        for k, v in im["by_kind"].items():
            log(f"  {k:<6} n={v['n']:<5} top-1 {v['top1']:.3f}")
        log(f"  queries whose KB image has a pixel twin under another title: {len(twins)}; top-1 errors that "
            f"picked such a twin: {im['errors_on_pixel_twins']}")
        log("  worst confusions (query title -> top-1 title, count):")
        for c in im["worst_confusions"]:
            log(f"    {c['query']!r} -> {c['top1']!r}  x{c['count']}")
        if args.variants:
            log("image preprocessing variants (KB and queries re-embedded, exact search):")
            report["image_variants"] = bench_variants(idx.image_encoder, args.kb, images, queries, twins, log)
        tx = report["text"] = bench_text(idx, text_queries(args.kb, args.n_passages, args.seed))
        log(f"text search   n={tx['n']} {tx['mix']}  top-1 {tx['top1']:.3f}  top-3 {tx['top3']:.3f} "
            f"(target >= {TEXT_TARGET})  dense-only top-3 {tx['dense_top3']:.3f}  BM25-only top-3 "
            f"{tx['bm25_top3']:.3f}  p50 {tx['p50_ms']} ms/query")
        log(f"  top-3 by source: {tx['top3_by_source']}")
        for m in tx["misses"][:5]:
            log(f"  miss {m['id']}: {m['query']!r} -> {m['top3']}")
    report["pass"] = {"image": im["top1"] >= IMAGE_TARGET, "text": tx["top3"] >= TEXT_TARGET}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
