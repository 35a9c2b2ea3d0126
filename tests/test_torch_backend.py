"""The torch backend on tiny random models built locally: HF folders (Llama, Qwen2, Qwen2-VL), a GGUF, a LoRA."""
import json
import os

import pytest
import torch
from fakes import HashTextEncoder, TinyImageEncoder
from tiny_models import make_tiny_hf, save_gguf_tokenizer

from mmhops_lite import grammar
from mmhops_lite.backends.base import get_generator
from mmhops_lite.backends.llamacpp import LlamaCppGenerator
from mmhops_lite.backends.torch_backend import TorchGenerator
from mmhops_lite.config import Config
from mmhops_lite.errors import InputError, ModelNotFound
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync
from mmhops_lite.loop import answer
from mmhops_lite.registry import resolve

PERCEPTION = ["looks like: flag (0.90), banner (0.05)"]


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    """The packaged SmolLM2 tokenizer as Hugging Face files (read from its GGUF once per session)."""
    return save_gguf_tokenizer(tmp_path_factory.mktemp("tok") / "smollm2", resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, hf_tokenizer):
    root = tmp_path_factory.mktemp("hf")
    return {fam: make_tiny_hf(root / f"tiny-{fam}", hf_tokenizer, fam) for fam in ("llama", "qwen2", "qwen2_vl")}


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return TorchGenerator(tiny_dirs["llama"], n_ctx=2048, threads=1)


def _env(home):
    """Point MMHOPS_HOME at a temp dir for the duration of a block (the GGUF cache must not touch the user's)."""
    class Ctx:
        def __enter__(self):
            self.old = os.environ.get("MMHOPS_HOME")
            os.environ["MMHOPS_HOME"] = str(home)

        def __exit__(self, *a):
            if self.old is None:
                os.environ.pop("MMHOPS_HOME", None)
            else:
                os.environ["MMHOPS_HOME"] = self.old
    return Ctx()


@pytest.fixture(scope="module")
def gguf_home(tmp_path_factory):
    return tmp_path_factory.mktemp("mmhops-home")


@pytest.fixture(scope="module")
def torch_gguf(tiny_gguf, gguf_home):
    with _env(gguf_home):
        return TorchGenerator(tiny_gguf, n_ctx=2048, threads=1)


def _prompt(gen, q="Which country's flag is this?"):
    return gen.render(grammar.messages(q, PERCEPTION))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_vl"])
def test_kv_cache_reuse_matches_a_fresh_run(tiny_dirs, family):
    gen = TorchGenerator(tiny_dirs[family], n_ctx=2048, threads=1)
    assert gen.is_vlm == (family == "qwen2_vl")
    p1 = _prompt(gen)
    assert p1.endswith("<|im_start|>assistant\n") and '<image n="1">' in p1
    a = gen.generate(p1, grammar.STOP, max_tokens=8)
    assert a.evaluated_tokens == a.prompt_tokens and a.completion_tokens == 8 and a.finish == "length"
    p2 = p1 + a.text + grammar.information(["[1] Sylvania: a country whose capital is Sylport."])
    b = gen.generate(p2, grammar.STOP, max_tokens=8)
    new = b.prompt_tokens - a.prompt_tokens
    assert b.evaluated_tokens <= new + 2 and b.evaluated_tokens < b.prompt_tokens / 5  # only the new tokens ran
    fresh = TorchGenerator(tiny_dirs[family], n_ctx=2048, threads=1)
    c = fresh.generate(p2, grammar.STOP, max_tokens=8)
    assert c.evaluated_tokens == c.prompt_tokens and c.text == b.text
    # The same prompt again re-runs just its last token; a prompt that diverges early is cropped, not reused blindly.
    assert gen.generate(p2, grammar.STOP, max_tokens=8).evaluated_tokens == 1
    assert gen.generate(p1, grammar.STOP, max_tokens=8).text == a.text


def test_cached_logits_equal_uncached(llama, tiny_dirs):
    p1 = _prompt(llama)
    p2 = p1 + "<think>search the flag</think><image_search>1</image_search>" + grammar.information(["[1] x: y"])
    ids1, ids2 = llama.tokenize(p1), llama.tokenize(p2)
    with torch.inference_mode():
        llama.reset()
        llama._prefill(ids1)
        cached, ran = llama._prefill(ids2)
        fresh = TorchGenerator(tiny_dirs["llama"], n_ctx=2048, threads=1)
        uncached, ran_all = fresh._prefill(ids2)
    assert ran == len(ids2) - len(ids1) and ran_all == len(ids2)
    assert torch.allclose(cached, uncached, atol=1e-4, rtol=1e-4)


def test_stop_strings_cut_the_text(llama):
    p = _prompt(llama, "Where is Mudton?")
    llama.reset()
    full = llama.generate(p, (), max_tokens=10).text
    assert len(full) > 12
    stop = full[7:12]  # five characters that, in general, straddle a token boundary
    cut = llama.generate(p, ("</never>", stop), max_tokens=10)
    assert cut.finish == "stop" and cut.text == full[: full.find(stop)] and stop not in cut.text
    assert cut.completion_tokens < 10
    # No stop found: the whole budget is used.
    assert llama.generate(p, ("</never>",), max_tokens=10).finish == "length"


def test_eos_and_seeded_sampling(llama):
    p = _prompt(llama, "Name the river.")
    with torch.inference_mode():
        llama.reset()
        first = int(torch.argmax(llama._prefill(llama.tokenize(p))[0]))
    saved = llama.eos_ids
    try:
        llama.eos_ids = frozenset({first})  # the greedy first token now ends the turn
        g = llama.generate(p, (), max_tokens=10)
        assert g.finish == "eos" and g.text == "" and g.completion_tokens == 0
    finally:
        llama.eos_ids = saved
    s1 = llama.generate(p, (), max_tokens=12, temperature=1.0, seed=7)
    s2 = llama.generate(p, (), max_tokens=12, temperature=1.0, seed=7)
    s3 = llama.generate(p, (), max_tokens=12, temperature=1.0, seed=8)
    assert s1.text == s2.text and s3.text != s1.text


def test_context_window_and_token_count(tiny_dirs):
    gen = TorchGenerator(tiny_dirs["qwen2"], n_ctx=64, threads=1)
    assert gen.count_tokens("<|im_start|>") == 1
    with pytest.raises(InputError, match="context window"):
        gen.generate(_prompt(gen), grammar.STOP)
    g = gen.generate("Hello there", grammar.STOP, max_tokens=500)
    assert g.prompt_tokens + g.completion_tokens <= 63


def test_gguf_is_converted_once_and_cached(torch_gguf, tiny_gguf, gguf_home, monkeypatch):
    from mmhops_lite.registry import sha256_file

    cached = gguf_home / "hf-from-gguf" / f"tiny-{sha256_file(tiny_gguf)[:12]}"
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert not (cached / "tokenizer.model").exists()  # the bogus copy of the GGUF is not kept
    assert torch_gguf.id == "tiny.gguf" and torch_gguf.eos_ids == {2}
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    import transformers

    calls = []
    orig = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **kw):
        calls.append(kw.get("gguf_file"))
        return orig(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    with _env(gguf_home):
        again = TorchGenerator(tiny_gguf, n_ctx=2048, threads=1)
    assert calls == [None]  # loaded from the cached folder: no GGUF read
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
    p = _prompt(again)
    assert again.generate(p, (), max_tokens=3).text == torch_gguf.generate(p, (), max_tokens=3).text


def test_gguf_greedy_tokens_agree_with_llama_cpp(torch_gguf, tiny_gguf):
    # Same weights, two engines: ggml rounds activations to f16 in f16-weight matmuls, torch stays in f32 on the
    # dequantised weights, so a near-tie between a random model's top logits may flip. Hence 5 of 6, not 6 of 6.
    lcpp = LlamaCppGenerator(tiny_gguf, n_ctx=2048, threads=1)
    prompts = ["The capital of France is", "Once upon a time, there", "Gustave Eiffel was born in the city of",
               "<think>which country is this flag?</think><image_search>", "def fibonacci(n):\n    return",
               _prompt(torch_gguf, "Who designed this tower?")]
    assert all(torch_gguf.tokenize(p) == lcpp.tokenize(p) for p in prompts)
    assert torch_gguf.render(grammar.messages("Q?", PERCEPTION)) == lcpp.render(grammar.messages("Q?", PERCEPTION))
    agree = sum(torch_gguf.generate(p, (), max_tokens=1).text == lcpp.generate(p, (), max_tokens=1).text
                for p in prompts)
    assert agree >= 5, f"only {agree}/6 greedy next tokens agree"


def test_lora_adapter_is_merged(tiny_dirs, tmp_path, llama):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]))
    cfg = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)  # random A and B: the adapter visibly changes the output
    peft.get_peft_model(base, cfg).save_pretrained(str(tmp_path / "lora"))
    gen = TorchGenerator(tiny_dirs["llama"], threads=1, adapter=tmp_path / "lora")
    assert gen.id == "tiny-llama+lora"
    assert not any("lora" in n for n, _ in gen.model.named_parameters())  # merged, plain Linear layers
    ids = gen.tokenize(_prompt(gen))
    with torch.inference_mode():
        llama.reset()
        a, _ = gen._prefill(ids)
        b, _ = llama._prefill(ids)
    assert not torch.allclose(a, b, atol=1e-3)
    with pytest.raises(ModelNotFound, match="adapter_config.json"):
        TorchGenerator(tiny_dirs["llama"], adapter=tmp_path)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        TorchGenerator(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        TorchGenerator(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="w.bin"):
        TorchGenerator(tmp_path / "w.bin")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelNotFound, match="bad"):
        TorchGenerator(tmp_path / "bad")
    with pytest.raises(InputError, match="dtype"):
        TorchGenerator(tmp_path / "bad", dtype="int3")


def test_loop_runs_through_torch_backend(tiny_dirs, tiny_kb, tmp_path):
    gen = get_generator("torch", str(tiny_dirs["llama"]), n_ctx=2048, threads=1)
    assert isinstance(gen, TorchGenerator)
    sync(tmp_path / "idx", KnowledgeBase(tiny_kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        tr = answer("What is the capital of Sylvania?", gen, idx, Config.resolve({"loop.max_new_tokens": 16}, env={}))
    # A random model rarely writes a valid action: the loop must still end within budget, well-formed.
    assert 1 <= len(tr.hops) <= 5
    assert tr.tokens["generated"] > 0 and tr.models["policy"] == "tiny-llama"
    assert tr.tokens["evaluated"] <= tr.tokens["prompt"] + tr.tokens["generated"]  # the KV cache was reused
    json.dumps(tr.to_dict())


def test_saved_gguf_tokenizer_is_plain_byte_level_and_encodes_the_same(tmp_path):
    import json

    from transformers import AutoTokenizer

    from mmhops_lite.convert import save_tokenizer, tokenizer_from_gguf
    from mmhops_lite.registry import resolve

    tok = tokenizer_from_gguf(resolve("smollm2-135m-instruct"))
    save_tokenizer(tok, tmp_path / "t")
    d = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    assert d["model"]["byte_fallback"] is False and d["decoder"]["type"] == "ByteLevel"
    again = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    for s in ["Hello world!", " Île de France — café 東京 ✓", "<|im_start|>user\nQ?<|im_end|>", "<answer>x</answer>"]:
        ids = tok(s, add_special_tokens=False).input_ids
        assert again(s, add_special_tokens=False).input_ids == ids and again.decode(ids) == s
