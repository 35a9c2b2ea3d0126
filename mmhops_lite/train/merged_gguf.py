"""Rollout weights as one merged GGUF: base + LoRA folded into Q8_0 matrices, refreshed in place each GRPO step.

llama.cpp runs a GGUF LoRA adapter as two extra small matmuls beside every projection, which costs ~40% of its
prompt speed on a 135M model; the rollouts of a GRPO step spend most of their time reading prompts and
<information> blocks. So the trainer can instead write the current policy itself: every projection the LoRA
touches becomes dequantized base + scaling * B @ A, quantized to Q8_0; every other tensor and all metadata
(tokenizer, chat template) are the base GGUF's own bytes. The file is laid out once; later refreshes overwrite
only the merged matrices' bytes (the layout cannot change), in about a second.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import require
from .policy import _GGUF_NAMES

_MODULE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+\.\w+)$")


def lora_deltas(net, arch: str, n_head: int, n_kv: int) -> dict:
    """{GGUF tensor name: scaling * B @ A as float32 [out, in]} in llama.cpp's row order."""
    torch = require("torch", "train")
    out = {}
    for name, mod in net.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_A", {})):
            continue
        m = _MODULE.match(name)
        if not m or m.group(2) not in _GGUF_NAMES:
            raise ValueError(f"no GGUF name for LoRA module {name}")
        layer, proj = m.groups()
        with torch.no_grad():
            a = mod.lora_A["default"].weight.float()
            b = mod.lora_B["default"].weight.float()
            d = (b @ a * float(mod.scaling["default"])).numpy()
        if arch == "llama" and proj in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = n_head if proj == "self_attn.q_proj" else n_kv
            d = d.reshape(heads, 2, d.shape[0] // heads // 2, d.shape[1]).swapaxes(1, 2).reshape(d.shape)
        out[f"blk.{layer}.{_GGUF_NAMES[proj]}.weight"] = d
    return out


class MergedGGUF:
    """The current policy as a standalone GGUF at `path` (rewritten by `write(net)`)."""

    def __init__(self, base_gguf: Path, base_dir: Path, path: Path):
        self.base_gguf, self.path = Path(base_gguf), Path(path)
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
        self.arch = cfg.get("model_type")
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"merged rollout weights support llama and qwen2 bases, not {self.arch}")
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_head
        self.base: dict = {}  # dequantized base matrices the LoRA touches (float32), read once
        self.offsets: dict = {}  # their byte offsets in the written file, once laid out

    def write(self, net) -> Path:
        """Fold the LoRA of `net` into the file (first call: lay the whole file out; later: matrices only)."""
        gguf = require("gguf", "all")
        import numpy as np

        deltas = lora_deltas(net, self.arch, self.n_head, self.n_kv)
        q8 = gguf.GGMLQuantizationType.Q8_0
        if not self.base:
            reader = gguf.GGUFReader(str(self.base_gguf))
            by_name = {t.name: t for t in reader.tensors}
            missing = sorted(set(deltas) - set(by_name))
            if missing:
                raise ValueError(f"{self.base_gguf} has no tensor {missing[0]} for the LoRA to merge into")
            for name in deltas:
                t = by_name[name]
                self.base[name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            self._lay_out(reader, deltas)
            return self.path
        with open(self.path, "r+b") as f:
            for name, d in deltas.items():
                data = gguf.quants.quantize(self.base[name] + d, q8)
                f.seek(self.offsets[name])
                f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        return self.path

    def _lay_out(self, reader, deltas: dict) -> None:
        gguf = require("gguf", "all")
        q8 = gguf.GGMLQuantizationType.Q8_0
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        w = gguf.GGUFWriter(str(tmp), self.arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            types = field.types
            value = field.contents()
            if key == "general.file_type":
                value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
            w.add_key_value(key, value, types[0], types[1] if len(types) > 1 else None)
        for t in reader.tensors:
            if t.name in deltas:
                w.add_tensor(t.name, gguf.quants.quantize(self.base[t.name] + deltas[t.name], q8), raw_dtype=q8)
            elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor(t.name, t.data)
            else:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, self.path)
        laid = gguf.GGUFReader(str(self.path))
        self.offsets = {t.name: int(t.data_offset) for t in laid.tensors if t.name in deltas}
