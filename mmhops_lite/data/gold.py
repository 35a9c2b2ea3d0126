"""Gold trajectories: a question's plan (the template table) or discovered turns, run through the very loop `ask`
runs, and kept only when what was retrieved supports every value the reasoning states. Training reads them as SFT
data; export reads them as the parity gate's real prompts."""
from __future__ import annotations

from dataclasses import replace

from ..config import Config
from ..loop import Episode, answer
from ..scoring import normalize, numbers
from ..types import Question
from .templates import TEMPLATES, gold_turns_for


class Teacher:
    """A generator that writes the gold turns: it makes a gold trajectory go through the very loop `ask` runs."""

    def __init__(self, render, count_tokens, turns: list[str]):
        self.id, self.n_ctx = "teacher", 1 << 20
        self.render, self.count_tokens, self.turns = render, count_tokens, list(turns)

    def generate(self, prompt, stop, max_tokens=256, temperature=0.0, seed=None):
        from ..backends.base import Generation

        text = self.turns.pop(0) if self.turns else "<answer></answer>"
        for s in stop:  # behave like a real backend: the closing tag is cut, the loop re-appends it
            if text.endswith(s):
                text = text[: -len(s)]
        return Generation(text, 0, 0, 0, 0.0)


def gold_turns(q: Question, passage_text=None) -> list[str] | None:
    """The policy turns of a synthesised question's plan (the template table, data/templates.py), or None when
    the question has no template: `discover` then searches for a path instead."""
    slots, name = q.extra.get("slots"), q.extra.get("template")
    if not isinstance(slots, dict) or name not in TEMPLATES:
        return None
    return gold_turns_for(name, {**slots, "ans": q.answer}, q.id)


def _read(value: str, text: str) -> bool:
    """Whether a value the reasoning states was in what the episode read (numbers within 1%)."""
    if normalize(value) and normalize(value) in text:
        return True
    want = numbers(value)
    return bool(want) and any(abs(x - want[0]) <= 0.01 * abs(want[0]) for x in numbers(text))


def supported(q: Question, tr, blocks: list[str]) -> bool:
    """A gold episode is kept only if each image search found its gold entity and every value its reasoning
    states (bridge entity, both compared values, the answer of a Bridge question) was read before it is used."""
    seen = [h.results[0]["title"] if h.results else None for h in tr.hops if h.action == "image_search"]
    if not seen or seen != list(q.extra.get("gold_entities", []))[: len(seen)]:
        return False
    info = normalize(" ".join(blocks))
    slots = q.extra.get("slots") or {}
    needed = [str(slots[k]) for k in ("M", "va", "vb") if slots.get(k)]
    if q.split == "Bridge":
        needed.append(q.answer)
    if q.extra.get("template") == "pick":
        needed = [str(slots.get("va", ""))]
    return all(_read(v, info) for v in needed if v)


def gold_episode(q: Question, tokenizer_render, count_tokens, index, cfg: Config, perceptions,
                 search_cache: dict | None = None, turns: list[str] | None = None) -> tuple[Episode, object] | None:
    """Run gold turns (the template plan, or `turns` found by discovery) through the loop; keep the episode
    only if what was retrieved supports every value its reasoning states."""
    turns = turns or gold_turns(q)
    if not turns:
        return None
    teacher = Teacher(tokenizer_render, count_tokens, turns)
    eps: list[Episode] = []
    cfg_gold = replace(cfg, loop=replace(cfg.loop, max_turns=len(turns)))
    tr = answer(q.problem, teacher, index, cfg_gold, perceptions, search_cache=search_cache, episode_out=eps)
    if tr.answer != q.answer:
        return None
    blocks = [t for t, by_policy in eps[0].segments if not by_policy]  # what the loop wrote, turn by turn
    if q.extra.get("slots") and not supported(q, tr, blocks):
        return None
    return eps[0], tr


def policy_turns(ep: Episode) -> list[str]:
    """The texts the policy wrote, in order."""
    return [t for t, by_policy in ep.segments if by_policy]
