"""SFT warm start: teach the grammar and the chain on gold trajectories, loss on the policy's tokens only."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from ..config import Config
from ..data.gold import gold_episode, gold_turns
from ..errors import InputError, require
from ..loop import perceive
from ..types import Question
from .checkpoint import load_checkpoint, save_checkpoint, trim_log
from .distributed import Dist
from .episodes import TokenizedEpisode, tokenize_episode
from .grpo_loss import device_of, policy_logprobs, update_bf16
from .settings import SFTConfig


@dataclass
class GoldReport:
    """How the gold set was built: trajectories by source, and why the other questions got none."""

    tried: int = 0
    from_template: int = 0
    discovered: int = 0
    sampled: int = 0
    missed: dict = field(default_factory=dict)  # question id -> why no trajectory was found
    paths: dict = field(default_factory=dict)  # question id -> (gold entities, gold passages) of its trajectory

    def to_dict(self) -> dict:
        failed: dict = {}
        for why in self.missed.values():
            failed[why] = failed.get(why, 0) + 1
        return {"tried": self.tried, "from_template": self.from_template, "discovered": self.discovered,
                "sampled": self.sampled, "found": self.from_template + self.discovered + self.sampled,
                "failed": dict(sorted(failed.items(), key=lambda kv: -kv[1]))}


def _balanced(questions: Sequence[Question], seed: int) -> list[Question]:
    """Questions interleaved over templates and image domains (or splits, for files without templates) in a
    seeded order, so no one domain or question kind fills the set."""
    rng = random.Random(seed)
    by_t: dict[str, list[Question]] = {}
    for q in questions:
        key = f"{q.extra['template']}|{q.extra.get('domain', '')}" if q.extra.get("template") else q.split
        by_t.setdefault(key, []).append(q)
    for qs in by_t.values():
        rng.shuffle(qs)
    longest = max(map(len, by_t.values()))
    return [q for group in zip(*[qs + [None] * (longest - len(qs)) for qs in by_t.values()])
            for q in group if q is not None]


def build_gold_set(questions: Sequence[Question], tokenizer, index, cfg: Config, limit: int, seed: int,
                   progress: Callable[[int, int], None] | None = None,
                   report: GoldReport | None = None, discover_share: float = 0.0) -> list[TokenizedEpisode]:
    """Gold episodes of up to `limit` questions, balanced over templates, tokenized with loss masks. A question
    with a template follows its plan; one without (any MMhops-schema file) gets a path found by answer-guided
    discovery, and so does a seeded `discover_share` of the templated ones (two styles of reasoning, and the
    discovered one is what a user's own question file gets). Either is kept only when the loop's own retrieval
    supports it."""
    from .discover import discovered_episode

    report = report if report is not None else GoldReport()

    def render(msgs):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out: list[TokenizedEpisode] = []
    cache: dict = {}
    for q in _balanced(questions, seed):
        if len(out) >= limit:
            break
        report.tried += 1
        perc = perceive(q.images, index.image_encoder, ocr=cfg.encoders.ocr) if q.images else []
        templated = gold_turns(q) is not None
        got, source = None, "discovered"
        if not templated or _share(q.id, seed) < discover_share:  # search the loop's actions for a path
            failures: list = []
            got = discovered_episode(q, render, count, index, cfg, perc, cache, failures=failures)
            if got is None and not templated:
                report.missed[q.id] = failures[-1] if failures else "no path found"
        if got is None and templated:
            source, got = "template", gold_episode(q, render, count, index, cfg, perc, cache)
            if got is None:
                report.missed[q.id] = "template chain not supported by retrieval"
        if got is not None:
            ep, tr = got
            out.append(tokenize_episode(tokenizer, ep.prompt, ep.segments))
            if source == "template":
                report.from_template += 1
            else:
                report.discovered += 1
            report.paths[q.id] = _path(tr)
        if progress:
            progress(len(out), limit)
    if not out:
        raise InputError(f"no gold trajectory could be built from these questions: {report.to_dict()['failed']}",
                         fix="check that the index holds the KB the questions were written from; answers must be "
                             "stated in its passages")
    return out


def rejection_episodes(questions: Sequence[Question], report: GoldReport, tokenizer, index, cfg: Config,
                       model: str, base_gguf, scfg: SFTConfig) -> list[TokenizedEpisode]:
    """Rejection sampling: the starting policy (base GGUF with the configured adapter, the shipped one by default)
    answers the questions no trajectory was found for, `rejection_samples` times each; correct episodes become
    SFT data. Skipped (empty) when the base has no GGUF to sample with."""
    from ..backends.base import adapter_for
    from ..backends.llamacpp import LlamaCppGenerator
    from ..registry import choose_adapter
    from .discover import rejection_sample

    todo = [q for q in questions if q.id in report.missed][: scfg.rejection_questions]
    if not todo or base_gguf is None:
        return []
    adapter = choose_adapter(model, cfg.model.adapter)
    gen = LlamaCppGenerator(base_gguf, n_ctx=cfg.model.n_ctx, threads=cfg.model.threads,
                            lora_path=adapter_for("llamacpp", adapter) if adapter else None)
    perceptions: dict = {}

    def perceptions_of(q):
        if q.id not in perceptions:
            perceptions[q.id] = perceive(q.images, index.image_encoder, ocr=cfg.encoders.ocr) if q.images else []
        return perceptions[q.id]

    kept = rejection_sample(todo, gen, index, cfg, perceptions_of, samples=scfg.rejection_samples, seed=scfg.seed)
    out = []
    for q, ep in kept:
        out.append(tokenize_episode(tokenizer, ep.prompt, ep.segments))
        report.sampled += 1
        del report.missed[q.id]
        report.paths[q.id] = _path_of_hops(ep.hops)
    return out


def with_paths(questions: Sequence[Question], report_file: Path) -> list[Question]:
    """Questions that came without gold entities and passages get those of their trajectory (for the action
    reward): a plain MMhops file trains with the same reward parts as a synthesised one."""
    if not report_file.is_file():
        return list(questions)
    paths = json.loads(report_file.read_text(encoding="utf-8")).get("paths", {})
    out = []
    for q in questions:
        if q.id in paths and not q.extra.get("gold_entities") and not q.extra.get("gold_passages"):
            ents, pids = paths[q.id]
            q = replace(q, extra={**q.extra, "gold_entities": ents, "gold_passages": pids})
        out.append(q)
    return out


def _share(qid: str, seed: int) -> float:
    """A stable number in [0, 1) per question: which templated questions are taught by discovery."""
    import hashlib

    return int(hashlib.sha1(f"{seed}:{qid}".encode()).hexdigest()[:8], 16) / 16 ** 8


def _path(tr) -> tuple[list[str], list[str]]:
    """The entities an episode identified and the passages it read (the action reward's gold, for questions
    that came without it)."""
    return _path_of_hops(tr.hops)


def _path_of_hops(hops) -> tuple[list[str], list[str]]:
    ents = [h.results[0]["title"] for h in hops if h.action == "image_search" and h.results]
    pids = [h.results[0]["id"] for h in hops if h.action == "text_search" and h.results]
    return ents, pids


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
    bf16 = update_bf16(scfg.update_dtype, device_of(net))
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
