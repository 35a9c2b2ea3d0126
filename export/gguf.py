"""GGUF export formats: `gguf` (base + LoRA merged, converted to F16, then quantized) and `gguf-adapter` (the LoRA
alone, as a GGUF adapter over the base GGUF). The conversions themselves are mmhops_lite/convert.py's."""
from __future__ import annotations

from pathlib import Path

from mmhops_lite.convert import adapter_to_gguf, hf_to_gguf, quantize_gguf
from mmhops_lite.errors import InputError


def build_gguf(job) -> dict[str, Path]:
    """policy.gguf: the merged policy, quantized to job.quant."""
    merged = job.merged()
    job.say("converting to GGUF F16")
    hf_to_gguf(merged, job.work / "f16.gguf", "f16")
    job.say(f"quantizing to {job.quant}")
    quantize_gguf(job.work / "f16.gguf", job.work / "policy.gguf", job.quant)
    return {"policy.gguf": job.work / "policy.gguf"}


def build_gguf_adapter(job) -> dict[str, Path]:
    """adapter.gguf: the LoRA for llama.cpp to apply over the registry's base GGUF at load time."""
    from mmhops_lite.backends.base import adapter_for

    if job.adapter is None or job.base_gguf is None:
        raise InputError("an adapter-only bundle needs --adapter and a GGUF base",
                         fix="e.g. --model smollm2-135m-instruct --adapter runs/train --adapter-only")
    job.say("converting the LoRA to a GGUF adapter")
    return {"adapter.gguf": adapter_to_gguf(adapter_for("torch", job.adapter), job.base_dir,
                                            job.work / "adapter.gguf")}
