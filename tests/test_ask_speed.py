"""The `ask` speed path: the merged-adapter GGUF cache and the system prompt's KV cache, each verified before use."""
import numpy as np
import pytest

from mmhops_lite import grammar

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MMHOPS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_adapter(base_gguf, out, rank=4, alpha=8.0, seed=0):
    """A llama.cpp LoRA adapter GGUF for the tiny model: lora_a/lora_b on two projections of block 0."""
    from gguf import GGUFReader, GGUFWriter

    shapes = {t.name: tuple(int(x) for x in t.data.shape) for t in GGUFReader(str(base_gguf)).tensors}
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(out), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    pairs = {}
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight"):
        n_out, n_in = shapes[name]
        a = (rng.standard_normal((rank, n_in)) * 0.3).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * 0.3).astype(np.float32)
        w.add_tensor(f"{name}.lora_a", a)
        w.add_tensor(f"{name}.lora_b", b)
        pairs[name] = (b @ a) * (alpha / rank)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out, pairs


def test_merged_policy_is_base_plus_delta_and_its_cache_is_verified(tiny_gguf, tmp_path, home):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from mmhops_lite.backends.merged import merged_policy

    adapter, deltas = make_adapter(tiny_gguf, tmp_path / "adapter.gguf")
    path = merged_policy(tiny_gguf, adapter)
    base = {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(str(tiny_gguf)).tensors}
    merged = {t.name: (t, dequantize(t.data, t.tensor_type)) for t in GGUFReader(str(path)).tensors}
    for name, d in deltas.items():
        t, m = merged[name]
        assert t.tensor_type.name == "Q8_0"
        want = base[name] + d
        assert np.abs(m - want).max() < 0.02 * np.abs(want).max()  # Q8_0 rounding only
    untouched = "blk.1.attn_q.weight"
    assert np.array_equal(merged[untouched][1], base[untouched])
    mtime = path.stat().st_mtime_ns
    assert merged_policy(tiny_gguf, adapter) == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # an altered cache file
    path.write_bytes(bytes(data))
    assert merged_policy(tiny_gguf, adapter) == path
    assert path.read_bytes() != bytes(data)  # rebuilt, never used as it was
    other, _ = make_adapter(tiny_gguf, tmp_path / "other.gguf", seed=1)
    assert merged_policy(tiny_gguf, other) != path  # another adapter is another cache entry


def test_the_merged_policy_answers_like_the_runtime_adapter(tiny_gguf, tmp_path, home):
    from mmhops_lite.backends.llamacpp import LlamaCppGenerator
    from mmhops_lite.backends.merged import merged_policy

    adapter, _ = make_adapter(tiny_gguf, tmp_path / "adapter.gguf")
    runtime = LlamaCppGenerator(tiny_gguf, n_ctx=1024, threads=1, lora_path=adapter)
    merged = LlamaCppGenerator(merged_policy(tiny_gguf, adapter), n_ctx=1024, threads=1)
    plain = LlamaCppGenerator(tiny_gguf, n_ctx=1024, threads=1)
    prompt = runtime.render(grammar.messages("Which city is shown?", ["looks like: tower (0.5)"]))

    def logits(gen):
        import llama_cpp

        gen.reset()
        gen.llm.eval(gen.tokenize(prompt))
        ptr = llama_cpp.llama_get_logits_ith(gen.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(gen.llm.n_vocab(),)).copy()

    lr, lm, lp = logits(runtime), logits(merged), logits(plain)
    # The merged file carries the adapter: far closer to the runtime adapter than the base alone is.
    assert np.abs(lm - lr).max() < 0.25 * np.abs(lp - lr).max()


def test_system_prompt_kv_cache_is_saved_loaded_and_verified(tiny_gguf, home):
    from mmhops_lite.backends.llamacpp import LlamaCppGenerator

    def fresh():
        return LlamaCppGenerator(tiny_gguf, n_ctx=2048, threads=1)

    gen = fresh()
    prefix = grammar.system_prefix(gen.render)
    prompt = gen.render(grammar.messages("What is shown?", ["looks like: flag (0.5)"]))
    cold = fresh().generate(prompt, grammar.STOP, max_tokens=8)
    assert gen.prime(prefix) == "saved"
    primed = fresh()
    assert primed.prime(prefix) == "loaded"
    got = primed.generate(prompt, grammar.STOP, max_tokens=8)
    assert got.text == cold.text  # the restored cache is the computed one
    assert got.evaluated_tokens < cold.evaluated_tokens - len(gen.tokenize(prefix)) + 2
    (kv,) = (home / "kv").glob("*.kv")
    data = bytearray(kv.read_bytes())
    data[-10] ^= 0xFF
    kv.write_bytes(bytes(data))
    assert fresh().prime(prefix) == "saved"  # an altered cache is recomputed, never loaded
    assert fresh().prime(prefix) == "loaded"
