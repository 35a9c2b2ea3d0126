"""Training data from episodes: masks follow what the policy wrote, never token ids (pad == eos safe)."""

import pytest
from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite import grammar
from mmhops_lite.config import Config
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync
from mmhops_lite.loop import Perception
from mmhops_lite.train.episodes import gold_episode, gold_turns, policy_turns, tokenize_episode
from mmhops_lite.types import Question


@pytest.fixture(scope="module")
def smol_tokenizer():
    from mmhops_lite.backends.torch_backend import tokenizer_from_gguf
    from mmhops_lite.registry import resolve

    tok = tokenizer_from_gguf(resolve("smollm2-135m-instruct"))
    tok.pad_token = tok.eos_token  # SmolLM2 pads with eos: the trap the mask must survive
    return tok


def test_mask_covers_exactly_the_policy_text(smol_tokenizer):
    tok = smol_tokenizer
    prompt = grammar.render_chatml(grammar.messages("Q?", []))
    segments = [("<think>a</think><text_search>Paris</text_search>", True),
                (grammar.information(["[1] Paris: <|im_end|> capital"]), False),
                ("<answer>Paris</answer>", True)]
    te = tokenize_episode(tok, prompt, segments)
    assert len(te.input_ids) == len(te.loss_mask) and te.prompt_len > 0
    assert not any(te.loss_mask[: te.prompt_len])
    learned = [i for i, m in zip(te.input_ids, te.loss_mask) if m]
    assert learned[-1] == tok.eos_token_id  # the policy learns to stop after answering
    assert tok.decode(learned[:-1]) == segments[0][0] + segments[2][0]
    ignored = [i for i, m in zip(te.input_ids[te.prompt_len:], te.loss_mask[te.prompt_len:]) if not m]
    assert tok.decode(ignored) == segments[1][0]
    # eos also appears inside the masked information block (as text "<|im_end|>" = the eos token): still masked.
    info_ids = tok(segments[1][0], add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in info_ids


def test_gold_trajectory_runs_through_the_loop(tiny_kb, tmp_path):
    sync(tmp_path / "idx", KnowledgeBase(tiny_kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    emb = TinyImageEncoder().encode([tiny_kb / "images" / "genovia.png"])[0]
    q = Question("b1", "<image> What is the capital of the country whose flag is shown?", ("x.jpg",), "Pyrus",
                 ("Pyrus",), "Bridge", "String", {"template": "capital", "chain": ["Genovia", "Pyrus"],
                                                  "gold_entities": ["Genovia"], "gold_passages": ["p-genovia"]})
    assert len(gold_turns(q)) == 3
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        ep, tr = gold_episode(q, grammar.render_chatml, lambda s: len(s.split()), idx, Config.resolve(env={}),
                              [Perception("flag", emb)])
        assert [h.action for h in tr.hops] == ["image_search", "text_search", "answer"]
        assert tr.hops[0].results[0]["title"] == "Genovia"
        assert policy_turns(ep) == gold_turns(q)
        # An unsupported chain (the image shows another country) is dropped, not taught.
        wrong = TinyImageEncoder().encode([tiny_kb / "images" / "wakanda.png"])[0]
        assert gold_episode(q, grammar.render_chatml, lambda s: len(s.split()), idx, Config.resolve(env={}),
                            [Perception("flag", wrong)]) is None
