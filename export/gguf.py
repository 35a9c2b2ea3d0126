"""GGUF export: base + LoRA -> merged Hugging Face checkpoint -> GGUF F16 -> quantized; or the adapter alone."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from mmhops_lite.errors import InputError, MmhopsError, require
from mmhops_lite.paths import free_cores

QUANTS = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def merge(base: str | Path, adapter: str | Path | None, out: Path) -> Path:
    """Write base (+ adapter merged in) as a Hugging Face folder with its tokenizer and chat template."""
    transformers = require("transformers", "export")
    torch = require("torch", "export")
    from mmhops_lite.backends.base import adapter_for
    from mmhops_lite.backends.torch_backend import save_tokenizer
    from mmhops_lite.train.policy import base_folder

    folder, _ = base_folder(base)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter:
        peft = require("peft", "train")
        model = peft.PeftModel.from_pretrained(model, str(adapter_for("torch", adapter))).merge_and_unload()
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(tok, tmp)  # the converter must read a plain byte-level BPE tokenizer (see save_tokenizer)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def convert(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Convert a Hugging Face folder to GGUF with llama.cpp's converter from the pinned source package."""
    from mmhops_lite.backends.llamacpp import run_converter

    return run_converter("convert_hf_to_gguf.py", [str(hf_dir), "--outtype", outtype], out,
                         f"GGUF conversion of {hf_dir}",
                         "check the model folder (config.json, weights, tokenizer); rerun bash scripts/setup.sh")


def quantize(src: Path, out: Path, quant: str) -> Path:
    """Quantize a GGUF in-process with llama.cpp (f16 is a copy)."""
    if quant not in QUANTS:
        raise InputError(f"unknown quantization '{quant}'", fix=f"use one of: {', '.join(QUANTS)}")
    if quant == "f16":
        shutil.copyfile(src, out)
        return out
    llama_cpp = require("llama_cpp", "all")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant])
    params.nthread = free_cores()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with _c_stderr_to_file() as log:  # llama.cpp prints a line per tensor to the C stderr
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:]) if rc != 0 else ""
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise MmhopsError(f"llama.cpp could not quantize {src} to {quant} (code {rc})\n{tail}", path=src,
                          fix="try --quant f16 or q8_0")
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _c_stderr_to_file():
    """Send file descriptor 2 (where C libraries write) to a temp file for the block; the file is removed after."""
    import sys
    import tempfile

    fd, name = tempfile.mkstemp(prefix="mmhops-llama-", suffix=".log")
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    # llama-cpp-python's log callback prints to sys.stderr, which need not be fd 2 (pytest, notebooks)
    py = open(name, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
    try:
        with contextlib.redirect_stderr(py):
            yield Path(name)
    finally:
        py.close()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        Path(name).unlink(missing_ok=True)


def gguf_metadata(path: Path) -> dict:
    """A few identifying fields of a GGUF (architecture, name, file type)."""
    llama_cpp = require("llama_cpp", "all")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    meta = dict(llm.metadata)
    return {k: meta.get(k) for k in ("general.architecture", "general.name", "general.file_type")} | {
        "chat_template": bool(meta.get("tokenizer.chat_template"))}


__all__ = ["merge", "convert", "quantize", "QUANTS", "gguf_metadata"]
