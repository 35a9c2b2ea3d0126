"""Export formats as a table: name -> how to build its files, the bundle kind the reader loads them as
(mmhops_lite/bundle.py KINDS), and the parity gate per quantization. A new format is one build function and one
entry here; `mmhops-lite export --format NAME` and `api.export_policy` find it by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from mmhops_lite.errors import InputError

from .gguf import build_gguf, build_gguf_adapter
from .onnx import build_onnx


@dataclass
class Job:
    """What a build function gets: the base (registry name or path, its HF folder and GGUF if any), the adapter
    (or None), the quantization, a scratch folder for its files, and a progress callback."""

    base: str
    base_dir: Path
    base_gguf: Path | None
    adapter: str | None
    quant: str
    work: Path
    say: Callable[[str], None] = lambda msg: None
    _merged: Path | None = field(default=None, repr=False)

    def merged(self) -> Path:
        """The base with the adapter merged in, as a Hugging Face folder (written once per job)."""
        if self._merged is None:
            from mmhops_lite.convert import merged_hf

            self.say("merging the adapter into the base" if self.adapter else "writing the base as a Hugging Face folder")
            self._merged = merged_hf(self.base, self.adapter, self.work / "merged")
        return self._merged


@dataclass(frozen=True)
class Format:
    build: Callable[[Job], dict]  # Job -> {name in the bundle: file written under job.work}
    kind: str  # the bundle kind its files are read as
    gates: Mapping[str, float]  # quantization -> least greedy top-1 agreement with torch (0: reported only)
    default_quant: str
    help: str


FORMATS: dict[str, Format] = {
    "gguf": Format(build_gguf, "gguf", {"f16": 0.98, "q8_0": 0.95, "q4_k_m": 0.0}, "q8_0",
                   "merged policy for llama.cpp, quantized"),
    "gguf-adapter": Format(build_gguf_adapter, "gguf-adapter", {"f32": 0.98}, "f32",
                           "the LoRA alone, as a GGUF adapter over the base GGUF"),
    "onnx": Format(build_onnx, "onnx", {"fp32": 0.98, "int8": 0.95}, "int8",
                   "merged policy for onnxruntime (decoder with KV cache), 8-bit block weights by default"),
}


def choose(fmt: str, quant: str | None) -> tuple[Format, str]:
    """The format's entry and the quantization to use (its default when None), or InputError naming the choices."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format '{fmt}'", fix=f"use one of: {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    quant = quant or spec.default_quant
    if quant not in spec.gates:
        raise InputError(f"unknown {fmt} quantization '{quant}'", fix=f"use one of: {', '.join(spec.gates)}")
    return spec, quant
