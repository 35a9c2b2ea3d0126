"""The trainable policy: a Hugging Face base (GGUF bases dequantised once and cached) with a peft LoRA adapter,
and the adapter's conversion to a GGUF LoRA that llama.cpp loads over the base GGUF."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ModelNotFound, require
from ..paths import free_cores
from ..registry import resolve


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (defaults suit 135M-0.5B policies on a CPU)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: str = "all-linear"  # or a comma list, e.g. "q_proj,v_proj"

    def peft_config(self):
        peft = require("peft", "train")
        targets = self.targets if self.targets == "all-linear" else [t.strip() for t in self.targets.split(",")]
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                               task_type="CAUSAL_LM", bias="none")


def base_folder(model: str | Path) -> tuple[Path, Path | None]:
    """(Hugging Face folder of the base, the GGUF it came from if any) for a registry name or path."""
    from ..backends.torch_backend import _model_folder

    path = resolve(model, "policy")
    gguf = path if path.suffix == ".gguf" else None
    return _model_folder(path), gguf


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
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "mmhops-train.json").write_text(json.dumps(meta, indent=2, default=str))
    old = out.parent / f".{out.name}.old{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def adapter_to_gguf(adapter: Path, base: Path, out: Path) -> Path:
    """Convert a PEFT LoRA folder to a GGUF adapter with llama.cpp's converter (from the pinned source package)."""
    from ..backends.llamacpp import run_converter

    return run_converter("convert_lora_to_gguf.py", [str(adapter), "--base", str(base), "--outtype", "f32"], out,
                         f"converting {adapter} to a GGUF adapter",
                         "check the adapter matches the base model; rerun bash scripts/setup.sh")


# Hugging Face projection -> llama.cpp tensor, for the architectures whose LoRA we write in-process.
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_LAYER_PROJ = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+\.\w+)$")
_LORA_KEY = re.compile(r"(.*)\.lora_([AB])\.(?:\w+\.)?weight$")


class GGUFLayout:
    """How a Llama/Qwen2 base's projections are named and laid out in its GGUF (read from the HF config)."""

    def __init__(self, base_dir: Path):
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
        self.arch = cfg.get("model_type")
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"in-process GGUF writing supports llama and qwen2 bases, not {self.arch}")
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_head

    def tensor(self, module: str) -> tuple[str, str]:
        """(GGUF weight name, projection) of a HF module path such as `...layers.3.self_attn.q_proj`."""
        m = _LAYER_PROJ.match(module)
        if not m or m.group(2) not in _GGUF_NAMES:
            raise ValueError(f"no GGUF name for LoRA module {module}: use adapter_to_gguf")
        return f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}.weight", m.group(2)

    def rows(self, w, proj: str):
        """`w` [out, ...] in llama.cpp's row order: for Llama, the q/k rows of each head become interleaved pairs
        of its two rotary halves, as the converter stored the base."""
        if self.arch != "llama" or proj not in ("self_attn.q_proj", "self_attn.k_proj"):
            return w
        heads = self.n_head if proj == "self_attn.q_proj" else self.n_kv
        return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def lora_to_gguf(net, base: Path, out: Path) -> Path:
    """Write the live LoRA weights of `net` as a GGUF adapter, in-process and in well under a second.

    The same tensors as llama.cpp's converter (checked against it in the tests) for Llama and Qwen2 bases:
    lora_a / lora_b per projection as float32, the B matrices of q/k in llama.cpp's row order. Other
    architectures (or DoRA, biases, embeddings) go through `adapter_to_gguf`. The rollout engine's `adapter`
    path refreshes its adapter this way at every GRPO step."""
    gguf = require("gguf", "all")
    torch = require("torch", "train")
    layout = GGUFLayout(base)
    tensors = {}
    for key, value in net.state_dict().items():
        if "lora_" not in key:
            continue
        m = _LORA_KEY.match(key)
        if not m:
            raise ValueError(f"unexpected LoRA tensor {key}: use adapter_to_gguf")
        module, ab = m.groups()
        name, proj = layout.tensor(module)
        w = value.detach().to(torch.float32).cpu().numpy()
        tensors[f"{name}.lora_{ab.lower()}"] = layout.rows(w, proj) if ab == "B" else w
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), layout.arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(net.peft_config["default"].lora_alpha))
    for name in sorted(tensors):
        writer.add_tensor(name, tensors[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
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


__all__ = ["LoraSpec", "load_for_training", "save_adapter", "adapter_to_gguf", "lora_to_gguf", "GGUFLayout", "base_folder",
           "check_adapter", "asdict"]
