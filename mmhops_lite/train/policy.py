"""The trainable policy: a Hugging Face base (GGUF bases dequantised once and cached) with a peft LoRA adapter,
and the adapter's conversion to a GGUF LoRA that llama.cpp loads over the base GGUF."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..convert import base_folder
from ..errors import ModelNotFound, require
from ..paths import free_cores
from ..safeio import temp_name
from .settings import LoraSpec


def load_for_training(model: str | Path, lora: LoraSpec, adapter: str | Path | None = None, threads: int = 0,
                      seed: int = 0):
    """(peft model, tokenizer, base folder, base gguf) with trainable LoRA weights only."""
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    peft = require("peft", "train")
    torch.set_num_threads(threads or free_cores())
    folder, gguf = base_folder(model)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are never learned: masks come from segments
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter:
        net = peft.PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    else:
        torch.manual_seed(seed)  # LoRA A is random: seeding makes a run reproducible from its settings
        net = peft.get_peft_model(base, lora.peft_config())
    return net, tok, folder, gguf


def save_adapter(net, out: Path, meta: dict) -> Path:
    """Save the adapter in PEFT format (safetensors + config) atomically, with what produced it."""
    out = Path(out)
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "mmhops-train.json").write_text(json.dumps(meta, indent=2, default=str))
    old = out.parent / f".{out.name}.old{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def check_adapter(path: Path) -> Path:
    """A PEFT adapter folder or a .gguf adapter file, or ModelNotFound."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if (path / "adapter_config.json").is_file():
        return path
    raise ModelNotFound(f"{path} is not a LoRA adapter (no adapter_config.json, not a .gguf)", path=path,
                        fix="pass the folder written by `mmhops-lite train`, or its adapter.gguf")
