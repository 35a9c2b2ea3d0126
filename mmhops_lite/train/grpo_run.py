"""The GRPO run: rollouts through the `ask` loop, rewards, a peft update per step, logs, checkpoints, warnings."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from ..config import Config
from ..convert import adapter_to_gguf, lora_to_gguf
from ..errors import require
from ..loop import answer, answer_many, perceive
from ..rewards import Weights, part_names, total_reward
from ..types import Question
from .checkpoint import load_checkpoint, save_checkpoint, trim_log
from .distributed import Dist
from .episodes import tokenize_episode
from .grpo_loss import advantages, group_backward, question_order
from .merged_gguf import MergedGGUF
from .policy import save_adapter
from .settings import GRPOConfig

ZERO_VAR_WARN, NO_SEARCH_WARN = 5, 5  # consecutive steps before a collapse warning


class Engine:
    """Where rollouts are generated: llama.cpp over the base GGUF with the current LoRA, or the live torch model."""

    def __init__(self, kind: str, net, tok, out: Path, base_dir: Path, base_gguf: Path | None, cfg: Config,
                 weights: str = "merged", tag: str = ""):
        self.tag = tag  # per-process file names under data parallelism
        self.kind = kind if (kind == "torch" or base_gguf is not None) else "torch"
        self.net, self.tok, self.out, self.base_dir, self.base_gguf, self.cfg = net, tok, out, base_dir, base_gguf, cfg
        self.weights = weights  # llama.cpp: "merged" (LoRA folded into a Q8_0 GGUF) or "adapter" (GGUF LoRA)
        self.merged = None
        self.gen = None
        self.version = -1
        self.records = False  # llama.cpp rollouts record the sampler's log-probs (importance weights)

    def refresh(self, step: int) -> None:
        """Point the engine at the current weights (the llama.cpp engine reloads a freshly written GGUF)."""
        if self.kind == "torch":
            from ..backends.torch_backend import TorchGenerator

            self.gen = TorchGenerator.from_model(self.net, self.tok, self.cfg.model.n_ctx)
        else:
            from ..backends.llamacpp import LlamaCppGenerator

            self.gen = None  # the old engine lets go of the file before it is rewritten
            model = self._merged() if self.weights == "merged" else None
            lora = None
            if model is None:
                model, lora = self.base_gguf, self._adapter(step)
            self.gen = LlamaCppGenerator(model, n_ctx=self.cfg.model.n_ctx, threads=self.cfg.model.threads,
                                         lora_path=lora)
            self.gen.record_logprobs = self.records
        self.version = step

    def _merged(self) -> Path | None:
        """The current policy folded into a Q8_0 GGUF, or None (and the adapter from now on) for a base the
        merger does not know."""
        try:
            if self.merged is None:
                self.merged = MergedGGUF(self.base_gguf, self.base_dir, self.out / f"rollout-policy{self.tag}.gguf")
            return self.merged.write(self.net)
        except ValueError:
            self.weights = "adapter"
            return None

    def _adapter(self, step: int) -> Path:
        """The current LoRA as a GGUF adapter: written in-process (milliseconds), or by llama.cpp's converter for
        other architectures."""
        target = self.out / f"rollout-adapter{self.tag}.gguf"
        try:
            return lora_to_gguf(self.net, self.base_dir, target)
        except ValueError:
            folder = save_adapter(self.net, self.out / f"rollout-adapter{self.tag}", {"step": step})
            return adapter_to_gguf(folder, self.base_dir, target)


def sampler_turns(tokenizer, ep) -> list[list[float]]:
    """The sampler's log-probability of each token of each policy turn, as the trainer tokenizes the turn's text,
    stopping where that tokenization departs from what the engine drew.

    >>> from types import SimpleNamespace as NS
    >>> class Tok:  # one token per character
    ...     def __call__(self, text, add_special_tokens=False):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> ep = NS(segments=[("ab", True), ("I", False), ("cd", True)],
    ...         draws=[((97, 98), (-0.1, -0.2)), ((99, 120), (-0.3, -0.4))])
    >>> sampler_turns(Tok(), ep)
    [[-0.1, -0.2], [-0.3]]
    """
    turns = []
    for (text, _), (drawn, lps) in zip([s for s in ep.segments if s[1]], ep.draws):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out = []
        for i, t in enumerate(ids):
            if i >= len(drawn) or drawn[i] != t:
                break
            out.append(float(lps[i]))
        turns.append(out)
    return turns


def sampler_positions(tokenizer, prompt: str, segments, turns: list[list[float]], length: int) -> list:
    """Sampler log-probs placed at the positions `tokenize_episode` gives the policy's tokens (None elsewhere).

    >>> class Tok:  # one token per character
    ...     def __call__(self, text, add_special_tokens=False):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> sampler_positions(Tok(), "P", [("ab", True), ("I", False), ("c", True)], [[-0.1, -0.2], [-0.3]], 6)
    [None, -0.1, -0.2, None, -0.3, None]
    """
    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out: list = [None] * n(prompt)
    k = 0
    for text, by_policy in segments:
        m = n(text)
        if by_policy and k < len(turns):
            lps = turns[k]
            k += 1
            out += [lps[i] if i < len(lps) else None for i in range(m)]
        else:
            out += [None] * m
    return (out + [None] * length)[:length]


def episode_summary(tr, reward: dict) -> dict:
    """What the step log needs of one rollout (small, so processes can exchange it)."""
    return {**reward,
            "searches": sum(h.action in ("image_search", "text_search") for h in tr.hops), "turns": len(tr.hops),
            "generated": tr.tokens["generated"], "evaluated": tr.tokens["evaluated"], "episode": tr.tokens["prompt"]}


def run_grpo(net, tok, questions: Sequence[Question], index, cfg: Config, g: GRPOConfig, out: Path,
             base_dir: Path, base_gguf: Path | None, meta: dict, weights: Weights = Weights(),
             on_step: Callable[[dict], None] | None = None, on_warning: Callable[[str], None] | None = None,
             dist: Dist | None = None) -> dict:
    """Run GRPO steps until g.steps; resumes from out/grpo-checkpoint exactly where it stopped. Each step:
    refresh the rollout engine, roll out every question's group (`_rollouts`), update on the groups whose rewards
    differ (`_update`), then log (`step_record`), warn on collapse, and checkpoint.

    Under data parallelism (`dist` with several processes) each process rolls out every world-th question of a
    step, gradients are summed across processes, and the first process writes the log and checkpoints."""
    torch = require("torch", "train")
    dist = dist or Dist()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=g.lr, weight_decay=0.0)
    state = load_checkpoint(out / "grpo-checkpoint", net, opt) or {"step": 0, "zero_var": 0, "no_search": 0}
    engine = Engine(g.engine, net, tok, out, base_dir, base_gguf, cfg, g.rollout_weights,
                    tag=f".rank{dist.rank}" if dist.world > 1 else "")
    engine.records = engine.kind == "llamacpp" and g.importance_cap > 0
    roll = _Rollouts(engine, questions, index, replace(cfg, loop=replace(cfg.loop, temperature=g.temperature)), g,
                     tok, weights, dist)
    log = out / "grpo-log.jsonl"
    if dist.main:
        trim_log(log, state["step"])
    warn = on_warning or (lambda msg: None)
    while state["step"] < g.steps:
        step = state["step"]
        t0 = time.perf_counter()
        if engine.gen is None or step - engine.version >= g.refresh_every:
            net.eval()
            engine.refresh(step)
        t1 = time.perf_counter()
        groups = roll(step)
        t2 = time.perf_counter()
        parts = _update(net, opt, params, groups, g, tok, dist)
        rec = step_record(parts, step, g, engine.kind, (t1 - t0, t2 - t1, time.perf_counter() - t2), dist.world)
        n_groups = sum(x["groups"] for x in parts)
        state["zero_var"] = state["zero_var"] + 1 if rec["zero_variance_groups"] == n_groups else 0
        state["no_search"] = state["no_search"] + 1 if rec["searches"] < 0.05 else 0
        state["step"] = step + 1
        if dist.main:
            if state["zero_var"] == ZERO_VAR_WARN:
                warn(f"every group had zero reward variance for {ZERO_VAR_WARN} steps: nothing is being learned "
                     "(try --sft, a higher temperature, or a larger group)")
            if state["no_search"] == NO_SEARCH_WARN:
                warn(f"searches per episode collapsed to ~0 for {NO_SEARCH_WARN} steps: the policy stopped using tools")
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if on_step:
                on_step(rec)
            if state["step"] % g.checkpoint_every == 0 or state["step"] == g.steps:
                save_checkpoint(out / "grpo-checkpoint", net, opt, state, meta)
        dist.barrier()  # nobody starts the next step (or reads a checkpoint) before it is written
    return state


class _Rollouts:
    """One step's rollouts: this process's share of the step's questions, `group_size` episodes each through the
    `ask` loop (decoded side by side when batched), scored by the reward table. Perceptions and search results are
    cached across steps."""

    def __init__(self, engine: Engine, questions, index, rcfg: Config, g: GRPOConfig, tok, weights: Weights,
                 dist: Dist):
        self.engine, self.questions, self.index, self.rcfg, self.g = engine, questions, index, rcfg, g
        self.tok, self.weights, self.dist = tok, weights, dist
        self.perceptions: dict = {}
        self.cache: dict = {}

    def __call__(self, step: int) -> list:
        """[(question, [(trace, episode, reward parts, sampler log-probs or None), ...]), ...]"""
        g, engine = self.g, self.engine
        jobs = []
        for qi in self.dist.share(question_order(len(self.questions), step, g.questions_per_step, g.seed)):
            q = self.questions[qi]
            if q.id not in self.perceptions:
                self.perceptions[q.id] = perceive(q.images, self.index.image_encoder,
                                                  ocr=self.rcfg.encoders.ocr) if q.images else []
            jobs += [(qi, q, k) for k in range(g.group_size)]
        eps: list = []
        seeds = [g.seed * 100003 + step * 101 + qi * 11 + k for qi, _, k in jobs]
        if g.rollouts == "batched":  # each turn, the step's episodes still going are decoded in one batch
            traces = answer_many([q.problem for _, q, _ in jobs], engine.gen, self.index, self.rcfg,
                                 [self.perceptions[q.id] for _, q, _ in jobs], seeds, search_cache=self.cache,
                                 episode_out=eps)
        else:
            traces = []
            for (_, q, _), seed in zip(jobs, seeds):
                if engine.kind == "torch":  # the live model's cache must not carry numerics across rollouts
                    engine.gen.reset()
                traces.append(answer(q.problem, engine.gen, self.index, self.rcfg, self.perceptions[q.id], seed=seed,
                                     search_cache=self.cache, episode_out=eps))
        groups: list = []
        for j, (qi, q, k) in enumerate(jobs):
            if k == 0:
                groups.append((q, []))
            turns = sampler_turns(self.tok, eps[j]) if engine.records else None
            groups[-1][1].append((traces[j], eps[j], total_reward(traces[j], q, self.weights), turns))
        return groups


def _update(net, opt, params, groups: list, g: GRPOConfig, tok, dist: Dist) -> list[dict]:
    """One optimiser step on the groups whose rewards differ (the shared prompt of a group is run once), gradients
    summed across processes; returns every process's summary (rollouts, loss statistics, group counts)."""
    torch = require("torch", "train")
    n_train = g.questions_per_step * g.group_size  # every rollout of the step, over all processes
    net.train()
    opt.zero_grad(set_to_none=True)
    trained, zero_groups, stats, loss_sum = 0, 0, [], 0.0
    for q, ro in groups:
        adv = advantages([r["total"] for _, _, r, _ in ro], "grpo" if g.loss == "grpo" else "dr_grpo")
        if all(abs(a) < 1e-9 for a in adv):
            zero_groups += 1  # nothing to learn from a group whose rollouts all scored the same
            continue
        items = []
        for (tr, ep, _, turns), a in zip(ro, adv):
            if abs(a) < 1e-9:
                continue
            te = tokenize_episode(tok, ep.prompt, ep.segments)
            slp = sampler_positions(tok, ep.prompt, ep.segments, turns, len(te.input_ids)) if turns else None
            items.append((te, a, slp))
        for loss, st in group_backward(net, items, g, 1.0 / n_train):
            loss_sum += float(loss) / n_train
            stats.append(st)
            trained += 1
    parts = dist.gather({"flat": [{**episode_summary(tr, r), "split": q.split} for q, ro in groups for tr, _, r, _ in ro],
                         "stats": stats, "zero": zero_groups, "groups": len(groups), "trained": trained,
                         "loss": loss_sum})
    if sum(x["trained"] for x in parts):
        dist.sum_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return parts


def step_record(parts: list[dict], step: int, g: GRPOConfig, engine: str, seconds: tuple, world: int) -> dict:
    """The step's log line: rewards by part, accuracy (by split), searches, tokens, update statistics, timings."""
    flat = [f for x in parts for f in x["flat"]]
    stats = [st for x in parts for st in x["stats"]]
    t_ref, t_roll, t_loss = seconds

    def mean(key, rows, nd):
        return round(sum(r[key] for r in rows) / len(rows), nd) if rows else None

    rec = {"phase": "grpo", "step": step + 1, "of": g.steps, "loss": round(sum(x["loss"] for x in parts), 6),
           "reward": mean("total", flat, 4),
           **{f"reward_{k}": mean(k, flat, 4) for k in (part_names(flat[0]) if flat else ())},
           "accuracy": mean("correct", flat, 4),
           "accuracy_by_split": {sp: mean("correct", [f for f in flat if f["split"] == sp], 4)
                                 for sp in sorted({f["split"] for f in flat})},
           "searches": mean("searches", flat, 3),
           "turns": mean("turns", flat, 3), "completion_tokens": mean("generated", flat, 1),
           "entropy": mean("entropy", stats, 4), "kl": mean("kl", stats, 5),
           "importance": mean("importance", stats, 4), "importance_capped": mean("importance_capped", stats, 5),
           "zero_variance_groups": sum(x["zero"] for x in parts),
           "trained_rollouts": sum(x["trained"] for x in parts),
           "rollout_tokens": sum(f["generated"] + f["evaluated"] for f in flat),
           "episode_tokens": sum(f["episode"] for f in flat),
           "update_tokens": sum(st.get("forward_tokens", 0) for st in stats),
           "refresh_s": round(t_ref, 2), "rollout_s": round(t_roll, 2), "update_s": round(t_loss, 2),
           "seconds": round(t_ref + t_roll + t_loss, 2), "engine": engine}
    if world > 1:
        rec["processes"] = world
    return rec


def plot_curves(out: Path) -> Path | None:
    """reward, accuracy and searches per step (from the JSONL logs) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the [train] extra
        return None
    log = out / "grpo-log.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("reward", "accuracy", "searches")):
        ys = [r[key] for r in rows]
        ax.plot([r["step"] for r in rows], ys, lw=1, alpha=0.5)
        w = 5
        ax.plot([r["step"] for r in rows][w - 1:], [sum(ys[i - w + 1:i + 1]) / w for i in range(w - 1, len(ys))], lw=2)
        ax.set_title(key)
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    png = out / "curves.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
