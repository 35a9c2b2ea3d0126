"""Training data from episodes: masks follow what the policy wrote, never token ids (pad == eos safe)."""

from dataclasses import replace

import pytest
from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite import grammar
from mmhops_lite.config import Config
from mmhops_lite.data.gold import gold_episode, gold_turns, policy_turns
from mmhops_lite.data.questions import load_questions
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync
from mmhops_lite.loop import Perception
from mmhops_lite.train.episodes import tokenize_episode


@pytest.fixture(scope="module")
def smol_tokenizer():
    from mmhops_lite.convert import tokenizer_from_gguf
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


def _synth_index(kb, tmp_path):
    from mmhops_lite.data.synth import synthesize

    synthesize(kb, tmp_path / "q", dev_fraction=0.0, seed=3, max_per_template=None)
    sync(tmp_path / "idx", KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    return load_questions(tmp_path / "q" / "train.jsonl")


def _perceive(kb, q):
    """The KB image of each gold entity, as the perception of the question's images."""
    names = {e: kb / "images" / (e.lower().replace(" ", "-") + ".png") for e in q.extra["gold_entities"]}
    embs = TinyImageEncoder().encode([names[e] for e in q.extra["gold_entities"][: len(q.images)]])
    return [Perception("a monument", e) for e in embs]


def test_gold_trajectories_of_every_template_run_through_the_loop(prose_kb, tmp_path):
    qs = _synth_index(prose_kb, tmp_path)
    cfg = Config.resolve(env={})
    kept = {}
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        for q in qs:
            got = gold_episode(q, grammar.render_chatml, lambda s: len(s.split()), idx, cfg, _perceive(prose_kb, q))
            if got:
                ep, tr = got
                assert tr.answer == q.answer and policy_turns(ep) == gold_turns(q)
                kept.setdefault(q.extra["template"], (q, tr))
    assert set(kept) == {"fact", "number", "year", "bridge", "more", "same", "pick"}
    q, tr = kept["bridge"]  # 3 hops: image -> monument -> the country its passage names -> that country's fact
    assert [h.action for h in tr.hops] == ["image_search", "text_search", "text_search", "answer"]
    assert tr.hops[2].argument.startswith(q.extra["slots"]["M"])
    q, tr = kept["more"]  # both numbers were read before the pick
    assert [h.action for h in tr.hops] == ["image_search"] * 2 + ["text_search"] * 2 + ["answer"]


def test_unsupported_gold_is_dropped(prose_kb, tmp_path):
    qs = _synth_index(prose_kb, tmp_path)
    cfg = Config.resolve(env={})
    q = next(q for q in qs if q.extra["template"] == "bridge")
    other = next(m for m in ("Zorg Tower", "Blip Bridge", "Quill Dome") if m != q.extra["gold_entities"][0])
    wrong = TinyImageEncoder().encode([prose_kb / "images" / (other.lower().replace(" ", "-") + ".png")])[0]
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        # the image shows another monument: the turns name an entity the loop never saw
        assert gold_episode(q, grammar.render_chatml, lambda s: len(s.split()), idx, cfg,
                            [Perception("x", wrong)]) is None
        # a "pick" whose stated value the first passage contradicts is not taught
        pick = next(q for q in qs if q.extra["template"] == "pick")
        bad = replace(pick, extra={**pick.extra, "slots": {**pick.extra["slots"], "va": "Atlantis"}})
        assert gold_episode(bad, grammar.render_chatml, lambda s: len(s.split()), idx, cfg,
                            _perceive(prose_kb, pick)) is None


def test_plain_question_file_gets_discovered_trajectories(prose_kb, tmp_path, smol_tokenizer):
    """An MMhops-schema file without template or chain fields still yields SFT data (discovery through the real
    loop, from the questions' own perturbed images), and the report says why the others got none."""
    from mmhops_lite.train.sft import GoldReport, build_gold_set

    qs = _synth_index(prose_kb, tmp_path)
    plain = [replace(q, extra={}) for q in qs if q.split == "Bridge"]
    unanswerable = replace(plain[0], id="nowhere", answer="Atlantis", answer_eval=("Atlantis",),
                           problem_type="String")
    report = GoldReport()
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        data = build_gold_set(plain + [unanswerable], smol_tokenizer, idx,
                              Config.resolve({"encoders.ocr": False}, env={}), limit=500, seed=0, report=report)
    assert report.from_template == 0 and report.discovered == len(data)
    assert report.discovered >= 0.6 * len(plain), report.to_dict()
    assert report.missed["nowhere"] == "answer not in KB text"
    assert report.to_dict()["found"] + sum(report.to_dict()["failed"].values()) == report.tried == len(plain) + 1
    for ep in data:  # every trajectory teaches actions and masks what the loop wrote
        assert ep.policy_tokens > 0 and ep.prompt_len < len(ep.input_ids)
