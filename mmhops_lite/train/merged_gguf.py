"""Rollout weights as one merged GGUF: base + LoRA folded into Q8_0 matrices, refreshed in place each GRPO step.

llama.cpp runs a GGUF LoRA adapter as two extra small matmuls beside every projection, which costs ~40% of its
prompt speed on a 135M model; the rollouts of a GRPO step spend most of their time reading prompts and
<information> blocks. So the trainer can instead write the current policy itself: every projection the LoRA
touches becomes dequantized base + scaling * B @ A, quantized to Q8_0; every other tensor and all metadata
(tokenizer, chat template) are the base GGUF's own bytes. The file is laid out once; later refreshes overwrite
only the merged matrices' bytes (the layout cannot change), in about a second.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import require
from .policy import GGUFLayout


def lora_deltas(net, layout: GGUFLayout) -> dict:
    """{GGUF tensor name: scaling * B @ A as float32 [out, in]} in llama.cpp's row order."""
    torch = require("torch", "train")
    out = {}
    for module, mod in net.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_A", {})):
            continue
        name, proj = layout.tensor(module)
        with torch.no_grad():
            a = mod.lora_A["default"].weight.float()
            b = mod.lora_B["default"].weight.float()
            out[name] = layout.rows((b @ a * float(mod.scaling["default"])).cpu().numpy(), proj)
    return out


class MergedGGUF:
    """The current policy as a standalone GGUF at `path` (rewritten by `write(net)`)."""

    def __init__(self, base_gguf: Path, base_dir: Path, path: Path):
        self.base_gguf, self.path = Path(base_gguf), Path(path)
        self.layout = GGUFLayout(base_dir)  # ValueError for architectures other than llama / qwen2
        self.base: dict = {}  # dequantized base matrices the LoRA touches (float32), read once
        self.offsets: dict = {}  # their byte offsets in the written file, once laid out

    def write(self, net) -> Path:
        """Fold the LoRA of `net` into the file (first call: lay the whole file out; later: matrices only)."""
        gguf = require("gguf", "all")
        import numpy as np

        deltas = lora_deltas(net, self.layout)
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
        w = gguf.GGUFWriter(str(tmp), self.layout.arch)
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
