"""Encoder throughput, ONNX vs torch side by side: `python bench/bench_encoders.py [--texts 512 --images 64]`."""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from mmhops_lite.encoders import get_image_encoder, get_text_encoder
from mmhops_lite.paths import free_cores

WORDS = ["river", "city", "tower", "bridge", "museum", "painter", "founded", "century", "capital", "harbour",
         "mountain", "festival", "railway", "cathedral", "island", "treaty", "empire", "library", "composer",
         "university", "theatre", "market", "castle", "garden"]


def passages(n: int, seed: int = 0) -> list[str]:
    """n pseudo-passages of 30-90 words (mean ~60), varied lengths like a real KB."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(30, 90))]
        out.append(f"Passage {i}: " + " ".join(words) + ".")
    return out


def images(n: int, seed: int = 0) -> list:
    """n 640x480 synthetic pictures (gradients and shapes), so decode+resize cost is realistic."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    xx = np.mgrid[0:480, 0:640][1]
    for _ in range(n):
        c = rng.integers(0, 255, (2, 3))
        t = (xx / 640.0)[..., None]
        a = (c[0] * (1 - t) + c[1] * t + rng.normal(0, 8, (480, 640, 1))).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(a, "RGB")
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            d.ellipse([x, y, x + 80, y + 80], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        out.append(im)
    return out


def timed(fn, items, batch_size: int, repeats: int) -> tuple[float, np.ndarray]:
    """Best-of-`repeats` items/s (after one warm-up batch) and the output of the last run."""
    fn(items[:batch_size], batch_size=batch_size)
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(items, batch_size=batch_size)
        best = min(best, time.perf_counter() - t)
    return len(items) / best, out


def main(argv=None) -> int:
    """Run both benchmarks and print a side-by-side table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--image-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    print(f"threads: {free_cores()} free cores (onnxruntime intra-op and torch use the same count)")
    rows = []
    for kind, make, data, bs in (("text", get_text_encoder, passages(args.texts), args.text_batch),
                                 ("image", get_image_encoder, images(args.images), args.image_batch)):
        t = time.perf_counter()
        onnx = make("onnx")
        load_onnx = time.perf_counter() - t
        t = time.perf_counter()
        ref = make("torch")
        load_torch = time.perf_counter() - t
        ips_onnx, a = timed(onnx.encode, data, bs, args.repeats)
        ips_torch, b = timed(ref.encode, data, bs, args.repeats)
        cos = float((a * b).sum(1).min())
        rows.append((kind, len(data), ips_onnx, ips_torch, ips_onnx / ips_torch, cos, load_onnx,
                     onnx.export_seconds, load_torch))

    print(f"{'encoder':<7} {'items':>5} {'onnx it/s':>10} {'torch it/s':>10} {'ratio':>6} {'min cos':>8} "
          f"{'onnx load s':>11} {'(export s)':>10} {'torch load s':>12}")
    for kind, n, io, it, r, cos, lo, ex, lt in rows:
        print(f"{kind:<7} {n:>5} {io:>10.1f} {it:>10.1f} {r:>5.2f}x {cos:>8.5f} {lo:>11.2f} {ex:>10.2f} {lt:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
