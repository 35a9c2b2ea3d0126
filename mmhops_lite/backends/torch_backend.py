"""PyTorch/transformers backend: any Hugging Face causal LM or VLM folder, a GGUF (dequantised once), a PEFT LoRA.

Slower than llama.cpp on CPU (float32 decoding is ~5x slower; see bench/bench_loop.py) but it runs what llama.cpp
cannot: un-exported fine-tunes, PEFT adapters, VLM checkpoints. Like the llama.cpp backend it keeps one KV cache across calls, so a loop turn that
extends the previous prompt only runs the new tokens.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from ..convert import hf_folder
from ..errors import InputError, ModelNotFound, require
from ..grammar import render_chatml
from ..paths import free_cores
from .base import Generation, batch_slots, check_prompt, common_prefix

# Image-text-to-text families we load with AutoModelForImageTextToText and drive as text generators.
VLM_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "idefics2", "llava", "llava_next",
                       "paligemma", "mistral3", "qwen3_vl"})
_DTYPES = ("float32", "bfloat16", "float16")


class TorchGenerator:
    """Generator over transformers on CPU; successive prompts that extend the previous one reuse the KV cache."""

    def __init__(self, model_path: str | Path, n_ctx: int = 4096, threads: int = 0, adapter: str | Path | None = None,
                 dtype: str = "float32", **_ignored):
        torch = require("torch", "all")
        transformers = require("transformers", "all")
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        if dtype not in _DTYPES:
            raise InputError(f"unknown dtype '{dtype}'", fix=f"use one of: {', '.join(_DTYPES)}")
        self.torch = torch
        torch.set_num_threads(threads or free_cores())
        src = Path(os.path.expanduser(str(model_path)))
        folder = hf_folder(src)
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder))
        except (ValueError, OSError, KeyError) as exc:
            raise ModelNotFound(f"cannot read the model config in {folder}: {exc}", path=folder,
                                fix="check config.json; the model type may need a newer transformers") from exc
        mtype = config.model_type
        self.is_vlm = mtype in VLM_TYPES or (mtype in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                                             and mtype not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        auto = transformers.AutoModelForImageTextToText if self.is_vlm else transformers.AutoModelForCausalLM
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
            self.model = auto.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise ModelNotFound(f"transformers cannot load {folder} as a {'VLM' if self.is_vlm else 'causal LM'}: "
                                f"{exc}", path=folder, fix="pass a text-generation model folder (config.json, "
                                "weights and tokenizer files)") from exc
        self.template = self.tokenizer.chat_template
        if self.is_vlm and not self.template:
            try:  # VLM checkpoints often keep the chat template on the processor only
                self.template = transformers.AutoProcessor.from_pretrained(str(folder)).chat_template
            except (ValueError, OSError, KeyError, TypeError):
                self.template = None
        if adapter:
            self.model = self._apply_adapter(Path(adapter))
        self.model.eval()
        self._finish(src.name + (f"+{Path(adapter).name}" if adapter else ""), n_ctx)

    def _finish(self, model_id: str, n_ctx: int) -> None:
        """State derived from model and tokenizer, shared by __init__ and from_model."""
        import inspect

        self.id = model_id
        self.n_ctx = n_ctx
        self.add_bos = bool(getattr(self.tokenizer, "add_bos_token", False)) and self.tokenizer.bos_token_id is not None
        self.eos_ids = self._eos_ids()
        self._special = frozenset(self.tokenizer.all_special_ids) | frozenset(
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special)
        self._keep_arg = self.model is not None and "logits_to_keep" in inspect.signature(
            self.model.forward).parameters
        self._cache = None
        self._cached_ids: list[int] = []
        self._rows = None  # generate_many's batched cache

    @classmethod
    def from_model(cls, model, tokenizer, n_ctx: int = 4096, model_id: str = "live-policy") -> "TorchGenerator":
        """Wrap a model already in memory (e.g. the peft model being trained) without loading or merging."""
        self = cls.__new__(cls)
        self.torch = require("torch", "all")
        self.model, self.tokenizer, self.is_vlm = model, tokenizer, False
        self.template = tokenizer.chat_template
        self._finish(model_id, n_ctx)
        return self

    def _apply_adapter(self, adapter: Path):
        if not (adapter / "adapter_config.json").is_file():
            raise ModelNotFound(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)", path=adapter,
                                fix="pass the folder written by `mmhops-lite train` (a .gguf adapter needs "
                                    "--backend llamacpp)")
        peft = require("peft", "train")
        try:
            merged = peft.PeftModel.from_pretrained(self.model, str(adapter))
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelNotFound(f"the adapter {adapter} does not fit this base model: {exc}", path=adapter,
                                fix="pass the base model the adapter was trained on") from exc
        return merged.merge_and_unload()  # merged weights: inference runs at base-model speed

    def _eos_ids(self) -> frozenset:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
        return frozenset(int(i) for i in ids)

    def render(self, messages: Sequence[dict]) -> str:
        """The model's chat template (ChatML when it has none), assistant turn opened."""
        if not self.template:
            return render_chatml(messages)
        plain = list(messages)
        parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
                 for m in plain]
        # VLM templates usually iterate over content parts and some silently drop plain strings: try parts first
        # there, and accept a rendering only if every message's text made it through.
        for msgs in ((parts, plain) if self.is_vlm else (plain, parts)):
            try:
                out = self.tokenizer.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                                         add_generation_prompt=True)
            except Exception:  # noqa: BLE001, S112 - jinja raises anything from TypeError to TemplateError
                continue
            if all(m["content"] in out for m in plain if isinstance(m["content"], str)):
                return out
        return render_chatml(messages)

    def tokenize(self, text: str) -> list[int]:
        """Prompt tokens: special tokens in the text are parsed; BOS only where the tokenizer asks and it is absent."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.add_bos and (not ids or ids[0] != self.tokenizer.bos_token_id):
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _forward(self, ids: list[int], start: int):
        """Run `ids` at positions start.. through the model, extending the cache; the last position's logits."""
        torch = self.torch
        kw = {"logits_to_keep": 1} if self._keep_arg else {}
        dev = self.model.device  # a GPU model decodes on its GPU; sampling stays on the CPU (seeded generators)
        out = self.model(input_ids=torch.tensor([ids], device=dev), past_key_values=self._cache, use_cache=True,
                         cache_position=torch.arange(start, start + len(ids), device=dev), **kw)
        self._cache = out.past_key_values
        self._cached_ids.extend(ids)
        return out.logits[0, -1].float().cpu()

    def _prefill(self, ids: list[int]):
        """Reuse the cached prefix of `ids` (always re-running at least the last token); return logits, count run."""
        from transformers import DynamicCache

        keep = min(common_prefix(self._cached_ids, ids), len(ids) - 1)
        if self._cache is not None and keep > 0:
            try:
                self._cache.crop(keep)
                self._cached_ids = self._cached_ids[:keep]
            except (ValueError, NotImplementedError, AttributeError):  # e.g. sliding-window layers: start over
                keep = 0
        if self._cache is None or keep == 0:
            keep, self._cache, self._cached_ids = 0, DynamicCache(), []
        try:
            return self._forward(ids[keep:], keep), len(ids) - keep
        except BaseException:
            self._cache, self._cached_ids = None, []  # a half-updated cache must never be reused
            raise

    def generate(self, prompt: str, stop: Sequence[str], max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> Generation:
        """Continue the prompt token by token until a stop string (cut from the text), EOS or max_tokens."""
        ids = self.tokenize(prompt)
        check_prompt(ids, self.n_ctx)
        budget = min(max_tokens, self.n_ctx - len(ids) - 1)
        rng = self._rng(seed) if temperature > 0 else None
        t0 = time.perf_counter()
        out: list[int] = []
        text, finish = "", "length"
        special = self._special
        anchor = next((t for t in reversed(ids) if t not in special), None)
        with self._no_grad():
            logits, evaluated = self._prefill(ids)
            while len(out) < budget:
                tok = self._pick(logits, temperature, rng)
                if tok in self.eos_ids:
                    finish = "eos"
                    break
                out.append(tok)
                text = self._detok(anchor, out)
                cut = [i for i in (text.find(s) for s in stop if s) if i >= 0]
                if cut:
                    text, finish = text[: min(cut)], "stop"
                    break
                if len(out) >= budget:
                    break
                try:
                    logits = self._forward([tok], len(self._cached_ids))
                except BaseException:
                    self._cache, self._cached_ids = None, []
                    raise
        return Generation(text, len(ids), evaluated, len(out), time.perf_counter() - t0, finish)

    def generate_many(self, prompts: Sequence[str], stop: Sequence[str], max_tokens: int = 256,
                      temperature: float = 0.0, seeds: Sequence[int | None] | None = None,
                      slots: Sequence[int] | None = None) -> list[Generation]:
        """Continue several prompts as one batch with a shared KV cache, prompt i in row slots[i] (default i).

        The first call reads the prompts' common prefix once and gives every row a copy. Rows keep their cache
        between calls, so a prompt that extends its row's last one only runs the new tokens; rows of unequal length
        are aligned with masked gaps (never with recomputation), and positions stay each row's own. Sampling is the
        full softmax at `temperature` (greedy at 0), seeded per prompt, as in `generate`."""
        seeds, slots = batch_slots(len(prompts), seeds, slots)
        ids = [self.tokenize(p) for p in prompts]
        for t in ids:
            check_prompt(t, self.n_ctx)
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if self.is_vlm or not hasattr(lm, "get_decoder") or lm.get_output_embeddings() is None:
            return [self.generate(p, stop, max_tokens, temperature, s) for p, s in zip(prompts, seeds)]
        from .torch_batch import BatchDecoder, shared_prefix

        fresh = self._rows is None or not self._rows.can_continue(slots, ids)
        if fresh and shared_prefix(ids) < 1:  # nothing in common to start the rows from: one by one
            return [self.generate(p, stop, max_tokens, temperature, s) for p, s in zip(prompts, seeds)]
        if fresh:
            self._rows = BatchDecoder(lm.get_decoder(), lm.get_output_embeddings(), self.torch)
        return self._rows.run(ids, slots, list(stop), max_tokens, temperature, seeds, self.n_ctx, self.eos_ids,
                              self._pick_logp, self._rng, self._detok, self._special)

    def _pick_logp(self, logits, temperature: float, rng) -> tuple[int, float]:
        """_pick, with the drawn token's log-probability at the temperature (0.0 when greedy)."""
        tok = self._pick(logits, temperature, rng)
        if rng is None:
            return tok, 0.0
        return tok, float(self.torch.log_softmax(logits / temperature, dim=-1)[tok])

    def _rng(self, seed: int | None):
        return self.torch.Generator().manual_seed(int(seed) if seed is not None else int(time.time_ns() % 2**63))

    def _pick(self, logits, temperature: float, rng) -> int:
        """The next token: argmax when greedy, else a sample at the temperature."""
        torch = self.torch
        if rng is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=rng))

    def _no_grad(self):
        return self.torch.inference_mode()

    def _detok(self, anchor: int | None, out: list[int]) -> str:
        """Text of the generated tokens as they continue the prompt.

        Decoding them alone can lose a leading space (SPM-style decoders, and transformers' GGUF tokenizers, strip
        it from the first token), so decode them after the last prompt token and keep only what they add. Special
        tokens are left out, as llama-cpp-python leaves them out of completions.
        """
        toks = [t for t in out if t not in self._special]
        dec = self.tokenizer.decode
        if anchor is not None:
            head = dec([anchor], clean_up_tokenization_spaces=False)
            full = dec([anchor] + toks, clean_up_tokenization_spaces=False)
            if full.startswith(head) and not head.endswith("\ufffd"):
                return full[len(head):]
        return dec(toks, clean_up_tokenization_spaces=False)

    def reset(self) -> None:
        """Forget the KV cache (the next call evaluates its whole prompt)."""
        self._cache, self._cached_ids, self._rows = None, [], None


