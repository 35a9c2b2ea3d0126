"""Episodes as training data: gold trajectories through the real loop, and token ids with a loss mask that is
zero on everything the loop wrote (<information> blocks, corrective messages) and on the prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .. import grammar
from ..config import Config
from ..data.synth import population
from ..loop import Episode, answer
from ..scoring import normalize
from ..types import Question


@dataclass(frozen=True)
class TokenizedEpisode:
    """Token ids of prompt + transcript, and which of them the policy wrote (1) or not (0)."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int

    @property
    def policy_tokens(self) -> int:
        return sum(self.loss_mask)


def tokenize_episode(tokenizer, prompt: str, segments: Sequence[tuple[str, bool]]) -> TokenizedEpisode:
    """Tokenize segment by segment, so the mask follows segment boundaries exactly.

    The prompt's tokens and every segment the loop wrote get mask 0; policy segments get mask 1, and an
    end-of-sequence token after a final answer is learned too (so the policy learns to stop). Masks come from
    segment boundaries, never from token ids: with pad == eos (SmolLM2), an id-based mask would be wrong.
    """
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = enc(prompt)
    mask = [0] * len(ids)
    plen = len(ids)
    for text, by_policy in segments:
        t = enc(text)
        ids += t
        mask += [1 if by_policy else 0] * len(t)
    if segments and segments[-1][1] and "</answer>" in segments[-1][0] and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return TokenizedEpisode(ids, mask, plen)


class _Teacher:
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


def _millions(pop: float) -> str:
    """A population as the policy writes it when it compares two: millions, same unit on both sides.

    >>> _millions(14e6), _millions(3.5e6), _millions(1.41e9)
    ('14 million', '3.5 million', '1410 million')
    """
    return f"{pop / 1e6:.4g} million"


# What a Compare question asks of each entity, as the gold turns phrase it (template -> (question, yes)).
_ASK = {"continent": ("Is {e} part of {v}?", "Yes, {e} is part of {v}."),
        "pick-category": ("Is {e} one of the {v}?", "Yes, {e} is one of the {v}.")}


def gold_turns(q: Question, passage_text=None) -> list[str] | None:
    """The policy turns of the intended chain for a synthesised question, in our grammar (None if unknown).

    Every answer rests on something the episode read: a Compare question reads the first entity's passage and
    either finds the asked property there or concludes it is the other one; "larger population" copies both
    numbers into its reasoning before it picks. `passage_text(pid)` gives a passage's text (for the numbers)."""
    chain, t = list(q.extra.get("chain", [])), q.extra.get("template")
    ans = q.answer
    if t in ("capital", "population", "category") and chain:
        rel = {"capital": "capital", "population": "population", "category": "category"}[t]
        return ["<think>First identify what image 1 shows.</think><image_search>1</image_search>",
                f"<think>It is {chain[0]}. Now find its {rel}.</think><text_search>{chain[0]} {rel}</text_search>",
                f"<think>The passage gives the {rel}.</think><answer>{ans}</answer>"]
    if t == "parent-capital" and len(chain) >= 3:
        return ["<think>First identify what image 1 shows.</think><image_search>1</image_search>",
                f"<think>It is {chain[0]}. Which country is it part of?</think><text_search>{chain[0]}</text_search>",
                f"<think>{chain[0]} is part of {chain[1]}. Now find the capital of {chain[1]}.</think>"
                f"<text_search>{chain[1]} capital</text_search>",
                f"<think>The passage gives the capital.</think><answer>{ans}</answer>"]
    if t not in ("continent", "pick-category", "larger-population") or len(chain) < 2:
        return None
    a, b = chain[0], chain[1]
    turns = ["<think>Identify image 1.</think><image_search>1</image_search>",
             f"<think>Image 1 is {a}. Identify image 2.</think><image_search>2</image_search>"]
    if t == "larger-population":
        pids = list(q.extra.get("gold_passages", []))
        texts = [passage_text(pid) if passage_text else None for pid in pids[:2]]
        pops = [population(x) if x else None for x in texts]
        if len(pops) < 2 or None in pops:
            return None
        pa, pb = _millions(pops[0]), _millions(pops[1])
        return turns + [
            f"<think>Image 2 is {b}. Find the population of {a}.</think><text_search>{a} population</text_search>",
            f"<think>{a} has {pa} people. Now the population of {b}.</think><text_search>{b} population</text_search>",
            f"<think>{b} has {pb} people. {a}: {pa}, {b}: {pb}. {ans} has more.</think><answer>{ans}</answer>"]
    if len(chain) < 3 or ans not in (a, b):
        return None
    ask, yes = (x.format(e=a, v=chain[2]) for x in _ASK[t])
    turns.append(f"<think>Image 2 is {b}. {ask}</think><text_search>{a}</text_search>")
    turns.append(f"<think>{yes}</think><answer>{a}</answer>" if ans == a
                 else f"<think>No, so it is {b}.</think><answer>{b}</answer>")
    return turns


def gold_episode(q: Question, tokenizer_render, count_tokens, index, cfg: Config, perceptions,
                 search_cache: dict | None = None) -> tuple[Episode, object] | None:
    """Run the gold turns through the loop; keep the episode only if what was retrieved supports the answer."""
    store = getattr(index, "store", None)

    def passage_text(pid):
        p = store.passage(pid) if store is not None else None
        return p.text if p else None

    turns = gold_turns(q, passage_text)
    if not turns:
        return None
    teacher = _Teacher(tokenizer_render, count_tokens, turns)
    eps: list[Episode] = []
    cfg_gold = Config(**{**cfg.__dict__, "loop": type(cfg.loop)(**{**cfg.loop.__dict__,
                                                                   "max_turns": len(turns)})})
    tr = answer(q.problem, teacher, index, cfg_gold, perceptions, search_cache=search_cache, episode_out=eps)
    if tr.answer != q.answer:
        return None
    blocks = [t for t, by_policy in eps[0].segments if not by_policy]  # what the loop wrote, turn by turn
    info = normalize(" ".join(blocks))
    # Supported = each image search's top entity is the gold one (the turns name it, so it must have been seen)
    # and, for Bridge, the answer itself was read somewhere.
    seen = [h.results[0]["title"] if h.results else None for h in tr.hops if h.action == "image_search"]
    if seen != list(q.extra.get("gold_entities", []))[: len(seen)] or not seen:
        return None
    if q.split == "Bridge" and q.problem_type != "Numerical" and normalize(q.answer) not in info:
        return None
    template, chain = q.extra.get("template"), list(q.extra.get("chain", []))
    if template in _ASK:
        # The first entity's passage must come back first, and say the property exactly when the answer is it.
        text_hops = [h for h in tr.hops if h.action == "text_search"]
        if not text_hops or not text_hops[0].results or text_hops[0].results[0]["title"] != chain[0]:
            return None
        top = normalize(passage_text(text_hops[0].results[0]["id"]) or "")
        if (normalize(chain[2]) in top) != (q.answer == chain[0]):
            return None
    if template == "larger-population":
        # Both numbers the reasoning copies must have been read: each text search's block states its entity's.
        want = [population(passage_text(pid) or "") for pid in list(q.extra.get("gold_passages", []))[:2]]
        if [population(b) for b in blocks[2:4]] != want:
            return None
    return eps[0], tr


def policy_turns(ep: Episode) -> list[str]:
    """The texts the policy wrote, in order."""
    return [t for t, by_policy in ep.segments if by_policy]


__all__ = ["TokenizedEpisode", "tokenize_episode", "gold_turns", "gold_episode", "policy_turns", "grammar"]
