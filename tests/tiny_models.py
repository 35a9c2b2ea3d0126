"""Tiny real models built locally for tests: a random Llama GGUF that borrows the packaged SmolLM2 tokenizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, ctx=2048)


def _field(reader, name):
    f = reader.fields[name]
    from gguf import GGUFValueType

    if f.types and f.types[0] == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def make_tiny_gguf(out: Path, base_gguf: Path, seed: int = 0) -> Path:
    """Write a 2-layer, 64-wide random Llama GGUF with the base GGUF's tokenizer and chat template."""
    from gguf import GGUFReader, GGUFWriter

    r = GGUFReader(str(base_gguf))
    tokens = _field(r, "tokenizer.ggml.tokens")
    w = GGUFWriter(str(out), "llama")
    h, f, L, nh, nkv = TINY["hidden"], TINY["ffn"], TINY["layers"], TINY["heads"], TINY["kv_heads"]
    w.add_name("tiny-random-llama")
    w.add_block_count(L)
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(h // nh)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(1)
    w.add_tokenizer_model(_field(r, "tokenizer.ggml.model"))
    if "tokenizer.ggml.pre" in r.fields:
        w.add_tokenizer_pre(_field(r, "tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(_field(r, "tokenizer.ggml.token_type"))
    w.add_token_merges(_field(r, "tokenizer.ggml.merges"))
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unknown", w.add_unk_token_id),
                     ("padding", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}_token_id" in r.fields:
            add(_field(r, f"tokenizer.ggml.{key}_token_id"))
    w.add_add_bos_token(False)
    w.add_chat_template(_field(r, "tokenizer.chat_template"))
    rng = np.random.default_rng(seed)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    w.add_tensor("token_embd.weight", t(len(tokens), h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(h, h))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(h // nh * nkv, h))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(h // nh * nkv, h))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(h, h))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(f, h))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(f, h))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(h, f))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def save_gguf_tokenizer(out: Path, base_gguf: Path) -> Path:
    """Save the base GGUF's tokenizer as Hugging Face files (bos/eos fixed, no bogus tokenizer.model)."""
    from mmhops_lite.convert import save_tokenizer, tokenizer_from_gguf

    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer_from_gguf(base_gguf), out)
    return out


def _text_kw(vocab: int) -> dict:
    h, f, L, nh, nkv = TINY["hidden"], TINY["ffn"], TINY["layers"], TINY["heads"], TINY["kv_heads"]
    return {"vocab_size": vocab, "hidden_size": h, "intermediate_size": f, "num_hidden_layers": L,
            "num_attention_heads": nh, "num_key_value_heads": nkv, "max_position_embeddings": TINY["ctx"],
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}


def make_tiny_hf(out: Path, tokenizer_dir: Path, family: str = "llama", seed: int = 0) -> Path:
    """A random 2-layer, 64-wide Hugging Face model folder (llama, qwen2 or qwen2_vl) with a saved tokenizer."""
    import shutil

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tok)
    torch.manual_seed(seed)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**_text_kw(vocab), rope_theta=10000.0))
    elif family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**_text_kw(vocab), rope_theta=10000.0, use_sliding_window=False))
    elif family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        head = TINY["hidden"] // TINY["heads"]
        text = dict(_text_kw(vocab), rope_theta=10000.0, model_type="qwen2_vl_text",
                    rope_scaling={"type": "mrope", "mrope_section": [head // 4, head // 8, head // 8]})
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": TINY["hidden"], "num_heads": 2, "mlp_ratio": 2,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        # Image/video tokens must exist in the vocabulary; any unused ids do for a text-only run.
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 4,
                            video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
        model = Qwen2VLForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown family {family}")
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits: widen it so greedy is decisive
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out
