"""Exported policies side by side: load time, prompt and generation tokens/s, peak memory and file size.

    python bench/bench_export.py [--bundles ~/.cache/mmhops-lite/bundles] [--threads 0] [--repeats 3]

Rows: the torch model the exports come from (the base dequantised to float32 with the LoRA merged), GGUF
F16 / Q8_0 / Q4_K_M, the LoRA as a GGUF adapter over the registry's base GGUF, ONNX fp32 and 8-bit. Missing
bundles are exported first into --bundles (each export runs its own parity gate). Every row runs in its own
process, one after the other, so peak memory (max RSS, Python and libraries included) and load time are its own.

The prompt is a real loop prompt (system prompt, a dev question, its perception text, ~350 tokens); prompt tok/s
times a cold prefill of it, generation tok/s times 64 greedy tokens continuing it (no stop strings), median of
--repeats runs. Ratios are against torch, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmhops_lite.paths import cache_dir, free_cores

ROWS = [  # name, kind, bundle folder (None: the torch reference)
    ("torch fp32", "torch", None),
    ("GGUF F16", "bundle", "gguf-f16"),
    ("GGUF Q8_0", "bundle", "gguf-q8_0"),
    ("GGUF Q4_K_M", "bundle", "gguf-q4_k_m"),
    ("GGUF adapter over Q4_1 base", "bundle", "gguf-adapter"),
    ("ONNX fp32", "bundle", "onnx-fp32"),
    ("ONNX int8", "bundle", "onnx-int8"),
]
QUESTION = "<image> What is the capital of the country whose flag is shown?"
PERCEPTION = ["image 1 looks like: flag (0.41), jersey (0.12), envelope (0.05); text in image: none"]


def worker(kind: str, path: str, threads: int, repeats: int, gen_tokens: int) -> dict:
    """One row, measured in this process."""
    from mmhops_lite import grammar

    t0 = time.perf_counter()
    if kind == "torch":
        from mmhops_lite.backends.base import adapter_for
        from mmhops_lite.backends.torch_backend import TorchGenerator
        from mmhops_lite.registry import resolve, shipped_adapter

        base = "smollm2-135m-instruct"
        gen = TorchGenerator(resolve(base, "policy"), n_ctx=2048, threads=threads,
                             adapter=adapter_for("torch", shipped_adapter(base)))
    else:
        from mmhops_lite.bundle import bundle_generator

        gen = bundle_generator(path, n_ctx=2048, threads=threads)
    load = time.perf_counter() - t0
    prompt = gen.render(grammar.messages(QUESTION, PERCEPTION))
    gen.generate(prompt, [], max_tokens=1)  # warm-up (allocations, kernels)
    pre, dec = [], []
    for _ in range(repeats):
        gen.reset()
        r = gen.generate(prompt, [], max_tokens=1)
        pre.append(r.evaluated_tokens / r.seconds)
        r = gen.generate(prompt, [], max_tokens=gen_tokens)  # the prompt is cached: this times decoding
        dec.append(r.completion_tokens / r.seconds)
    return {"load_s": round(load, 2), "prompt_tokens": r.prompt_tokens, "prompt_tps": round(statistics.median(pre), 1),
            "gen_tps": round(statistics.median(dec), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)}


def policy_size(kind: str, path: Path | None) -> int:
    if kind == "torch":
        from mmhops_lite.convert import hf_from_gguf
        from mmhops_lite.registry import resolve

        folder = hf_from_gguf(resolve("smollm2-135m-instruct", "policy"))
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    man = json.loads((path / "manifest.json").read_text())
    return sum(v["size"] for k, v in man["files"].items() if not k.startswith("vision/"))


def ensure_bundles(root: Path, rows: list) -> None:
    from mmhops_lite import api
    from mmhops_lite.config import Config

    cfg = Config.resolve()
    for _, kind, name in rows:
        if name is None or (root / name / "manifest.json").is_file():
            continue
        fmt, quant = name.split("-", 1)
        print(f"exporting {name} ...", flush=True)
        # the shipped adapter, gated on the demo dev split's real prompts when the demo index is built
        api.export_policy("gguf-adapter" if quant == "adapter" else fmt, root / name, cfg,
                          model="smollm2-135m-instruct", adapter="auto", quant=None if quant == "adapter" else quant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=Path, default=cache_dir("bundles"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the rows this many times, interleaved (A B A B ...), and report medians: the "
                         "machine's speed drifts over minutes, so one pass can favour whichever row ran first")
    ap.add_argument("--rows", help="comma-separated row names to run (default: all), e.g. 'GGUF Q8_0,ONNX int8'")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = args.threads or free_cores()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], threads, args.repeats, args.gen_tokens)))
        return
    chosen = ROWS
    if args.rows:
        want = [x.strip() for x in args.rows.split(",") if x.strip()]
        unknown = [w for w in want if w not in {r[0] for r in ROWS}]
        if unknown:
            ap.error(f"unknown row(s) {unknown}; known: {', '.join(r[0] for r in ROWS)}")
        chosen = [r for r in ROWS if r[0] in want]
    ensure_bundles(args.bundles, chosen)
    runs: dict[str, list] = {label: [] for label, _, _ in chosen}
    for rnd in range(max(1, args.rounds)):
        for label, kind, name in chosen:
            path = args.bundles / name if name else None
            cmd = [sys.executable, __file__, "--threads", str(threads), "--repeats", str(args.repeats),
                   "--gen-tokens", str(args.gen_tokens), "--worker", kind, str(path)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if res.returncode != 0:
                print(f"{label}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"measured {label} (round {rnd + 1})", flush=True)
    rows = []
    for label, kind, name in chosen:
        if not runs[label]:
            continue
        path = args.bundles / name if name else None
        row = {k: statistics.median(r[k] for r in runs[label]) for k in runs[label][0] if k != "prompt_tokens"}
        row.update(name=label, prompt_tokens=runs[label][0]["prompt_tokens"], rounds=len(runs[label]),
                   gen_all=[r["gen_tps"] for r in runs[label]], size_mb=round(policy_size(kind, path) / 1e6, 1))
        if path:
            row["parity"] = json.loads((path / "manifest.json").read_text())["parity"]["greedy_top1_agreement"]
        rows.append(row)
    ref = rows[0] if rows and rows[0]["name"] == "torch fp32" else None
    print(f"\n{threads} thread(s); prompt {rows[0]['prompt_tokens'] if rows else '?'} tokens; "
          f"{args.gen_tokens} generated tokens; median of {args.repeats} per process, median of "
          f"{max(1, args.rounds)} interleaved round(s)\n")
    print("| policy | file MB | load s | prompt tok/s | generation tok/s | gen. vs torch | peak RSS MB | parity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['gen_tps'] / ref['gen_tps']:.1f}x" if ref else "-"
        print(f"| {r['name']} | {r['size_mb']} | {r['load_s']} | {r['prompt_tps']} | {r['gen_tps']} | {ratio} | "
              f"{r['peak_rss_mb']:.0f} | {r.get('parity', '-')} |")
    if max(1, args.rounds) > 1:
        print("\ngeneration tok/s per round: " + "; ".join(f"{r['name']} {r['gen_all']}" for r in rows))


if __name__ == "__main__":
    main()
