"""Index build speed, before and after, side by side in one run, with the rankings of both compared.

    python bench/bench_build.py [--kb DIR] [--passages 2000] [--images 150] [--queries 300] [--seed 0]

Takes a seeded sample of a KB (default: the demo KB), builds it twice with the real encoders into temporary
folders: "before" = file order and 64-passage encoder batches (the build up to 2026-12-02), "now" = the defaults
(passages sorted by length, 8 per encoder call). Prints passages/s and images/s of each and their ratio, then
compares the two indexes' text search on title + one-sentence queries (top-1 and top-3 hit rates and how often
the top-10 agree), so a speed-up that changed the rankings would show.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sample_kb(kb: Path, out: Path, n_passages: int, n_images: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out.mkdir(parents=True)
    rows = [json.loads(x) for x in (kb / "passages.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = rng.sample(rows, min(n_passages, len(rows)))
    (out / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if n_images and (kb / "images.jsonl").is_file():
        ims = [json.loads(x) for x in (kb / "images.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        ims = rng.sample(ims, min(n_images, len(ims)))
        for im in ims:  # a KB keeps its images inside itself (no links): copy the sampled ones
            (out / im["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kb / im["path"], out / im["path"])
        (out / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ims), encoding="utf-8")
    return rows


def queries(rows: list[dict], n: int, seed: int) -> list[tuple[str, str]]:
    """(query, passage id): the title plus one random non-first sentence cut to 20 words."""
    rng = random.Random(seed + 1)
    out = []
    for r in rng.sample(rows, min(n, len(rows))):
        sents = _SENT.split(r["text"])
        s = rng.choice(sents[1:]) if len(sents) > 1 else sents[0]
        out.append((f"{r['title']} {' '.join(s.split()[:20])}", r["id"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", type=Path, help="KB folder (default: the demo KB)")
    ap.add_argument("--passages", type=int, default=2000)
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from dataclasses import replace

    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync

    cfg = Config.resolve()
    kb_dir = args.kb or api.demo_paths()[0]
    tmp = Path(tempfile.mkdtemp(prefix="mmhops-bench-build-"))
    try:
        rows = sample_kb(kb_dir, tmp / "kb", args.passages, args.images, args.seed)
        kb = KnowledgeBase(tmp / "kb")
        text, image = api.text_encoder(cfg), (api.image_encoder(cfg) if kb.images else None)
        text.encode(["warm up"])
        settings = {"before": replace(cfg.index, encode_batch=64, sort_by_length=False), "now": cfg.index}
        rates = {}
        for name, icfg in settings.items():
            t0 = time.perf_counter()
            rep = sync(tmp / name, kb, text, image, icfg, progress=False)
            rates[name] = rep.rates
            print(f"{name:6s} encode_batch={icfg.encode_batch:<3d} sort_by_length={icfg.sort_by_length!s:5s} "
                  f"passages/s {rep.rates['passages']:7.1f}  images/s {rep.rates.get('images') or 0:6.1f}  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        for kind in ("passages", "images"):
            b, n = rates["before"].get(kind), rates["now"].get(kind)
            if b and n:
                print(f"{kind}: now/before = {n / b:.2f}x")
        qs = queries(rows, args.queries, args.seed)
        found = {}
        for name in settings:
            with MultimodalIndex(tmp / name, text, image, cfg.index, replace(cfg.search, hybrid=False)) as idx:
                found[name] = [[h.passage.id for h in idx.search_text(q, 10)] for q, _ in qs]
        for name in settings:
            top1 = sum(f[0] == pid for f, (_, pid) in zip(found[name], qs) if f) / len(qs)
            top3 = sum(pid in f[:3] for f, (_, pid) in zip(found[name], qs)) / len(qs)
            print(f"dense text search, {name:6s}: top-1 {top1:.3f}  top-3 {top3:.3f}  ({len(qs)} queries)")
        same = sum(a == b for a, b in zip(found["before"], found["now"])) / len(qs)
        print(f"identical top-10 lists before/now: {same:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
