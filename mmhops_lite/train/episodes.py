"""Episodes as training data: token ids with a loss mask that is zero on everything the loop wrote
(<information> blocks, corrective messages) and on the prompt. Gold trajectories themselves are data/gold.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


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
