"""A GGUF base with a GGUF LoRA adapter folded in, written once as one Q8_0 file and cached under MMHOPS_HOME.

llama.cpp runs a LoRA adapter as two extra small matmuls beside every projection, which costs ~40% of its prompt
speed on a 135M model. `ask` therefore runs the default policy (registry base + shipped adapter) as one merged
file: every matrix the adapter touches becomes dequantized base + alpha/rank * B @ A, quantized to Q8_0; every other
tensor and all metadata (tokenizer, chat template) are the base's own bytes. No torch or peft is needed: the
deltas come from the adapter GGUF, already in llama.cpp's row order.

The cache entry is named by the sha256 of the base and the adapter (a changed adapter or base gets a new file)
and carries the merged file's own sha256 in a sidecar: a cached file that does not match it is rebuilt, never
used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import require
from ..paths import cache_dir, sha256
from ..safeio import atomic_json, temp_name

MERGE_VERSION = 1


def adapter_deltas(adapter_gguf: Path) -> dict:
    """{base tensor name: alpha/rank * B @ A as float32 [out, in]} from a llama.cpp LoRA adapter GGUF."""
    gguf = require("gguf", "all")
    import numpy as np

    r = gguf.GGUFReader(str(adapter_gguf))
    alpha = float(r.fields["adapter.lora.alpha"].contents()) if "adapter.lora.alpha" in r.fields else None
    parts: dict = {}
    for t in r.tensors:
        base, _, ab = t.name.rpartition(".")
        if ab not in ("lora_a", "lora_b"):
            raise ValueError(f"{adapter_gguf}: unexpected tensor {t.name} in a LoRA adapter")
        parts.setdefault(base, {})[ab] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    out = {}
    for name, ab in parts.items():
        a, b = ab["lora_a"], ab["lora_b"]  # [rank, in], [out, rank]
        rank = a.shape[0]
        out[name] = (b @ a) * ((alpha if alpha else rank) / rank)
    return out


def write_merged(base_gguf: Path, deltas: dict, out: Path, base_mats: dict | None = None) -> dict:
    """Write base + deltas as a GGUF at `out` (merged matrices in Q8_0); returns their byte offsets in the file.

    `base_mats` may hold the dequantized base matrices already (the trainer keeps them across refreshes)."""
    gguf = require("gguf", "all")
    import numpy as np

    q8 = gguf.GGMLQuantizationType.Q8_0
    reader = gguf.GGUFReader(str(base_gguf))
    by_name = {t.name: t for t in reader.tensors}
    missing = sorted(set(deltas) - set(by_name))
    if missing:
        raise ValueError(f"{base_gguf} has no tensor {missing[0]} for the LoRA to merge into")
    if base_mats is not None and not base_mats:
        for name in deltas:
            t = by_name[name]
            base_mats[name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    arch = str(reader.fields["general.architecture"].contents())
    tmp = temp_name(Path(out))
    w = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        w.add_key_value(key, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name in deltas:
            base = base_mats[t.name] if base_mats else np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                                  dtype=np.float32)
            w.add_tensor(t.name, gguf.quants.quantize(base + deltas[t.name], q8), raw_dtype=q8)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, t.data)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    laid = gguf.GGUFReader(str(out))
    return {t.name: int(t.data_offset) for t in laid.tensors if t.name in deltas}


def _fingerprint(path: Path) -> str:
    from ..registry import sha256_file

    return sha256_file(Path(path))


def merged_policy(base_gguf: Path, adapter_gguf: Path, progress=None) -> Path:
    """The cached merged GGUF of base + adapter, built on first use (about a second) and verified on every use."""
    key = f"{_fingerprint(base_gguf)[:16]}-{_fingerprint(adapter_gguf)[:16]}-v{MERGE_VERSION}"
    folder = cache_dir("merged")
    path, meta = folder / f"{key}.gguf", folder / f"{key}.json"
    try:
        want = json.loads(meta.read_text(encoding="utf-8"))["sha256"]
        if path.is_file() and not path.is_symlink() and sha256(path) == want:
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if progress:
        progress(f"merging {Path(adapter_gguf).name} into {Path(base_gguf).name} (once; cached in {folder})")
    meta.unlink(missing_ok=True)
    write_merged(Path(base_gguf), adapter_deltas(Path(adapter_gguf)), path)
    atomic_json(meta, {"sha256": sha256(path), "base": str(base_gguf), "adapter": str(adapter_gguf),
                       "version": MERGE_VERSION})
    return path
