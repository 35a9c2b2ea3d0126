"""Several sequences decoded together in one llama.cpp context (the GRPO group's rollouts, side by side).

One context with a unified KV cache holds a sequence per slot. Prompt tokens are read in batches of up to n_batch
tokens mixed across sequences, then every sequence still generating advances by one token per llama_decode. A prefix
two sequences share is stored once: a slot whose prompt starts like another slot's cache gets those cells by
`llama_memory_seq_cp` (a bookkeeping operation in a unified cache), not by recomputing them.
"""
from __future__ import annotations

import ctypes
import time

import numpy as np

from ..errors import InputError
from .base import Generation, common_prefix, sample_lockstep

SHARE_MIN = 16  # a shared prefix shorter than this is recomputed rather than copied


class MultiSequence:
    def __init__(self, llm, n_slots: int, n_ctx: int, threads: int, n_batch: int = 512):
        import llama_cpp
        from llama_cpp import _internals

        self.lib, self.llm, self.n_slots, self.n_batch = llama_cpp, llm, n_slots, n_batch
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx * n_slots  # every slot may use the full window; a unified cache allocates them together
        p.n_batch = p.n_ubatch = n_batch
        p.n_seq_max = n_slots
        p.kv_unified = True
        p.n_threads = p.n_threads_batch = threads
        try:
            self.ctx = _internals.LlamaContext(model=llm._model, params=p, verbose=False)
        except ValueError as exc:
            raise InputError(f"llama.cpp cannot make a {n_slots}-sequence context of {p.n_ctx} tokens: {exc}",
                             fix="lower the group size or model.n_ctx") from exc
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self.n_vocab = llm.n_vocab()
        self.cached: list[list[int]] = [[] for _ in range(n_slots)]

    def close(self) -> None:
        """Free the batch and the context (before the model they belong to)."""
        batch, self.batch = getattr(self, "batch", None), None
        if batch is not None:
            self.lib.llama_batch_free(batch)
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            ctx.close()

    def __del__(self):
        self.close()

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.ctx.memory, True)
        self.cached = [[] for _ in range(self.n_slots)]

    # -- KV bookkeeping ------------------------------------------------------------------------------------------

    def _keep(self, slot: int, n: int) -> None:
        """Cut slot's sequence to its first n tokens."""
        if n < len(self.cached[slot]):
            self.lib.llama_memory_seq_rm(self.ctx.memory, slot, n, -1)
            self.cached[slot] = self.cached[slot][:n]

    def _adopt(self, slot: int, toks: list[int]) -> int:
        """Reuse the longest cached prefix of `toks` (own slot, or copied from another); tokens now cached."""
        limit = len(toks) - 1  # the last prompt token is always run: its logits start the generation
        own = min(common_prefix(self.cached[slot], toks), limit)
        best, src = own, slot
        for j, c in enumerate(self.cached):
            if j != slot:
                n = min(common_prefix(c, toks), limit)
                if n > best:
                    best, src = n, j
        if src != slot and best >= own + SHARE_MIN:
            self.lib.llama_memory_seq_rm(self.ctx.memory, slot, 0, -1)
            self.lib.llama_memory_seq_cp(self.ctx.memory, src, slot, 0, best)
            self.cached[slot] = list(toks[:best])
            return best
        self._keep(slot, own)
        return own

    def _decode(self, items: list[tuple[int, int, bool]]) -> dict:
        """Run (slot, token, wants_logits) items, appending each token to its slot; returns {item index: logits}."""
        out = {}
        for c in range(0, len(items), self.n_batch):
            chunk = items[c:c + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (slot, tok, logits) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = len(self.cached[slot])
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = slot
                b.logits[i] = logits
                self.cached[slot].append(tok)
            rc = self.lib.llama_decode(self.ctx.ctx, b)
            if rc != 0:
                self.clear()  # a failed decode leaves the cache in an unknown state
                raise InputError(f"llama.cpp could not decode a batch (code {rc}): the shared KV cache is full",
                                 fix="lower the group size, loop.max_turns or loop.info_tokens")
            for i, (_, _, logits) in enumerate(chunk):
                if logits:
                    ptr = self.lib.llama_get_logits_ith(self.ctx.ctx, i)
                    row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
                    out[c + i] = row.copy()
        return out

    def _prefill(self, toks: list[list[int]], slots: list[int]) -> tuple[list[int], list]:
        """Bring each slot to its prompt; returns tokens evaluated per prompt and the last-position logits."""
        evaluated = [0] * len(toks)
        # Prompts that share a long prefix nobody has cached yet (a new question's rollouts): one of them reads it
        # first, the others then copy it in _adopt.
        done: set = set()
        for i, t in enumerate(toks):
            if i in done:
                continue
            twins = [k for k in range(len(toks)) if k != i and k not in done]
            shared = max([min(common_prefix(t, toks[k]), len(t) - 1, len(toks[k]) - 1) for k in twins] or [0])
            have = max(min(common_prefix(c, t), len(t) - 1) for c in self.cached)
            if shared >= have + SHARE_MIN:
                n = self._adopt(slots[i], t[:shared + 1])
                self._decode([(slots[i], tok, False) for tok in t[n:shared]])
                evaluated[i] += shared - n
                done.update(k for k in twins if common_prefix(t, toks[k]) >= shared)
        items, where = [], []
        for i, t in enumerate(toks):
            n = self._adopt(slots[i], t)
            evaluated[i] += len(t) - n
            items += [(slots[i], tok, False) for tok in t[n:]]
            items[-1] = (slots[i], t[-1], True)
            where.append(len(items) - 1)
        logits = self._decode(items)
        return evaluated, [logits[w] for w in where]

    # -- generation ----------------------------------------------------------------------------------------------

    def run(self, toks: list[list[int]], slots: list[int], stop: list[str], max_tokens: int, temperature: float,
            seeds: list, record: bool) -> list[Generation]:
        t0 = time.perf_counter()
        n_ctx = self.ctx.n_ctx() // self.n_slots
        evaluated, logits = self._prefill(toks, slots)
        rngs = [np.random.default_rng(s) for s in seeds]
        out, lps, text, finish = sample_lockstep(
            logits, [min(max_tokens, n_ctx - len(t) - 1) for t in toks], stop,
            draw=lambda i, row: self._draw(row, temperature, rngs[i]),
            is_eos=lambda tok: self.lib.llama_vocab_is_eog(self.vocab, tok),
            text_of=lambda i, out_i: self.llm.detokenize(out_i, prev_tokens=toks[i]).decode("utf-8", errors="ignore"),
            advance=lambda rows, last: [v for _, v in sorted(self._decode([(slots[i], tok, True)
                                                                           for i, tok in zip(rows, last)]).items())])
        dt = time.perf_counter() - t0
        gens = []
        for i, t in enumerate(toks):
            rec = record and temperature > 0
            gens.append(Generation(text[i], len(t), evaluated[i], len(out[i]), dt, finish[i],
                                   tuple(out[i]) if rec else (), tuple(lps[i]) if rec else ()))
        return gens

    @staticmethod
    def _draw(row: np.ndarray, temperature: float, rng) -> tuple[int, float]:
        """A token from the full softmax at `temperature` (argmax at 0) and its log-probability."""
        if temperature <= 0:
            return int(row.argmax()), 0.0
        z = row.astype(np.float64) / temperature
        z -= z.max()
        logp = z - np.log(np.exp(z).sum())
        tok = int(np.searchsorted(np.cumsum(np.exp(logp)), rng.random() * np.exp(logp).sum()))
        tok = min(tok, len(row) - 1)
        return tok, float(logp[tok])
