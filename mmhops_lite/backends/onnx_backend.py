"""onnxruntime backend: a decoder exported with its KV cache (`mmhops-lite export --onnx`), fp32 or 8-bit weights.

The model folder holds `model.onnx` beside the tokenizer and config files: either the fused graph of
onnxruntime-genai's builder (GroupQueryAttention with rotary inside: input_ids, attention_mask and
past_key_values.N.key/value in) or optimum's `text-generation-with-past` graph (the same plus position_ids); both
give logits and present.N.key/value. Like the other backends it keeps one KV cache across calls, so a loop turn that extends the previous prompt
only runs its new tokens. Tokenizer, chat template and text decoding are the torch backend's, so the three
backends read and write exactly the same text; no torch tensor is used at run time.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from ..errors import ModelNotFound, require
from ..paths import free_cores
from .base import common_prefix
from .torch_backend import TorchGenerator

ONNX_FILE = "model.onnx"
# Set in the model's metadata by the fused export: its GroupQueryAttention may read and write one KV buffer in place.
KV_LAYOUT_KEY, KV_SHARED = "mmhops.kv_layout", "gqa-shared-buffer"


def onnx_folder(path: str | Path) -> Path:
    """The folder holding model.onnx: the path itself, its `policy-onnx/` (a bundle), or a model.onnx's parent."""
    p = Path(path).expanduser()
    for cand in (p, p / "policy-onnx", p.parent if p.suffix == ".onnx" else None):
        if cand is not None and (cand / ONNX_FILE).is_file():
            return cand
    raise ModelNotFound(f"no {ONNX_FILE} in {p}", path=p,
                        fix="export one: mmhops-lite export --onnx -o DIR (then pass DIR)")


class OnnxGenerator(TorchGenerator):
    """Generator over onnxruntime (CPU). Greedy or sampled decoding with a numpy RNG, KV cache kept across turns."""

    def __init__(self, model_path: str | Path, n_ctx: int = 4096, threads: int = 0, **_ignored):
        ort = require("onnxruntime", "all")
        transformers = require("transformers", "all")
        self.np = require("numpy", "all")
        self._ort = ort
        folder = onnx_folder(model_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or free_cores()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelNotFound(f"cannot load the ONNX policy in {folder}: {exc}", path=folder / ONNX_FILE,
                                fix="export it again: mmhops-lite export --onnx") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_key)
        if "input_ids" not in inputs or not self._past_names:
            raise ModelNotFound(f"{folder / ONNX_FILE} is not a decoder exported with its KV cache", path=folder,
                                fix="export with mmhops-lite export --onnx (task text-generation-with-past)")
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        shape = inputs[self._past_names[0]].shape
        self._kv_shape = (1, int(shape[1]), 0, int(shape[3]))
        self._kv_dtype = self.np.float16 if "float16" in inputs[self._past_names[0]].type else self.np.float32
        self._has_pos = "position_ids" in inputs
        self._has_mask = "attention_mask" in inputs
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        self._shared = meta.get(KV_LAYOUT_KEY) == KV_SHARED and self._has_mask
        self._kv = None  # shared mode: one (1, kv_heads, n_ctx, head) buffer per past/present pair, allocated once
        self.model = None
        self.is_vlm = False
        self.template = self.tokenizer.chat_template
        self._config = _read_json(folder / "config.json")
        self._gen_config = _read_json(folder / "generation_config.json")
        self._finish(folder.parent.name if folder.name == "policy-onnx" else folder.name, n_ctx)
        self.id = f"{self.id}/onnx"

    def _eos_ids(self) -> frozenset:
        ids = set()
        for e in (self._gen_config.get("eos_token_id"), self._config.get("eos_token_id"), self.tokenizer.eos_token_id):
            ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
        return frozenset(int(i) for i in ids)

    def _forward(self, ids: list[int], start: int):
        """Run `ids` at positions start.., extending the cache; the last position's logits.

        The cache stays in onnxruntime's own buffers (OrtValues bound as the next call's inputs): only the
        logits are copied out, never the keys and values.
        """
        np, ort = self.np, self._ort
        n = len(ids)
        if self._shared:
            return self._forward_shared(ids, start)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        if self._has_mask:
            io.bind_cpu_input("attention_mask", np.ones((1, start + n), dtype=np.int64))
        if self._has_pos:
            io.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None, :])
        if self._cache is None:
            empty = ort.OrtValue.ortvalue_from_numpy(np.zeros(self._kv_shape, dtype=self._kv_dtype))
            past = [empty] * len(self._past_names)
        else:
            past = self._cache
        for name, value in zip(self._past_names, past):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits")
        for name in self._present_names:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        self._cache = list(outs[1:])
        self._cached_ids.extend(ids)
        return outs[0].numpy()[0, -1].astype(np.float32)

    def _forward_shared(self, ids: list[int], start: int):
        """`_forward` for the fused graph: GroupQueryAttention writes the new keys and values into the same
        preallocated buffer it reads the past from (bound as both input and output), so no step copies the cache,
        and cutting the cache back to a prefix costs nothing (later positions are overwritten)."""
        np, ort = self.np, self._ort
        if self._kv is None:
            shape = (1, self._kv_shape[1], self.n_ctx, self._kv_shape[3])
            self._kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self._kv_dtype))
                        for _ in self._past_names]
            # One binding for the whole session: the cache buffers never move, only the tokens and mask change.
            self._io = self.session.io_binding()
            # The head runs on the last position only, so the logits always fit one (1, 1, vocab) buffer, which
            # onnxruntime writes in place: nothing is fetched back per step.
            head = next(o for o in self.session.get_outputs() if o.name == "logits")
            if not (isinstance(head.shape[-1], int) and head.shape[1] == 1):
                raise ModelNotFound(f"the ONNX policy's logits have shape {head.shape}, not (batch, 1, vocab)",
                                    fix="export it again with mmhops-lite export --onnx")
            self._logits = np.zeros((1, 1, head.shape[-1]), dtype=np.float16 if "float16" in head.type else np.float32)
            self._io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
            for past, present, buf in zip(self._past_names, self._present_names, self._kv):
                self._io.bind_ortvalue_input(past, buf)
                self._io.bind_ortvalue_output(present, buf)
        io = self._io
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, start + len(ids)), dtype=np.int64))
        self.session.run_with_iobinding(io)
        self._cache = self._kv
        self._cached_ids.extend(ids)
        return self._logits[0, -1].astype(np.float32)

    def _prefill(self, ids: list[int]):
        """Reuse the cached prefix of `ids` (always re-running at least the last token); return logits, count run."""
        keep = min(common_prefix(self._cached_ids, ids), len(ids) - 1)
        if self._shared:
            keep = keep if self._cache is not None else 0
            self._cached_ids = self._cached_ids[:keep]
            try:
                return self._forward(ids[keep:], keep), len(ids) - keep
            except BaseException:
                self._cache, self._cached_ids = None, []
                raise
        if self._cache is not None and keep > 0:
            if keep < len(self._cached_ids):
                crop = self._ort.OrtValue.ortvalue_from_numpy
                self._cache = [crop(self.np.ascontiguousarray(kv.numpy()[:, :, :keep, :])) for kv in self._cache]
                self._cached_ids = self._cached_ids[:keep]
        else:
            keep, self._cache, self._cached_ids = 0, None, []
        try:
            return self._forward(ids[keep:], keep), len(ids) - keep
        except BaseException:
            self._cache, self._cached_ids = None, []  # a half-updated cache must never be reused
            raise

    def _rng(self, seed: int | None):
        return self.np.random.default_rng(int(seed) if seed is not None else time.time_ns())

    def _pick(self, logits, temperature: float, rng) -> int:
        np = self.np
        if rng is None:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(rng.choice(len(p), p=p))

    def _no_grad(self):
        return nullcontext()


def _layer_key(name: str) -> tuple:
    """past_key_values.10.value -> (10, 'value'): numeric layer order.

    >>> sorted(["past_key_values.10.key", "past_key_values.2.key"], key=_layer_key)
    ['past_key_values.2.key', 'past_key_values.10.key']
    """
    parts = name.split(".")
    return (int(parts[1]), parts[2]) if len(parts) == 3 and parts[1].isdigit() else (1 << 30, name)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


__all__ = ["OnnxGenerator", "onnx_folder", "ONNX_FILE"]
