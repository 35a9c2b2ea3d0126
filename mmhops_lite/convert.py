"""Every conversion between model formats, in one place: GGUF -> Hugging Face (dequantised, cached), a
tokenizer from a GGUF, HF -> GGUF and PEFT LoRA -> GGUF adapter (llama.cpp's converter scripts from the pinned
source package), the live LoRA -> GGUF adapter in-process, base + LoRA -> merged HF folder, and GGUF quantization.
Backends, training and export all convert through here."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import InputError, MmhopsError, ModelNotFound, require
from .paths import cache_dir, free_cores
from .registry import resolve
from .safeio import temp_name

QUANTS = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def _gguf_meta(path: Path) -> dict:
    """The tokenizer metadata of a GGUF that transformers' tokenizer conversion gets wrong or drops."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(str(path))
    out = {}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        f = r.fields.get(key)
        if f is None:
            continue
        val = f.parts[f.data[0]]
        out[key.rsplit(".", 1)[1]] = bytes(val).decode() if f.types[0] == GGUFValueType.STRING else val.tolist()[0]
    return out


def tokenizer_from_gguf(path: str | Path):
    """A transformers tokenizer read from a GGUF, with bos/eos/add_bos set from the GGUF's own metadata.

    transformers' GGUF conversion (4.57) gets some of these wrong (SmolLM2: eos becomes <|im_start|>, add_bos
    True where llama.cpp reads False), which would change both the tokens fed and where generation stops.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    meta = _gguf_meta(path)
    vocab = {i: t for t, i in tok.get_vocab().items()}
    if "bos_token_id" in meta and meta["bos_token_id"] in vocab:
        tok.bos_token = vocab[meta["bos_token_id"]]
    if "eos_token_id" in meta and meta["eos_token_id"] in vocab:
        tok.eos_token = vocab[meta["eos_token_id"]]
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in meta and hasattr(tok, flag):
            try:
                setattr(tok, flag, bool(meta[flag]))
            except (AttributeError, ValueError):  # pragma: no cover - tokenizer classes without the setter
                pass
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    """Save a tokenizer, dropping the bogus `tokenizer.model` a GGUF-loaded tokenizer writes (a copy of the GGUF)."""
    tok.save_pretrained(str(folder))
    bogus = folder / "tokenizer.model"
    if bogus.is_file() and (_is_bpe(tok) or bogus.read_bytes()[:4] == b"GGUF"):
        bogus.unlink()  # fast tokenizers load from tokenizer.json; a wrong tokenizer.model would only mislead
    _plain_byte_level(folder / "tokenizer.json")


def _plain_byte_level(path: Path) -> None:
    """Give a GGUF-derived byte-level BPE tokenizer.json the plain GPT-2 form.

    transformers (4.57) writes byte_fallback and a SentencePiece-style decoder chain for GPT-2-style GGUF
    vocabularies; llama.cpp's converter then takes it for a SentencePiece vocabulary and the converted GGUF aborts
    on its first tokenization. Byte-level pre-tokenisation makes byte fallback unreachable, so encodings do not
    change (checked in the tests), and a ByteLevel decoder decodes them exactly.
    """
    if not path.is_file():
        return
    d = json.loads(path.read_text(encoding="utf-8"))
    pre = json.dumps(d.get("pre_tokenizer") or {})
    model, dec = d.get("model") or {}, d.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and '"ByteLevel"' in pre \
            and '"ByteLevel"' in json.dumps(dec):
        model["byte_fallback"] = False
        d["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        path.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")


def _is_bpe(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "BPE"


def hf_from_gguf(gguf: str | Path) -> Path:
    """Dequantise a GGUF into a Hugging Face checkpoint once; later calls return the cached folder."""
    from .registry import sha256_file

    require("gguf", "all")
    gguf = Path(gguf)
    key = f"{gguf.stem}-{sha256_file(gguf)[:12]}"
    out = cache_dir("hf-from-gguf", key)
    if _converted(out):
        return out
    torch = require("torch", "all")
    from transformers import AutoModelForCausalLM

    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelNotFound(f"transformers cannot read {gguf}: {exc}", path=gguf,
                                fix="use --backend llamacpp for this GGUF, or pass the Hugging Face folder") from exc
        # A GGUF-loaded model carries a quantizer marker that save_pretrained refuses; the weights are plain now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer_from_gguf(gguf), tmp)
        (tmp / "mmhops-source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "key": key}))
        del model
        if not _converted(out):  # another process may have finished first: keep its copy
            shutil.rmtree(out, ignore_errors=True)  # cache_dir made it; os.replace needs it absent or empty
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "mmhops-source.json").is_file()


def hf_folder(path: Path) -> Path:
    """A Hugging Face folder for a folder or GGUF path (GGUFs are converted and cached)."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return hf_from_gguf(ggufs[0])
        raise ModelNotFound(f"{path} holds neither config.json nor a .gguf file", path=path,
                            fix="pass a Hugging Face model folder or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        return hf_from_gguf(path)
    if not path.exists():
        raise ModelNotFound(f"{path} does not exist", path=path, fix="check the path, or use a registry name")
    raise ModelNotFound(f"{path} is neither a Hugging Face folder nor a .gguf file", path=path,
                        fix="pass a folder with config.json, or a .gguf file")


def base_folder(model: str | Path) -> tuple[Path, Path | None]:
    """(Hugging Face folder of the base, the GGUF it came from if any) for a registry name or path."""
    path = resolve(model, "policy")
    gguf = path if path.suffix == ".gguf" else None
    return hf_folder(path), gguf


def run_converter(script: str, args: list[str], out: Path, what: str, fix: str) -> Path:
    """Run one of llama.cpp's converter scripts (from the pinned source package) into `out`, atomically."""
    import subprocess
    import sys

    from .paths import llama_cpp_source

    src = llama_cpp_source()
    tmp = temp_name(out)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(src / script), *args, "--outfile", str(tmp)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise MmhopsError(f"{what} failed: {r.stderr.strip()[-800:]}", fix=fix)
    os.replace(tmp, out)
    return out


def adapter_to_gguf(adapter: Path, base: Path, out: Path) -> Path:
    """Convert a PEFT LoRA folder to a GGUF adapter with llama.cpp's converter (from the pinned source package)."""
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
    tmp = temp_name(out)
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


def merged_hf(base: str | Path, adapter: str | Path | None, out: Path) -> Path:
    """Write base (+ adapter merged in) as a Hugging Face folder with its tokenizer and chat template."""
    transformers = require("transformers", "export")
    torch = require("torch", "export")
    from .backends.base import adapter_for

    folder, _ = base_folder(base)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter:
        peft = require("peft", "train")
        model = peft.PeftModel.from_pretrained(model, str(adapter_for("torch", adapter))).merge_and_unload()
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(tok, tmp)  # the converter must read a plain byte-level BPE tokenizer (see save_tokenizer)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def hf_to_gguf(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Convert a Hugging Face folder to GGUF with llama.cpp's converter from the pinned source package."""
    return run_converter("convert_hf_to_gguf.py", [str(hf_dir), "--outtype", outtype], out,
                         f"GGUF conversion of {hf_dir}",
                         "check the model folder (config.json, weights, tokenizer); rerun bash scripts/setup.sh")


def quantize_gguf(src: Path, out: Path, quant: str) -> Path:
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
    tmp = temp_name(out)
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
