"""SFT step time, three ways of computing the same masked loss, side by side in one run.

    python bench/bench_sft.py [--data runs/RUN/sft-data.jsonl] [--steps 6]

Every variant trains a fresh LoRA (r=16, all linear layers, default policy) on the same batches of 4 gold
episodes, in the same order:
  full-fp32   the whole sequence through the LM head, non-policy labels set to -100 (the textbook formula);
  rows-fp32   only the rows that predict a policy token reach the LM head (what `train --sft` runs in fp32);
  rows-bf16   the same under bf16 autocast with plain attention for short sequences (the default where the CPU
              has AMX bf16 tiles).
Prints seconds per step (median), policy tokens per second and each variant's speed relative to full-fp32, and
the first step's loss of each (the three must agree to bf16 precision).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from mmhops_lite.config import Config
    from mmhops_lite.paths import free_cores
    from mmhops_lite.train.episodes import TokenizedEpisode
    from mmhops_lite.train.grpo_loss import native_bf16
    from mmhops_lite.train.policy import load_for_training
    from mmhops_lite.train.settings import LoraSpec
    from mmhops_lite.train.sft import masked_loss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="an sft-data.jsonl written by `train --sft` (default: the newest run's)")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    data_file = a.data
    if data_file is None:
        runs = sorted(Path.home().glob(".cache/mmhops-lite/runs/*/sft-data.jsonl"), key=lambda p: p.stat().st_mtime)
        if not runs:
            sys.exit("no sft-data.jsonl found: run `mmhops-lite train --lora --sft --steps 0 -o RUN` first, or pass --data")
        data_file = runs[-1]
    eps = [TokenizedEpisode(**json.loads(x)) for x in data_file.read_text().splitlines()[: 4 * a.steps]]
    cfg = Config.resolve()
    threads = cfg.model.threads or free_cores()
    print(f"data: {data_file} ({len(eps)} episodes, mean {statistics.mean(len(e.input_ids) for e in eps):.0f} tokens, "
          f"{statistics.mean(e.policy_tokens for e in eps):.0f} policy tokens); threads {threads}; AMX bf16: "
          f"{native_bf16()}", flush=True)

    def full_fp32(net, ep):
        labels = torch.tensor([[t if m else -100 for t, m in zip(ep.input_ids, ep.loss_mask)]])
        return net(input_ids=torch.tensor([ep.input_ids]), labels=labels).loss

    variants = {"full-fp32": full_fp32, "rows-fp32": lambda net, ep: masked_loss(net, ep, False),
                "rows-bf16": lambda net, ep: masked_loss(net, ep, True)}
    rows = {}
    for name, loss_fn in variants.items():
        net, _, _, _ = load_for_training(cfg.model.policy, LoraSpec(), threads=threads, seed=0)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
        times, first = [], None
        for s in range(a.steps):
            batch = eps[4 * s: 4 * s + 4]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for ep in batch:
                loss = loss_fn(net, ep) / len(batch)
                loss.backward()
                total += loss.item()
            opt.step()
            times.append(time.perf_counter() - t0)
            first = total if first is None else first
        tok = sum(e.policy_tokens for e in eps) / sum(times)
        rows[name] = (statistics.median(times), tok, first)
        print(f"  {name}: {rows[name][0]:.2f} s/step, {tok:.0f} policy tok/s, first loss {first:.4f}", flush=True)
        del net, opt
    base = rows["full-fp32"][0]
    print("\n| variant | s/step (median) | policy tok/s | speed vs full-fp32 | first-step loss |")
    print("|---|---|---|---|---|")
    for name, (sec, tok, first) in rows.items():
        print(f"| {name} | {sec:.2f} | {tok:.0f} | {base / sec:.2f}x | {first:.4f} |")


if __name__ == "__main__":
    main()
