"""Episodes as training data: gold trajectories through the real loop, and token ids with a loss mask that is
zero on everything the loop wrote (<information> blocks, corrective messages) and on the prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .. import grammar
from ..config import Config
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


def gold_turns(q: Question) -> list[str] | None:
    """The policy turns of the intended chain for a synthesised question, in our grammar (None if unknown)."""
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
    if t in ("continent", "pick-category", "larger-population") and len(chain) >= 2:
        turns = ["<think>Identify image 1.</think><image_search>1</image_search>",
                 f"<think>Image 1 is {chain[0]}. Identify image 2.</think><image_search>2</image_search>"]
        if t == "larger-population":
            turns += [f"<think>Find the population of {chain[0]}.</think><text_search>{chain[0]} population</text_search>",
                      f"<think>Now the population of {chain[1]}.</think><text_search>{chain[1]} population</text_search>"]
        turns.append(f"<think>Image 2 is {chain[1]}. Compare them.</think><answer>{ans}</answer>")
        return turns
    return None


def gold_episode(q: Question, tokenizer_render, count_tokens, index, cfg: Config, perceptions,
                 search_cache: dict | None = None) -> tuple[Episode, object] | None:
    """Run the gold turns through the loop; keep the episode only if what was retrieved supports the answer."""
    turns = gold_turns(q)
    if not turns:
        return None
    teacher = _Teacher(tokenizer_render, count_tokens, turns)
    eps: list[Episode] = []
    cfg_gold = Config(**{**cfg.__dict__, "loop": type(cfg.loop)(**{**cfg.loop.__dict__,
                                                                   "max_turns": len(turns)})})
    tr = answer(q.problem, teacher, index, cfg_gold, perceptions, search_cache=search_cache, episode_out=eps)
    if tr.answer != q.answer:
        return None
    info = normalize(" ".join(t for t, by_policy in eps[0].segments if not by_policy))
    # Supported = each image search's top entity is the gold one (the turns name it, so it must have been seen)
    # and, for Bridge, the answer itself was read somewhere.
    seen = [h.results[0]["title"] if h.results else None for h in tr.hops if h.action == "image_search"]
    if seen != list(q.extra.get("gold_entities", []))[: len(seen)] or not seen:
        return None
    if q.split == "Bridge" and q.problem_type != "Numerical" and normalize(q.answer) not in info:
        return None
    return eps[0], tr


def policy_turns(ep: Episode) -> list[str]:
    """The texts the policy wrote, in order."""
    return [t for t, by_policy in ep.segments if by_policy]


__all__ = ["TokenizedEpisode", "tokenize_episode", "gold_turns", "gold_episode", "policy_turns", "grammar"]
