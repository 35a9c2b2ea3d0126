"""GGUF export on a tiny model built from a config: merged and adapter-only bundles, parity, tampering refused."""
import json

import pytest

from mmhops_lite.bundle import check_bundle
from mmhops_lite.errors import IndexCorrupt


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A tiny Llama base and a random (non-zero) LoRA adapter over it, in PEFT format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_tiny_hf, save_gguf_tokenizer
    from transformers import AutoModelForCausalLM

    from mmhops_lite.registry import resolve

    root = tmp_path_factory.mktemp("exp")
    tok = save_gguf_tokenizer(root / "tok", resolve("smollm2-135m-instruct"))
    base = make_tiny_hf(root / "base", tok, "llama")
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    net.save_pretrained(str(root / "adapter"))
    return base, root / "adapter"


def test_merged_gguf_bundle_passes_parity_and_is_verified(tiny_lora, tmp_path):
    from export.bundle import export_gguf, verify_bundle

    from mmhops_lite import api
    from mmhops_lite.config import Config

    base, adapter = tiny_lora
    man = export_gguf(str(base), str(adapter), tmp_path / "b", quant="f16", prompts=8)
    assert man["parity"]["greedy_top1_agreement"] >= 0.98 and "policy.gguf" in man["files"]
    assert set(man["runtimes"]) >= {"llama-cpp-python", "torch"}
    assert verify_bundle(tmp_path / "b")["ok"]
    # A bundle is a --model for ask/eval: the generator is llama.cpp over the bundle's GGUF.
    gen = api.generator(Config.resolve({"model.policy": str(tmp_path / "b"), "model.threads": 1}, env={}))
    assert gen.id == "policy.gguf"
    # Tampering is refused, naming the file.
    p = tmp_path / "b" / "policy.gguf"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match="policy.gguf"):
        check_bundle(tmp_path / "b")
    p.write_bytes(bytes(data[:1000]))
    with pytest.raises(IndexCorrupt, match="truncated or altered"):
        api.generator(Config.resolve({"model.policy": str(tmp_path / "b")}, env={}))


def test_parity_gate_refuses_a_mismatched_export(tiny_lora, tmp_path, monkeypatch):
    from export import bundle

    base, adapter = tiny_lora
    monkeypatch.setattr(bundle, "agreement", lambda a, b: 0.5)
    with pytest.raises(IndexCorrupt, match="below the gate"):
        bundle.export_gguf(str(base), str(adapter), tmp_path / "c", quant="q8_0", prompts=4)
    assert not (tmp_path / "c").exists()
    man = bundle.export_gguf(str(base), str(adapter), tmp_path / "c", quant="q8_0", prompts=4, force=True)
    assert man["parity"]["forced"] is True
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["quant"] == "q8_0"
