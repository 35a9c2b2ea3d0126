"""Batched decoding for the torch backend: several sequences (a GRPO group's rollouts) share one KV cache.

Rows are cache rows, columns are cache positions in the order they were written. Every row keeps its own token
positions; where rows received different numbers of tokens in one forward pass, the shorter ones are padded on the
left with masked columns ("gaps"), and a row that must forget tokens (its new prompt departs from what it cached)
masks their columns. Nothing is ever recomputed, and a gap is never the only thing a query can see: every row
starts from a shared, unmasked prefix, so softmax rows are never empty.
"""
from __future__ import annotations

import time

from .base import Generation, common_prefix, sample_lockstep

CHUNK = 256  # columns per forward pass while reading prompts (bounds the attention scores' memory)


def shared_prefix(ids: list[list[int]]) -> int:
    """Tokens all prompts start with, leaving each at least one token of its own to run.

    >>> shared_prefix([[1, 2, 3, 4], [1, 2, 5]])
    2
    >>> shared_prefix([[1, 2], [1, 2]])
    1
    """
    return min(min(common_prefix(ids[0], t), len(t) - 1) for t in ids)


class BatchDecoder:
    def __init__(self, decoder, head, torch):
        self.decoder, self.head, self.torch = decoder, head, torch
        self.dev = next(decoder.parameters()).device  # a GPU model decodes on its GPU
        self.slots: list[int] = []
        self.toks: list[list[int]] = []  # the tokens each row holds, in order
        self.cols: list[list[int]] = []  # the column of each of those tokens
        self.mask = None  # [rows, columns] 1 = a token of the row, 0 = a gap
        self.cache = None

    def can_continue(self, slots: list[int], ids: list[list[int]]) -> bool:
        """True when these prompts can continue the rows already cached (each keeps at least one token)."""
        if self.cache is None or not set(slots) <= set(self.slots):
            return False
        return all(common_prefix(self.toks[self.slots.index(s)], t) >= 1 for s, t in zip(slots, ids))

    # -- cache bookkeeping -------------------------------------------------------------------------------------

    def _start(self, ids: list[list[int]], slots: list[int]) -> int:
        """Read the prompts' common prefix once (batch of one) and give every row a copy; tokens read."""
        from transformers import DynamicCache

        torch = self.torch
        n = shared_prefix(ids)
        self.cache = DynamicCache()
        for c in range(0, n, CHUNK):
            self.decoder(input_ids=torch.tensor([ids[0][c:min(c + CHUNK, n)]], device=self.dev),
                         past_key_values=self.cache, use_cache=True,
                         cache_position=torch.arange(c, min(c + CHUNK, n), device=self.dev))
        self.cache.batch_repeat_interleave(len(ids))
        self.mask = torch.ones(len(ids), n, dtype=torch.long, device=self.dev)
        self.slots = list(slots)
        self.toks = [list(ids[0][:n]) for _ in ids]
        self.cols = [list(range(n)) for _ in ids]
        return n

    def _select(self, slots: list[int]) -> None:
        """Keep (and order) the rows of these slots; the others' episodes are over."""
        idx = [self.slots.index(s) for s in slots]
        if idx != list(range(len(self.slots))):
            self.cache.batch_select_indices(self.torch.tensor(idx, device=self.dev))
            self.mask = self.mask[idx]
            self.toks = [self.toks[i] for i in idx]
            self.cols = [self.cols[i] for i in idx]
            self.slots = list(slots)

    def _forget(self, row: int, keep: int) -> None:
        """Mask the row's tokens after its first `keep`."""
        gone = self.cols[row][keep:]
        if gone:
            self.mask[row, gone] = 0
            self.toks[row] = self.toks[row][:keep]
            self.cols[row] = self.cols[row][:keep]

    def _step(self, new: list[list[int]]):
        """Append each row's new tokens (right-aligned, gaps on the left); the logits after each row's last token."""
        torch = self.torch
        width = max(len(x) for x in new)
        base = [len(t) for t in self.toks]  # each row's next position
        h_last = None
        for c in range(0, width, CHUNK):
            w = min(CHUNK, width - c)
            inp = torch.zeros(len(new), w, dtype=torch.long)
            pos = torch.zeros(len(new), w, dtype=torch.long)
            valid = torch.zeros(len(new), w, dtype=torch.long)
            col0 = self.mask.shape[1]
            for r, toks in enumerate(new):
                lead = width - len(toks)  # this row's gap columns before its tokens
                for j in range(c, c + w):
                    k = j - lead
                    pos[r, j - c] = base[r] + max(k, 0)  # a gap takes its row's next position (it is never seen)
                    if k >= 0:
                        inp[r, j - c] = toks[k]
                        valid[r, j - c] = 1
                        self.toks[r].append(toks[k])
                        self.cols[r].append(col0 + j - c)
            inp, pos, valid = inp.to(self.dev), pos.to(self.dev), valid.to(self.dev)
            self.mask = torch.cat([self.mask, valid], dim=1)
            out = self.decoder(input_ids=inp, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                               use_cache=True, cache_position=torch.arange(col0, col0 + w, device=self.dev))
            h_last = out.last_hidden_state[:, -1]
        return self.head(h_last).float().cpu()

    def _advance(self, rows: list[int], last: list[int], n: int) -> list:
        """Run each listed row's last token (the other rows get a gap); those rows' next logits."""
        tok = dict(zip(rows, last))
        logits = self._step([[tok[r]] if r in tok else [] for r in range(n)])
        return [logits[r] for r in rows]

    # -- generation ----------------------------------------------------------------------------------------------

    def run(self, ids, slots, stop, max_tokens, temperature, seeds, n_ctx, eos_ids, pick, make_rng, detok,
            special) -> list[Generation]:
        torch = self.torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            read = [0] * len(ids)
            if self.cache is None or not self.can_continue(slots, ids):
                read[0] = self._start(ids, slots)
            else:
                self._select(slots)
            new = []
            for r, t in enumerate(ids):
                keep = min(common_prefix(self.toks[r], t), len(t) - 1)
                self._forget(r, keep)
                new.append(t[keep:])
                read[r] += len(t) - keep
            logits = self._step(new)
            rngs = [make_rng(s) if temperature > 0 else None for s in seeds]
            anchors = [next((x for x in reversed(t) if x not in special), None) for t in ids]
            out, lps, text, finish = sample_lockstep(
                list(logits), [min(max_tokens, n_ctx - len(t) - 1) for t in ids], stop,
                draw=lambda r, row: pick(row, temperature, rngs[r]), is_eos=lambda tok: tok in eos_ids,
                text_of=lambda r, out_r: detok(anchors[r], out_r),
                advance=lambda rows, last: self._advance(rows, last, len(ids)))
        dt = time.perf_counter() - t0
        rec = temperature > 0
        return [Generation(text[r], len(t), read[r], len(out[r]), dt, finish[r], tuple(out[r]) if rec else (),
                           tuple(lps[r]) if rec else ()) for r, t in enumerate(ids)]
