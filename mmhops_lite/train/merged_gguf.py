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

from ..backends.merged import write_merged
from ..convert import GGUFLayout
from ..errors import require


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

        deltas = lora_deltas(net, self.layout)
        if not self.offsets:
            self.offsets = write_merged(self.base_gguf, deltas, self.path, self.base)
            return self.path
        q8 = gguf.GGMLQuantizationType.Q8_0
        with open(self.path, "r+b") as f:
            for name, d in deltas.items():
                data = gguf.quants.quantize(self.base[name] + d, q8)
                f.seek(self.offsets[name])
                f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        return self.path
