"""llama-cpp-python backend (the default): a GGUF policy, optional GGUF LoRA adapter, KV cache kept across turns."""
from __future__ import annotations

import atexit
import time
import weakref
from pathlib import Path
from typing import Sequence

from ..errors import ModelNotFound, require
from ..grammar import render_template
from ..paths import free_cores
from .base import Generation, batch_slots, check_prompt, common_prefix


class LlamaCppGenerator:
    """Generator over llama.cpp. Successive prompts that extend the previous one only evaluate the new tokens."""

    def __init__(self, model_path: str | Path, n_ctx: int = 4096, threads: int = 0, lora_path: str | Path | None = None,
                 seed: int = 0, **_ignored):
        llama_cpp = require("llama_cpp", "all")
        path = Path(model_path)
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if not ggufs:
                raise ModelNotFound(f"{path} holds no .gguf file", path=path,
                                    fix="use --backend torch for a Hugging Face folder, or pass a .gguf file")
            path = ggufs[0]
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{path} is not a GGUF file", path=path,
                                fix="use --backend torch for Hugging Face models, or export one: mmhops-lite export --gguf")
        n = threads or free_cores()
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n, n_threads_batch=n,
                                       lora_path=str(lora_path) if lora_path else None, seed=seed, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelNotFound(f"llama.cpp cannot load {path}: {exc}", path=path,
                                fix="check the file is a complete GGUF (mmhops-lite models verify)") from exc
        self.id = path.name + (f"+{Path(lora_path).name}" if lora_path else "")
        self.path, self.lora_path = path, Path(lora_path) if lora_path else None
        # Training sets record_logprobs: each sampled Generation then carries the drawn tokens llama.cpp evaluated
        # and the sampler's log-probability of each (Generation.tokens / .logprobs).
        self.record_logprobs = False
        self.n_ctx = n_ctx
        self.threads = n
        self._multi = None  # the multi-sequence context of generate_many, made on first use
        # Free native memory at exit while llama_cpp is still importable (interpreter teardown may come too late).
        atexit.register(_close_if_alive, weakref.ref(self))
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template")
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._bos = self._piece(self.llm.token_bos())
        self._eos = self._piece(self.llm.token_eos())

    def _piece(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="ignore")

    def render(self, messages: Sequence[dict]) -> str:
        """The chat template of the GGUF, assistant turn opened."""
        return render_template(self.template, messages, self._bos, self._eos)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def prime(self, prefix: str) -> str:
        """Start from the KV cache of `prefix` (the system prompt every episode opens with): loaded from the disk
        cache when a verified copy exists, else evaluated once and saved there. A fresh process then skips
        evaluating those tokens. Returns "loaded", "saved" or "skipped" (a cache already in use, or a short prefix).

        The cache file is named by the model file's sha256, llama.cpp's version and the prefix tokens, and holds
        the sha256 of its payload: a file that does not verify is recomputed, never loaded."""
        import ctypes
        import hashlib

        import llama_cpp

        from ..paths import cache_dir
        from ..registry import sha256_file
        from ..safeio import atomic_write

        if self.llm.n_tokens:  # a cache already in use (every ask after a server's first): nothing to tokenize
            return "skipped"
        toks = self.tokenize(prefix)
        if len(toks) < 16 or len(toks) >= self.n_ctx // 2:
            return "skipped"
        lora = sha256_file(self.lora_path) if self.lora_path else ""
        ident = f"{sha256_file(self.path)}|{lora}|{llama_cpp.__version__}|{','.join(map(str, toks))}"
        path = cache_dir("kv") / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".kv")
        ctx = self.llm._ctx.ctx
        try:
            blob = path.read_bytes()
            head, payload = blob[:len(_KV_MAGIC) + 32], blob[len(_KV_MAGIC) + 32:]
            if head[:len(_KV_MAGIC)] == _KV_MAGIC and hashlib.sha256(payload).digest() == head[len(_KV_MAGIC):]:
                buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
                if llama_cpp.llama_state_seq_set_data(ctx, buf, len(payload), 0) == len(payload):
                    self.llm.input_ids[:len(toks)] = toks
                    self.llm.n_tokens = len(toks)
                    return "loaded"
                self.llm.reset()
        except OSError:
            pass
        self.llm.eval(toks)
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        got = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        payload = bytes(buf)[:got]
        try:
            atomic_write(path, _KV_MAGIC + hashlib.sha256(payload).digest() + payload)
        except Exception:  # noqa: BLE001 - a cache that cannot be written only costs speed next time
            pass
        return "saved"

    def generate(self, prompt: str, stop: Sequence[str], max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> Generation:
        """Continue the prompt; llama-cpp-python reuses the cached prefix, we count what it had to evaluate."""
        toks = self.tokenize(prompt)
        check_prompt(toks, self.n_ctx)
        # Same rule as llama-cpp-python's own prefix match: at least one token is always re-evaluated.
        cached = min(common_prefix(self.llm._input_ids.tolist(), toks), len(toks) - 1)
        t0 = time.perf_counter()
        steps: list = []
        processors = None
        if self.record_logprobs and temperature > 0:
            import numpy as np
            from llama_cpp import LogitsProcessorList

            def capture(_ids, scores):  # the raw logits of each step, before the sampler draws
                z = scores.astype(np.float32) / temperature
                z -= z.max()
                steps.append(z - np.log(np.exp(z).sum()))
                return scores

            processors = LogitsProcessorList([capture])
        # The full softmax at `temperature` (no top-k/top-p/min-p truncation): what the torch policy and the
        # GRPO loss assume, so rollouts are the policy's own samples.
        out = self.llm.create_completion(toks, max_tokens=min(max_tokens, self.n_ctx - len(toks) - 1),
                                         stop=list(stop), temperature=temperature, top_p=1.0, min_p=0.0,
                                         top_k=0 if temperature else 1, repeat_penalty=1.0, seed=seed, echo=False,
                                         logits_processor=processors)
        dt = time.perf_counter() - t0
        drawn, lps = (), ()
        if processors is not None:
            # Sampled tokens we know for sure: those evaluated after the prompt (the last draw is never evaluated).
            drawn = tuple(int(t) for t in self.llm._input_ids[len(toks):self.llm.n_tokens])
            lps = tuple(float(z[t]) for z, t in zip(steps, drawn))
        ch = out["choices"][0]
        return Generation(ch["text"], len(toks), len(toks) - cached, out["usage"]["completion_tokens"], dt,
                          ch.get("finish_reason") or "stop", drawn, lps)

    def generate_many(self, prompts: Sequence[str], stop: Sequence[str], max_tokens: int = 256,
                      temperature: float = 0.0, seeds: Sequence[int | None] | None = None,
                      slots: Sequence[int] | None = None) -> list[Generation]:
        """Continue several prompts at once, prompt i in KV sequence slots[i] (default i); one llama_decode per step
        advances every sequence still generating.

        Each slot keeps its sequence between calls, so a prompt that extends its slot's last one only runs the new
        tokens; a prompt that shares a longer prefix with another slot (the rollouts of one question share the
        system prompt, question and image text) copies that slot's cache instead of recomputing it. Sampling is
        the full softmax at `temperature` (greedy at 0), seeded per prompt, as in `generate`."""
        from .llamacpp_multi import MultiSequence

        seeds, slots = batch_slots(len(prompts), seeds, slots)
        toks = [self.tokenize(p) for p in prompts]
        for t in toks:
            check_prompt(t, self.n_ctx)
        need = max(slots) + 1
        if self._multi is None or self._multi.n_slots < need:
            self.close_many()
            self._multi = MultiSequence(self.llm, max(need, 8), self.n_ctx, self.threads)
        return self._multi.run(toks, slots, list(stop), max_tokens, temperature, seeds, self.record_logprobs)

    def close_many(self) -> None:
        """Free generate_many's context (it holds a KV cache for every slot)."""
        multi, self._multi = getattr(self, "_multi", None), None
        if multi is not None:
            multi.close()

    def close(self) -> None:
        """Free the contexts and the model now."""
        self.close_many()
        self.llm.close()

    def __del__(self):
        self.close_many()

    def reset(self) -> None:
        """Forget the KV cache (the next call evaluates its whole prompt)."""
        self.llm.reset()
        if self._multi is not None:
            self._multi.clear()


_KV_MAGIC = b"MMHOPS-KV1"


def _close_if_alive(ref) -> None:
    gen = ref()
    if gen is not None:
        gen.close()


