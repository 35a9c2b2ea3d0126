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
