"""`ask` as a user feels it: whole-process wall time and in-process warm time, old default beside new.

    python bench/bench_ask.py [--runs 5] [--image IMG --question Q] [--index DIR]

Variants (each a full default configuration, told apart only by settings):
  old   the GGUF base with the shipped LoRA applied at run time (model.merge = false)
  new   the current default: the LoRA folded into one cached Q8_0 GGUF (model.merge = true)

Whole process: `mmhops-lite ask IMG Q --json` in a fresh process, runs of the two variants interleaved (old, new,
old, new, ...) after one warm-up each, so both see the same machine state; p50 and range, and the peak RSS.
Warm: one process per variant that loads the model once, asks once to warm up, then times `api.ask` `--runs`
times. Where the time goes comes from the trace's own timings (model load, index open, perception, loop) and one
timed `import cli` (interpreter start and imports). Prints ratios new/old measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"old": {"MMHOPS_MODEL_MERGE": "false"}, "new": {}}


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMHOPS_MODEL_MERGE")}
    env.update(extra)
    return env


def whole_process(image: str, question: str, index: str | None, extra: dict) -> dict:
    """One `mmhops-lite ask` in a fresh process: wall seconds, peak RSS (MB) and the trace."""
    boot = ("import atexit, resource, sys; atexit.register(lambda: sys.stderr.write("
            "'PEAK_RSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); import cli; cli.main()")
    cmd = [sys.executable, "-c", boot, "ask", image, question, "--json"]
    if index:
        cmd += ["--index", index]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"ask failed: {err.decode()[-800:]}")
    rss = next((int(x.split()[1]) / 1024 for x in err.decode().splitlines() if x.startswith("PEAK_RSS_KB")), None)
    return {"wall": wall, "rss_mb": rss, "trace": json.loads(out)}


def import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli"], cwd=ROOT, check=True)
    return time.perf_counter() - t0


WARM = r"""
import json, sys, time
from mmhops_lite import api
from mmhops_lite.config import Config
image, question, index, runs = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
cfg = Config.resolve()
t0 = time.perf_counter(); gen = api.generator(cfg); load = time.perf_counter() - t0
api.ask([image], question, cfg, index, gen=gen)
times, tr = [], None
for _ in range(runs):
    t0 = time.perf_counter(); tr = api.ask([image], question, cfg, index, gen=gen); times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "load": load, "answer": tr.answer, "timings": tr.timings, "tokens": tr.tokens}))
"""


def warm(image: str, question: str, index: str | None, extra: dict, runs: int) -> dict:
    p = subprocess.run([sys.executable, "-c", WARM, image, question, index or "", str(runs)], cwd=ROOT,
                       env=_env(extra), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"warm run failed: {p.stderr[-800:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image")
    ap.add_argument("--question")
    ap.add_argument("--index")
    a = ap.parse_args()
    from mmhops_lite import api
    from mmhops_lite.config import Config

    cfg = Config.resolve()
    if not a.image:
        img, q = api.demo_question(cfg)
        a.image, a.question = str(img), a.question or q
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; image {a.image}; question {a.question!r}")
    for name, extra in VARIANTS.items():  # warm-up: builds caches (the merged GGUF on first use), page cache
        whole_process(a.image, a.question, a.index, extra)
    runs: dict = {n: [] for n in VARIANTS}
    for _ in range(a.runs):
        for name, extra in VARIANTS.items():
            runs[name].append(whole_process(a.image, a.question, a.index, extra))
    imp = statistics.median(import_seconds() for _ in range(3))
    warm_res = {name: warm(a.image, a.question, a.index, extra, a.runs) for name, extra in VARIANTS.items()}

    print(f"\n{'':6} {'cold p50':>9} {'cold range':>13} {'warm p50':>9} {'peak RSS':>9}  answer")
    summary = {}
    for name in VARIANTS:
        walls = [r["wall"] for r in runs[name]]
        w = statistics.median(warm_res[name]["times"])
        summary[name] = (statistics.median(walls), w)
        rss = max(r["rss_mb"] or 0 for r in runs[name])
        print(f"{name:6} {summary[name][0]:8.2f}s {min(walls):6.2f}-{max(walls):5.2f}s {w:8.2f}s {rss:7.0f}MB  "
              f"{runs[name][-1]['trace']['answer']}")
    print(f"\nnew/old: cold {summary['new'][0] / summary['old'][0]:.2f}x, warm {summary['new'][1] / summary['old'][1]:.2f}x")
    print(f"\nwhere a cold run's time goes (medians; imports = `import cli` in a fresh interpreter, {imp:.2f}s):")
    keys = ("model_load_s", "index_open_s", "perception_s", "total_s")
    for name in VARIANTS:
        t = {k: statistics.median(r["trace"]["timings"].get(k, 0.0) for r in runs[name]) for k in keys}
        tok = runs[name][-1]["trace"]["tokens"]
        rest = summary[name][0] - imp - sum(t.values())
        print(f"  {name:4} imports {imp:.2f}  model load {t['model_load_s']:.2f}  index open {t['index_open_s']:.2f}  "
              f"perception {t['perception_s']:.2f}  loop {t['total_s']:.2f} ({tok['evaluated']} tokens evaluated, "
              f"{tok['generated']} generated)  other {rest:.2f}")


if __name__ == "__main__":
    main()
