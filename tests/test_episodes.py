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


def _compare(answer, value):
    return Question("c1", "<image><image> Which of these two places is part of X?", ("a.jpg", "b.jpg"), answer,
                    (answer,), "Compare", "String", {"template": "continent", "chain": ["Genovia", "Wakanda", value],
                                                     "gold_entities": ["Genovia", "Wakanda"],
                                                     "gold_passages": ["p-genovia", "p-wakanda"]})


def test_compare_gold_reads_the_first_passage_before_it_picks(tiny_kb, tmp_path):
    sync(tmp_path / "idx", KnowledgeBase(tiny_kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    embs = TinyImageEncoder().encode([tiny_kb / "images" / "genovia.png", tiny_kb / "images" / "wakanda.png"])
    perc = [Perception("flag", e) for e in embs]
    cfg = Config.resolve(env={})
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        # Genovia's passage names Pyrus: the gold reads it and answers Genovia.
        ep, tr = gold_episode(_compare("Genovia", "Pyrus"), grammar.render_chatml, lambda s: len(s.split()), idx,
                              cfg, perc)
        assert [h.action for h in tr.hops] == ["image_search", "image_search", "text_search", "answer"]
        assert tr.hops[2].argument == "Genovia" and tr.hops[2].results[0]["title"] == "Genovia"
        assert "Yes, Genovia is part of Pyrus." in policy_turns(ep)[-1]
        # It does not name Birnin Zana: the gold concludes it is the other one.
        ep, tr = gold_episode(_compare("Wakanda", "Birnin Zana"), grammar.render_chatml, lambda s: len(s.split()),
                              idx, cfg, perc)
        assert tr.answer == "Wakanda" and "No, so it is Wakanda." in policy_turns(ep)[-1]
        # A label the passage contradicts (Genovia said to be part of Birnin Zana) is not taught.
        assert gold_episode(_compare("Genovia", "Birnin Zana"), grammar.render_chatml, lambda s: len(s.split()),
                            idx, cfg, perc) is None


def test_larger_population_gold_copies_both_numbers():
    q = Question("c2", "<image><image> Which of these two countries has the larger population?", ("a.jpg", "b.jpg"),
                 "Aland", ("Aland",), "Compare", "String",
                 {"template": "larger-population", "chain": ["Bland", "Aland"], "gold_passages": ["pb", "pa"]})
    texts = {"pb": "Bland has a population of 3.5 million.", "pa": "Aland has a population of about 14 million."}
    turns = gold_turns(q, texts.get)
    assert [t.split("</think>")[1][:13] for t in turns] == ["<image_search"] * 2 + ["<text_search>"] * 2 + ["<answer>Aland"]
    assert "Bland: 3.5 million, Aland: 14 million. Aland has more." in turns[-1]
    # Without the numbers there is nothing to compare: no gold trajectory.
    assert gold_turns(q) is None
    assert gold_turns(q, {"pb": "Bland is small.", "pa": texts["pa"]}.get) is None
