"""GRPO step time and rollout generation speed, llama.cpp engine vs torch engine, side by side in one run.

    python bench/bench_train.py [--steps 3] [--adapter runs/sft] [--questions Q.jsonl]

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


def main() -> None:
    from mmhops_lite import api
    from mmhops_lite.config import Config
    from mmhops_lite.train.settings import GRPOConfig, LoraSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--adapter", type=Path, help="start from this train run's adapter (e.g. an SFT warm start)")
    ap.add_argument("--questions", type=Path, default=api.demo_paths()[0].parent / "questions" / "train.jsonl")
    ap.add_argument("--engines", default="llamacpp,torch", help="comma list of rollout engines to time")
    ap.add_argument("--update-dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--rollout-weights", default="merged", help="comma list: merged,adapter (llama.cpp engine)")
    ap.add_argument("--rollouts", default="batched,sequential", help="comma list: batched,sequential")
    a = ap.parse_args()
    cfg = Config.resolve()
    from mmhops_lite.paths import free_cores

    print(f"threads: {cfg.model.threads or free_cores()} (set MMHOPS_MODEL_THREADS to fix them; 0 = the idle cores "
          "at start)", flush=True)
    rows = {}
    runs = [(e, w, r) for e in a.engines.split(",")
            for w in (a.rollout_weights.split(",") if e == "llamacpp" else [""]) for r in a.rollouts.split(",")]
    for engine, weights, rollouts in runs:
        label = "-".join(x for x in (engine, weights, rollouts) if x)
        out = Path(tempfile.mkdtemp(prefix=f"bench-train-{engine}-"))
        try:
            if a.adapter:  # start both engines from the same weights: copy the run's checkpoint as a GRPO one
                shutil.copytree(a.adapter / "checkpoint", out / "grpo-checkpoint")
                st = json.loads((out / "grpo-checkpoint" / "state.json").read_text())
                st["state"] = {"step": 0, "zero_var": 0, "no_search": 0}
                (out / "grpo-checkpoint" / "state.json").write_text(json.dumps(st))
                (out / "grpo-checkpoint" / "optimizer.safetensors").unlink(missing_ok=True)
            api.train_policy(a.questions, cfg, out, lora=LoraSpec(), sft=None,
                             grpo=GRPOConfig(steps=a.steps, engine=engine, checkpoint_every=10**6,
                                             update_dtype=a.update_dtype, rollout_weights=weights or "merged",
                                             rollouts=rollouts))
            log = [json.loads(x) for x in (out / "grpo-log.jsonl").read_text().splitlines()]
            for r in log:  # per step, so a median is never read without what it summarises
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
    print("target: <= 20 s per step (2 questions x group 4)")


if __name__ == "__main__":
    main()
