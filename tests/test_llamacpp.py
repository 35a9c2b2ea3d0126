"""The llama.cpp backend on a tiny real GGUF made in the test."""
import json

import pytest
from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite import grammar
from mmhops_lite.backends.base import get_generator
from mmhops_lite.backends.llamacpp import LlamaCppGenerator
from mmhops_lite.config import Config
from mmhops_lite.errors import ConfigError, ModelNotFound
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync
from mmhops_lite.loop import answer


@pytest.fixture(scope="module")
def gen(tiny_gguf):
    return LlamaCppGenerator(tiny_gguf, n_ctx=2048, threads=1)


def test_chat_template_from_gguf(gen):
    prompt = gen.render(grammar.messages("Which city?", ["looks like: flag (0.5)"]))
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert '<image n="1">' in prompt
    # Special tokens parse as single tokens, not as text.
    assert gen.count_tokens("<|im_start|>") == 1


def test_kv_cache_reuse_and_determinism(gen):
    p1 = gen.render(grammar.messages("What is shown?", []))
    a = gen.generate(p1, grammar.STOP, max_tokens=8)
    assert a.evaluated_tokens == a.prompt_tokens and a.completion_tokens > 0
    p2 = p1 + a.text + grammar.information(["[1] Paris: capital of France."])
    b = gen.generate(p2, grammar.STOP, max_tokens=8)
    assert b.prompt_tokens > a.prompt_tokens
    assert b.evaluated_tokens < b.prompt_tokens - a.prompt_tokens + 5  # only the new tokens were run
    fresh = LlamaCppGenerator(gen_path(gen), n_ctx=2048, threads=1).generate(p2, grammar.STOP, max_tokens=8)
    assert fresh.text == b.text and fresh.evaluated_tokens == fresh.prompt_tokens


def gen_path(g):
    return g.llm.model_path


def test_loop_runs_and_ends_cleanly(gen, tiny_kb, tmp_path):
    sync(tmp_path / "idx", KnowledgeBase(tiny_kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        tr = answer("What is the capital of Sylvania?", gen, idx,
                    Config.resolve({"loop.max_new_tokens": 16}, env={}))
    # A random model rarely writes a valid action: the loop must still end within budget, well-formed.
    assert 1 <= len(tr.hops) <= 5
    assert tr.tokens["generated"] > 0 and tr.models["policy"] == "tiny.gguf"
    json.dumps(tr.to_dict())


def test_registry_and_errors(tiny_gguf, tmp_path):
    g = get_generator("llamacpp", str(tiny_gguf), n_ctx=512, threads=1)
    assert g.n_ctx == 512
    with pytest.raises(ConfigError, match="unknown backend"):
        get_generator("vllm", str(tiny_gguf))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:5000])
    with pytest.raises(ModelNotFound, match="broken.gguf"):
        LlamaCppGenerator(bad, n_ctx=512)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="--backend torch"):
        LlamaCppGenerator(folder)
