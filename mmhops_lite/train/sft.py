"""SFT warm start: teach the grammar and the chain on gold trajectories, loss on the policy's tokens only."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import Config
from ..errors import InputError, require
from ..loop import perceive
from ..types import Question
from .checkpoint import load_checkpoint, save_checkpoint, trim_log
from .distributed import Dist
from .episodes import TokenizedEpisode, gold_episode, tokenize_episode
from .grpo import policy_logprobs, update_bf16


@dataclass(frozen=True)
class SFTConfig:
    """SFT settings."""

    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 4  # episodes per optimiser step (gradient accumulation, one sequence at a time)
    max_examples: int = 240
    checkpoint_every: int = 10
    seed: int = 0
    update_dtype: str = "auto"  # auto (bf16 autocast where the CPU has native bf16) | bf16 | fp32, as for GRPO


def build_gold_set(questions: Sequence[Question], tokenizer, index, cfg: Config, limit: int, seed: int,
                   progress: Callable[[int, int], None] | None = None) -> list[TokenizedEpisode]:
    """Gold episodes of up to `limit` questions, balanced over templates, tokenized with loss masks."""
    rng = random.Random(seed)
    by_t: dict[str, list[Question]] = {}
    for q in questions:
        by_t.setdefault(q.extra.get("template") or q.split, []).append(q)
    for qs in by_t.values():
        rng.shuffle(qs)
    order = [q for group in zip(*[qs + [None] * (max(map(len, by_t.values())) - len(qs)) for qs in by_t.values()])
             for q in group if q is not None]

    def render(msgs):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out: list[TokenizedEpisode] = []
    cache: dict = {}
    for i, q in enumerate(order):
        if len(out) >= limit:
            break
        perc = perceive(q.images, index.image_encoder, ocr=cfg.encoders.ocr) if q.images else []
        got = gold_episode(q, render, count, index, cfg, perc, cache)
        if got is not None:
            ep, _ = got
            out.append(tokenize_episode(tokenizer, ep.prompt, ep.segments))
        if progress:
            progress(len(out), limit)
    if not out:
        raise InputError("no gold trajectory could be built from these questions",
                         fix="use questions from `mmhops-lite data synth` over the same KB as the index")
    return out


def masked_loss(net, ep: TokenizedEpisode, bf16: bool = False):
    """Mean cross-entropy over the policy's tokens of one episode. Only the rows that predict a policy token reach
    the LM head (the prompt and <information> blocks never do); the body runs under bf16 autocast when `bf16`."""
    logp, _ = policy_logprobs(net, ep, bf16=bf16)
    return -logp.mean()


def run_sft(net, data: list[TokenizedEpisode], out: Path, scfg: SFTConfig, meta: dict,
            on_step: Callable[[dict], None] | None = None, dist: Dist | None = None) -> dict:
    """Train the LoRA weights on `data`; checkpoints every N steps and resumes exactly from the last one.
    Under data parallelism each process takes every world-th example of a batch (gradients summed)."""
    torch = require("torch", "train")
    dist = dist or Dist()
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=0.0)
    bf16 = update_bf16(scfg.update_dtype)
    steps_per_epoch = (len(data) + scfg.batch_size - 1) // scfg.batch_size
    total = steps_per_epoch * scfg.epochs
    state = load_checkpoint(out / "checkpoint", net, opt) or {"step": 0}
    log = out / "sft-log.jsonl"
    if dist.main:
        trim_log(log, state["step"])
    while state["step"] < total:
        step = state["step"]
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(data)))
        random.Random(scfg.seed * 1000 + epoch).shuffle(order)  # the order of an epoch is a function of the seed
        batch = [data[i] for i in order[k * scfg.batch_size:(k + 1) * scfg.batch_size]]
        t0 = time.perf_counter()
        net.train()
        opt.zero_grad(set_to_none=True)
        losses = []
        for ep in dist.share(batch):
            loss = masked_loss(net, ep, bf16) / len(batch)
            loss.backward()
            losses.append(float(loss.detach()) * len(batch))
        losses = [x for part in dist.gather(losses) for x in part]
        dist.sum_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] = step + 1
        rec = {"phase": "sft", "step": state["step"], "of": total, "epoch": epoch, "loss": round(sum(losses) / len(losses), 5),
               "tokens": sum(e.policy_tokens for e in batch), "seconds": round(time.perf_counter() - t0, 2)}
        if dist.main:
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if on_step:
                on_step(rec)
            if state["step"] % scfg.checkpoint_every == 0 or state["step"] == total:
                save_checkpoint(out / "checkpoint", net, opt, state, meta)
        dist.barrier()
    return state
