"""GRPO step time and rollout generation speed, llama.cpp engine vs torch engine, compact trainer vs trl's
GRPOTrainer, side by side in one run.

    python bench/bench_train.py [--steps 3] [--adapter runs/sft] [--questions Q.jsonl]
    python bench/bench_train.py --trainers compact,trl --trl-steps 20 --engines llamacpp --rollout-weights merged \
        --rollouts batched --adapter runs/sft      # the trl route's reward over 20 steps beside both s/step

`--trainers trl` runs trl's GRPOTrainer (`train --trainer trl`) on the same questions, engine and starting adapter
for --trl-steps steps, prints its reward per step and whether it rose (mean of the last five steps against the
first five, and the least-squares slope).

Each engine runs the same GRPO steps (2 questions x group 4, default policy, LoRA r=16) from the same starting
adapter on the demo index; prints seconds per step (adapter refresh / rollouts / update; the median step, so
use --steps 3 to keep the one-off first refresh out), generated tokens per rollout-second, and two rates that
do not depend on which rollouts a path happened to sample: prompt + generated tokens per rollout-second, and
tokens through the model per update-second. The llama.cpp engine is timed with each way of carrying the
current LoRA (--rollout-weights merged,adapter), and every engine with the step's rollouts decoded side by side
or one after another (--rollouts batched,sequential). "all rollout tok/s" counts the tokens an engine ran: a
prompt prefix a batched engine copied from another sequence's cache is not counted; "episode tok/s" counts the
tokens of the finished episodes (prompt and every turn), whichever way an engine produced them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from mmhops_lite.train.settings import GRPOConfig


def main() -> None:
    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.train.settings import LoraSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--adapter", type=Path, help="start from this train run's adapter (e.g. an SFT warm start)")
    ap.add_argument("--questions", type=Path, default=api.demo_paths()[0].parent / "questions" / "train.jsonl")
    ap.add_argument("--engines", default="llamacpp,torch", help="comma list of rollout engines to time")
    ap.add_argument("--update-dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--rollout-weights", default="merged", help="comma list: merged,adapter (llama.cpp engine)")
    ap.add_argument("--rollouts", default="batched,sequential", help="comma list: batched,sequential")
    ap.add_argument("--trainers", default="compact", help="comma list: compact,trl")
    ap.add_argument("--trl-steps", type=int, default=0, help="steps of the trl route (default: --steps)")
    ap.add_argument("--lr", type=float, default=GRPOConfig.lr, help="GRPO learning rate (both trainers)")
    a = ap.parse_args()
    cfg = Config.resolve()
    from mmhops_lite.paths import free_cores

    print(f"threads: {cfg.model.threads or free_cores()} (set MMHOPS_MODEL_THREADS to fix them; 0 = the idle cores "
          "at start)", flush=True)
    rows = {}
    runs = [(t, e, w, r) for t in a.trainers.split(",") for e in a.engines.split(",")
            for w in (a.rollout_weights.split(",") if e == "llamacpp" else [""]) for r in a.rollouts.split(",")]
    curves = {}
    for trainer, engine, weights, rollouts in runs:
        label = "-".join(x for x in ("trl" if trainer == "trl" else "", engine, weights, rollouts) if x)
        out = Path(tempfile.mkdtemp(prefix=f"bench-train-{trainer}-{engine}-"))
        steps = (a.trl_steps or a.steps) if trainer == "trl" else a.steps
        try:
            # every path starts from the same weights: the adapter given (e.g. an SFT warm start), or a fresh LoRA
            api.train_policy(a.questions, cfg, out, lora=LoraSpec(), sft=None, from_adapter=a.adapter,
                             grpo=GRPOConfig(steps=steps, engine=engine, checkpoint_every=10**6, lr=a.lr,
                                             update_dtype=a.update_dtype, rollout_weights=weights or "merged",
                                             rollouts=rollouts, trainer=trainer))
            log = [json.loads(x) for x in (out / "grpo-log.jsonl").read_text().splitlines()]
            if trainer == "trl":
                curves[label] = [r["reward"] for r in log]
            for r in log:  # per step, so a median is never read without what it summarises
                if trainer == "trl":
                    print(f"  {label} step {r['step']}: {r['seconds']:.1f} s = rollouts {r['rollout_s']:.1f} + "
                          f"trl {r['update_s']:.1f} (reward {r['reward']:.3f}, accuracy {r['accuracy']:.3f}, "
                          f"{r['zero_variance_groups']} zero-variance groups)", flush=True)
                    continue
                print(f"  {label} step {r['step']}: {r['seconds']:.1f} s = refresh {r.get('refresh_s', 0):.2f} + "
                      f"rollouts {r['rollout_s']:.1f} + update {r['update_s']:.1f} "
                      f"({r['trained_rollouts']} rollouts trained, {r['zero_variance_groups']} zero-variance groups, "
                      f"{r['rollout_tokens']} rollout tokens, {r['update_tokens']} update tokens)", flush=True)
            n_roll = 2 * 4
            rows[label] = {
                "step_s": statistics.median(r["seconds"] for r in log),
                # the mean over steps 2.. (step 1 lays the rollout GGUF out once per process)
                "mean_s": statistics.mean(r["seconds"] for r in log[1:] or log),
                "refresh_s": statistics.median(r.get("refresh_s", 0.0) for r in log),
                "rollout_s": statistics.median(r["rollout_s"] for r in log),
                "update_s": statistics.median(r["update_s"] for r in log),
                "rollout_tok_s": statistics.median(r["completion_tokens"] * n_roll / max(r["rollout_s"], 1e-9)
                                                   for r in log),
                # the same work measure for every path: tokens read or generated per rollout-second, and
                # tokens run through the model (forward + backward) per update-second
                "rollout_all_tok_s": sum(r["rollout_tokens"] for r in log) / sum(r["rollout_s"] for r in log),
                # what the rollouts delivered: their final episodes' tokens, however much of them an engine shared
                "episode_tok_s": sum(r["episode_tokens"] for r in log) / sum(r["rollout_s"] for r in log),
                "update_tok_s": sum(r["update_tokens"] for r in log) / max(sum(r["update_s"] for r in log), 1e-9),
            }
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{'engine':26} {'s/step':>8} {'mean s':>7} {'refresh s':>10} {'rollouts s':>11} {'update s':>9} {'gen tok/s':>10} "
          f"{'all rollout tok/s':>18} {'episode tok/s':>14} {'update tok/s':>13}")
    for e, r in rows.items():
        print(f"{e:26} {r['step_s']:8.1f} {r['mean_s']:7.1f} {r['refresh_s']:10.2f} {r['rollout_s']:11.1f} {r['update_s']:9.1f} "
              f"{r['rollout_tok_s']:10.1f} {r['rollout_all_tok_s']:18.1f} {r['episode_tok_s']:14.1f} {r['update_tok_s']:13.1f}")
    base = max(rows, key=lambda e: rows[e]["step_s"]) if rows else None  # the slowest path
    for e, r in rows.items():
        if e != base:
            print(f"{e} vs {base}: step {rows[base]['step_s'] / r['step_s']:.2f}x faster, "
                  f"generated tokens/s {r['rollout_tok_s'] / rows[base]['rollout_tok_s']:.2f}x")
    for label, ys in curves.items():
        n = len(ys)
        k = min(5, n // 2)
        xm, ym = (n + 1) / 2, sum(ys) / n
        slope = sum((i + 1 - xm) * (y - ym) for i, y in enumerate(ys)) / max(sum((i + 1 - xm) ** 2 for i in range(n)), 1e-9)
        first, last = sum(ys[:k]) / max(k, 1), sum(ys[-k:]) / max(k, 1)
        print(f"{label} reward per step: {' '.join(f'{y:.2f}' for y in ys)}")
        print(f"{label} reward: first {k} steps {first:.3f}, last {k} steps {last:.3f}, slope {slope:+.4f}/step -> "
              f"{'rose' if last > first and slope > 0 else 'did not rise'}")
    print("target: <= 20 s per step (2 questions x group 4)")


if __name__ == "__main__":
    main()
