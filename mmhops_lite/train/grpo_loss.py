"""GRPO on peft, over the loop's own multi-turn rollouts.

Why a compact step as the default (trl's GRPOTrainer is the other route, `--trainer trl`, train/trl_route.py,
for GPUs and clusters; on this CPU its update is 1.7x slower per token): our rollouts are whole `ask` episodes
whose tool calls are our tags (trl's own tool hooks need JSON tool calls in the chat template, which SmolLM2
lacks, so the trl route plays them through a rollout_func), they come from llama.cpp with the current LoRA as a GGUF adapter, and groups whose rewards are all equal are skipped before any
forward pass. The objective is trl's: group-relative advantages, token log-ratio with PPO clipping, optional
k3 KL to the reference (the adapter switched off). The llama.cpp engine is refreshed with the current adapter every
`refresh_every` steps (default 1) and samples from the full softmax; what is left of the sampler/learner mismatch
(quantized kernels, a transcript re-tokenized segment by segment) is corrected with truncated importance weights
from the sampler's own log-probabilities, as trl corrects vLLM rollouts.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path

from ..errors import require
from .episodes import TokenizedEpisode
from .settings import DTYPES, GRPOConfig


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


def native_bf16() -> bool:
    """True when the CPU has AMX tiles for bfloat16, where `auto` runs the update in bf16. AVX512-BF16 alone is not
    enough: on a 2-core Xeon with it (and no AMX) an SFT step of four 880-token episodes took 26.7 s in bf16
    against 13.9 s in fp32 (`bench/bench_sft.py`); the machine of the earlier measurement (7.7 s bf16 against
    15.4 s fp32) was not recorded. `--update-dtype bf16` still forces bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags


def update_bf16(dtype: str, device: str = "cpu") -> bool:
    """Whether an update (GRPO or SFT) with this `update_dtype` runs its body under bf16 autocast on `device`
    (auto: AMX tiles on a CPU, bf16 support on a GPU)."""
    if dtype not in DTYPES:
        raise ValueError(f"update dtype {dtype!r}: use {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype == "bf16"
    if device == "cuda":
        return bool(require("torch", "train").cuda.is_bf16_supported())
    return native_bf16()


def device_of(net) -> str:
    """'cpu' or 'cuda': where the model's weights are (the update's tensors are made there)."""
    return next(net.parameters()).device.type


# Under bf16 autocast on a CPU, plain (matmul + softmax) attention runs a rollout's forward and backward faster than
# torch's flash kernel up to ~1,300 tokens (1,100 tokens: 7.7 s vs 9.5 s for a group of 4; 800: 4.8 vs 6.5), and
# much slower beyond (1,600: 27 vs 17 s: it keeps every attention matrix for the backward).
EAGER_MAX = 1280


@contextmanager
def _attention(net, length: int, bf16: bool):
    """Plain attention for a bf16 pass of at most EAGER_MAX positions, the model's own otherwise."""
    lm = _lm(net)
    cur = getattr(lm.config, "_attn_implementation", None)
    if not (bf16 and length <= EAGER_MAX) or cur in (None, "eager") or not hasattr(lm, "set_attn_implementation"):
        yield
        return
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(cur)


def _lm(net):
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def token_logprobs(net, ep: TokenizedEpisode):
    """(log-probs of each next token, entropy of each next-token distribution), positions 1..n-1 (fp32, all
    positions: the reference the fast path below is tested against)."""
    torch = require("torch", "train")
    ids = torch.tensor([ep.input_ids], device=device_of(net))
    logits = net(input_ids=ids).logits[0, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    target = ids[0, 1:]
    logp = logp_all.gather(-1, target[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def policy_targets(ep: TokenizedEpisode) -> list[int]:
    """Positions of the tokens the policy wrote (loss_mask 1): the only ones the GRPO loss reads.

    >>> policy_targets(TokenizedEpisode([5, 6, 7, 8, 9], [0, 0, 1, 0, 1], 2))
    [2, 4]
    """
    return [t for t, m in enumerate(ep.loss_mask) if m and t > 0]


def policy_logprobs(net, ep: TokenizedEpisode, bf16: bool = False, start: int = 0, prefix=None):
    """(log-prob, entropy) at each policy position only.

    The transformer body runs from `start` (the keys/values of ids[:start] given as `prefix`, shared by a group),
    under bfloat16 autocast when `bf16`; the LM head runs in fp32 and only on the rows that predict a policy
    token, so nothing the loop wrote (<information>, corrections) or the prompt even reaches the loss."""
    torch = require("torch", "train")
    lm = _lm(net)
    targets = policy_targets(ep)
    if targets and targets[0] <= start:
        raise ValueError("a shared prefix must end before the first policy token")
    dev = device_of(net)
    ids = torch.tensor([ep.input_ids[start:]], device=dev)
    cache = None
    if prefix is not None:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=prefix)  # fresh cache object, the prefix tensors themselves (with grad)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16), _attention(net, len(ep.input_ids), bf16):
        h = lm.get_decoder()(input_ids=ids, past_key_values=cache, use_cache=cache is not None).last_hidden_state[0]
    rows = torch.tensor([t - 1 - start for t in targets], dtype=torch.long, device=dev)
    with torch.autocast(dev, enabled=False):
        logits = lm.get_output_embeddings()(h[rows].float())
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, torch.tensor(ep.input_ids, device=dev)[targets][:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def policy_loss(logp, ent, adv: float, cfg: GRPOConfig, sampler=None, ref=None, max_tokens: int = 1024):
    """Clipped policy-gradient loss over the policy tokens of one rollout (+ k3 KL to `ref`), and its stats.

    `sampler` (one per policy token, None where unknown) are the rollout engine's log-probabilities of the tokens
    it drew: each token's loss is scaled by min(pi_torch / pi_sampler, cfg.importance_cap)."""
    torch = require("torch", "train")
    old = logp.detach()  # one update per batch of rollouts: the behaviour policy is the current one
    ratio = torch.exp(logp - old)
    a = torch.full_like(logp, adv)
    per_tok = -torch.min(ratio * a, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * a)
    iw = torch.ones_like(logp)
    if sampler is not None and cfg.importance_cap > 0:
        iw = importance_weights(old, sampler, cfg.importance_cap)
        per_tok = per_tok * iw
    kl_tok = torch.zeros_like(logp)
    if ref is not None:
        d = ref - logp
        kl_tok = torch.exp(d) - d - 1.0
        per_tok = per_tok + cfg.kl * kl_tok
    n = max(len(logp), 1)
    loss = per_tok.sum() / (max_tokens if cfg.loss == "dr_grpo" else n)  # dr_grpo: a constant, no length bias
    stats = {"entropy": float(ent.detach().sum() / n), "kl": float(kl_tok.detach().sum() / n),
             "tokens": len(logp), "importance": float(iw.sum() / n),
             "importance_capped": float((iw >= cfg.importance_cap - 1e-6).sum() / n)}
    return loss, stats


def _rollout_loss(net, ep: TokenizedEpisode, adv: float, cfg: GRPOConfig, sampler_logprobs: list | None,
                  max_tokens: int, start: int = 0, prefix=None):
    """policy_loss of one rollout; `sampler_logprobs` is per position of `ep.input_ids`, the KL reference is the
    base (adapter off) when cfg.kl > 0."""
    torch = require("torch", "train")
    bf16 = update_bf16(cfg.update_dtype, device_of(net))
    logp, ent = policy_logprobs(net, ep, bf16, start, prefix)
    targets = policy_targets(ep)
    sampler = [sampler_logprobs[t] for t in targets] if sampler_logprobs is not None else None
    ref = None
    if cfg.kl > 0:
        with torch.no_grad(), net.disable_adapter():
            ref = policy_logprobs(net, ep, bf16)[0]
    return policy_loss(logp, ent, adv, cfg, sampler, ref, max_tokens)


def episode_loss(net, ep: TokenizedEpisode, adv: float, cfg: GRPOConfig, sampler_logprobs: list | None = None,
                 max_tokens: int = 1024):
    """Loss and stats of one rollout on its own. `sampler_logprobs`: one per position of `ep.input_ids`."""
    return _rollout_loss(net, ep, adv, cfg, sampler_logprobs, max_tokens)


def shared_start(eps: list[TokenizedEpisode]) -> int:
    """Where a group's episodes may split: inside their common token prefix, before anyone's first policy token.

    >>> a = TokenizedEpisode([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], 3)
    >>> b = TokenizedEpisode([1, 2, 3, 9, 9, 9], [0, 0, 0, 1, 1, 1], 3)
    >>> shared_start([a, b])
    2
    """
    common = len(eps[0].input_ids)
    for e in eps[1:]:
        n = 0
        for x, y in zip(eps[0].input_ids, e.input_ids):
            if x != y:
                break
            n += 1
        common = min(common, n)
    firsts = [next((t for t, m in enumerate(e.loss_mask) if m), len(e.loss_mask)) for e in eps]
    return max(0, min([common] + firsts) - 1)


def group_backward(net, items: list, cfg: GRPOConfig, scale: float = 1.0, max_tokens: int = 1024) -> list:
    """Backpropagate scale * sum of the losses of a group's rollouts [(episode, advantage, sampler log-probs per
    position)]; returns [(loss, stats)] per rollout (losses detached).

    The prompt the rollouts share (system prompt, question, image descriptions: often half of each episode) runs
    through the model once. Its keys/values enter each rollout's pass as detached leaves, each rollout is
    backpropagated on its own (one rollout's activations in memory at a time), and the gradients the leaves
    gathered are sent back through the prompt's pass once at the end. Gradients equal those of `episode_loss`
    summed over the group (tested)."""
    torch = require("torch", "train")
    dev = device_of(net)
    bf16 = update_bf16(cfg.update_dtype, dev)
    eps = [it[0] for it in items]
    start = shared_start(eps) if len(eps) > 1 else 0
    kv, leaves = [], None
    if start >= 2:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16), _attention(net, start, bf16):
            out = _lm(net).get_decoder()(input_ids=torch.tensor([eps[0].input_ids[:start]], device=dev),
                                         use_cache=True)
        kv = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        flat = [t.detach().requires_grad_(True) for t in kv]
        leaves = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    else:
        start = 0
    res = []
    for ep, adv, slp in items:
        loss, st = _rollout_loss(net, ep, adv, cfg, slp, max_tokens, start, leaves)
        (loss * scale).backward()
        st["forward_tokens"] = len(ep.input_ids) - start + (start if not res else 0)  # the shared prompt once
        res.append((loss.detach(), st))
    if leaves is not None:
        pairs = [(t, leaf.grad) for t, leaf in zip(kv, [x for pair in leaves for x in pair]) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return res


def importance_weights(logp, sampler_logprobs: list, cap: float):
    """Truncated importance weights min(exp(logp - sampler_logp), cap); 1 where the sampler's value is unknown.

    >>> import torch
    >>> importance_weights(torch.tensor([-1.0, -2.0, -0.5]), [-1.0, -3.0, None], 2.0).tolist()
    [1.0, 2.0, 1.0]
    """
    torch = require("torch", "train")
    s = torch.tensor([float("nan") if v is None else float(v) for v in sampler_logprobs], dtype=torch.float32,
                     device=logp.device)
    w = torch.exp(logp.detach() - s).clamp(max=cap)
    return torch.where(torch.isnan(s), torch.ones_like(w), w)
