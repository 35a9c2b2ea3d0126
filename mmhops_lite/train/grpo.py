"""GRPO on peft, over the loop's own multi-turn rollouts.

Why a compact step rather than trl's GRPOTrainer: our rollouts are whole `ask` episodes whose tool calls are
our tags (trl's tool hooks need JSON tool calls in the chat template, which SmolLM2 lacks), they come from
llama.cpp with the current LoRA as a GGUF adapter, and groups whose rewards are all equal are skipped before any
forward pass. The objective is trl's: group-relative advantages, token log-ratio with PPO clipping, optional
k3 KL to the reference (the adapter switched off). The llama.cpp engine is refreshed with the current adapter every
`refresh_every` steps (default 1) and samples from the full softmax; what is left of the sampler/learner mismatch
(quantized kernels, a transcript re-tokenized segment by segment) is corrected with truncated importance weights
from the sampler's own log-probabilities, as trl corrects vLLM rollouts.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import require
from .episodes import TokenizedEpisode


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO settings (defaults: the small-model CPU recipe)."""

    steps: int = 40
    questions_per_step: int = 2
    group_size: int = 4
    lr: float = 1e-4
    loss: str = "dr_grpo"  # grpo (std-normalised, per-sequence mean) | dr_grpo (no std, token sum / constant) | reinforce
    kl: float = 0.0  # k3 KL to the reference policy (adapter off); 0 skips the extra forward pass
    clip: float = 0.2
    temperature: float = 1.0
    engine: str = "llamacpp"  # llamacpp (GGUF adapter over the base GGUF) | torch (the live peft model)
    refresh_every: int = 1  # steps between GGUF adapter refreshes of the llama.cpp engine
    importance_cap: float = 2.0  # truncated importance weights for the llama.cpp sampler (0 = off)
    checkpoint_every: int = 5
    seed: int = 0


def advantages(rewards: list[float], kind: str) -> list[float]:
    """Group-relative advantages.

    >>> advantages([1.0, 0.0, 0.0, 1.0], "dr_grpo")
    [0.5, -0.5, -0.5, 0.5]
    >>> [round(a, 3) for a in advantages([1.0, 0.0, 0.0, 1.0], "grpo")]
    [0.866, -0.866, -0.866, 0.866]
    >>> advantages([0.3, 0.3], "grpo")
    [0.0, 0.0]
    """
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if kind == "grpo":
        std = math.sqrt(sum(c * c for c in centred) / max(len(rewards) - 1, 1))
        return [c / (std + 1e-4) if std > 0 else 0.0 for c in centred]
    return centred


def question_order(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Question indices of a step: a seeded permutation per pass, so a resumed run sees what it would have.

    >>> question_order(5, 0, 2, 0) == question_order(5, 0, 2, 0)
    True
    >>> len(set(question_order(4, 0, 2, 1) + question_order(4, 1, 2, 1)))
    4
    """
    out = []
    for j in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(j, n)
        perm = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(perm)
        out.append(perm[k])
    return out


def token_logprobs(net, ep: TokenizedEpisode):
    """(log-probs of each next token, entropy of each next-token distribution), positions 1..n-1."""
    torch = require("torch", "train")
    ids = torch.tensor([ep.input_ids])
    logits = net(input_ids=ids).logits[0, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    target = ids[0, 1:]
    logp = logp_all.gather(-1, target[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def episode_loss(net, ep: TokenizedEpisode, adv: float, cfg: GRPOConfig, sampler_logprobs: list | None = None,
                 max_tokens: int = 1024):
    """Clipped policy-gradient loss of one rollout (+ k3 KL), summed over its policy tokens; and its stats.

    `sampler_logprobs` (one per position of `ep.input_ids`, None where unknown) are the rollout engine's own
    log-probabilities of the tokens it drew. Each policy token's loss is then scaled by the truncated importance
    weight min(pi_torch / pi_sampler, cfg.importance_cap), which corrects for the llama.cpp sampler not being
    exactly the torch policy (quantized matmuls, LoRA in another precision, a re-tokenized transcript).
    """
    torch = require("torch", "train")
    logp, ent = token_logprobs(net, ep)
    mask = torch.tensor(ep.loss_mask[1:], dtype=torch.float32)
    old = logp.detach()  # one update per batch of rollouts: the behaviour policy is the current one
    ratio = torch.exp(logp - old)
    a = torch.full_like(logp, adv)
    per_tok = -torch.min(ratio * a, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * a)
    iw = torch.ones_like(logp)
    if sampler_logprobs is not None and cfg.importance_cap > 0:
        iw = importance_weights(old, sampler_logprobs[1:], cfg.importance_cap)
        per_tok = per_tok * iw
    kl_tok = torch.zeros_like(logp)
    if cfg.kl > 0:
        with torch.no_grad(), net.disable_adapter():
            ref, _ = token_logprobs(net, ep)
        d = ref - logp
        kl_tok = torch.exp(d) - d - 1.0
        per_tok = per_tok + cfg.kl * kl_tok
    n = mask.sum().clamp(min=1.0)
    if cfg.loss == "dr_grpo":
        loss = (per_tok * mask).sum() / max_tokens  # a constant normaliser: no length bias
    else:
        loss = (per_tok * mask).sum() / n
    stats = {"entropy": float((ent.detach() * mask).sum() / n), "kl": float((kl_tok.detach() * mask).sum() / n),
             "tokens": int(mask.sum()), "importance": float((iw * mask).sum() / n),
             "importance_capped": float(((iw >= cfg.importance_cap - 1e-6) * mask).sum() / n)}
    return loss, stats


def importance_weights(logp, sampler_logprobs: list, cap: float):
    """Truncated importance weights min(exp(logp - sampler_logp), cap); 1 where the sampler's value is unknown.

    >>> import torch
    >>> importance_weights(torch.tensor([-1.0, -2.0, -0.5]), [-1.0, -3.0, None], 2.0).tolist()
    [1.0, 2.0, 1.0]
    """
    torch = require("torch", "train")
    s = torch.tensor([float("nan") if v is None else float(v) for v in sampler_logprobs], dtype=torch.float32)
    w = torch.exp(logp.detach() - s).clamp(max=cap)
    return torch.where(torch.isnan(s), torch.ones_like(w), w)
