"""Question synthesis from any KB: mined facts, the template table, wordings, splits and held-out domains."""
import json
from collections import Counter
from dataclasses import replace

from conftest import PROSE

from mmhops_lite.data import templates
from mmhops_lite.data.facts import TitleIndex, mine, type_word
from mmhops_lite.data.gold import gold_turns
from mmhops_lite.data.questions import load_questions
from mmhops_lite.data.synth import synthesize
from mmhops_lite.scoring import normalize, numbers


def _all(out):
    rows = []
    for side in ("train", "dev", "ood"):
        f = out / f"{side}.jsonl"
        if f.is_file() and f.read_text().strip():
            rows += load_questions(f)
    return rows


def test_facts_are_mined_from_text_alone():
    titles = TitleIndex(PROSE)
    facts = {f.relation: f for f in mine("Zorg Tower", PROSE["Zorg Tower"], titles)}
    assert facts["location"].value == "Freedonia" and facts["location"].kind == "entity"
    assert facts["year of completion"].value == "1889" and facts["year of completion"].verb == "completed"
    assert float(facts["height in metres"].value) == 312
    country = {f.relation: f for f in mine("Freedonia", PROSE["Freedonia"], titles)}
    assert country["capital"].value == "Fredville" and float(country["population"].value) == 2.5e6
    assert country["continent"].value == "Europa"
    assert type_word(PROSE["Zorg Tower"]) == "tower" and type_word(PROSE["Freedonia"]) == "country"


def test_synthesis_on_a_triple_free_kb(prose_kb, tmp_path):
    assert not (prose_kb / "triples.jsonl").exists()
    res = synthesize(prose_kb, tmp_path / "q", dev_fraction=0.0, seed=3, max_per_template=None)
    qs = _all(tmp_path / "q")
    assert res["counts"]["train"] == len(qs) > 20
    kinds = Counter(q.extra["template"] for q in qs)
    assert {"fact", "number", "year", "bridge", "more", "same", "pick"} <= set(kinds)
    assert {q.problem_type for q in qs} == {"String", "Numerical", "Time"}
    assert {q.split for q in qs} == {"Bridge", "Compare"}
    text = {t: normalize(x) for t, x in PROSE.items()}
    for q in qs:
        slots = q.extra["slots"]
        assert q.problem.startswith("<image>" * len(q.images) + " ")
        assert "{" not in q.problem and "}" not in q.problem
        if q.split == "Bridge":  # the answer is stated in the passage the chain reads last
            last = q.extra["chain"][1] if q.extra["template"] == "bridge" else q.extra["chain"][0]
            if q.problem_type == "Numerical":
                lo, hi = q.answer_eval
                assert any(lo <= n <= hi for n in numbers(PROSE[last]))
            else:
                assert normalize(q.answer) in text[last]
            if q.extra["template"] == "bridge":  # and the bridge entity is named in the first passage
                assert normalize(slots["M"]) in text[q.extra["chain"][0]]
        else:
            a, b = q.extra["chain"][:2]
            assert normalize(str(slots["va"]).split()[0]) in text[a]
        # the type word is the KB's own: monuments are towers, bridges, castles... never a demo word
        assert "flag" not in q.problem and "country whose" not in q.problem
    assert any("this tower" in q.problem or "the tower" in q.problem for q in qs)
    # yes and no both occur, so "same" is not a constant answer
    same = Counter(q.answer for q in qs if q.extra["template"] == "same")
    assert same["yes"] and same["no"]


def test_wordings_are_spread(prose_kb, tmp_path):
    synthesize(prose_kb, tmp_path / "q", dev_fraction=0.0, seed=1, max_per_template=None)
    qs = _all(tmp_path / "q")
    for name in ("fact", "year"):
        used = Counter(q.extra["wording"] for q in qs if q.extra["template"] == name)
        n = sum(used.values())
        assert n and max(used.values()) <= -(-n // len(templates.TEMPLATES[name].wordings))  # round robin


def test_held_out_domain_uses_held_out_wordings(prose_kb, tmp_path):
    rows = [json.loads(x) for x in (prose_kb / "images.jsonl").read_text().splitlines()]
    for r in rows[:3]:  # the first three monuments become another domain, held out of training
        r["id"] = r["id"].replace("mon:", "far:")
    (prose_kb / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = synthesize(prose_kb, tmp_path / "q", dev_fraction=0.0, seed=2, holdout=("far",),
                     max_per_template=None, max_ood_per_template=None)
    assert res["counts"]["ood"] > 0
    ood = load_questions(tmp_path / "q" / "ood.jsonl")
    train = load_questions(tmp_path / "q" / "train.jsonl")
    held = {r["title"] for r in rows[:3]}
    assert all(set(q.extra["gold_entities"]) <= held for q in ood)
    assert not any(set(q.extra["gold_entities"]) & held for q in train)
    # an entity a training domain also shows is never asked about out of domain
    rows.append({"id": "mon:zorg-again", "path": rows[0]["path"], "title": rows[0]["title"], "caption": ""})
    (prose_kb / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    synthesize(prose_kb, tmp_path / "q2", dev_fraction=0.0, seed=2, holdout=("far",), max_ood_per_template=None)
    ood2 = load_questions(tmp_path / "q2" / "ood.jsonl")
    assert ood2 and not any(rows[0]["title"] in q.extra["gold_entities"] for q in ood2)
    train_texts = {templates.TEMPLATES[q.extra["template"]].wordings[q.extra["wording"]] for q in train}
    for q in ood:
        wording = templates.TEMPLATES[q.extra["template"]].heldout[q.extra["wording"]]
        assert wording not in train_texts


def test_the_table_drives_synthesis_and_gold_turns(prose_kb, tmp_path, monkeypatch):
    fact = templates.TEMPLATES["fact"]
    plan = (fact.plan[0], replace(fact.plan[1], think=("Aha, {A}; its {rel} next.",)), fact.plan[2])
    monkeypatch.setitem(templates.TEMPLATES, "fact", replace(fact, wordings=("Quiz: the {rel} of {this}?",),
                                                             plan=plan))
    synthesize(prose_kb, tmp_path / "q", dev_fraction=0.0, seed=0, max_per_template=None)
    facts = [q for q in _all(tmp_path / "q") if q.extra["template"] == "fact"]
    assert facts and all(q.problem.split("> ", 1)[1].startswith("Quiz: the ") for q in facts)
    q = facts[0]
    turns = gold_turns(q)
    assert turns[1] == (f"<think>Aha, {q.extra['slots']['A']}; its {q.extra['slots']['rel']} next.</think>"
                        f"<text_search>{q.extra['slots']['A']} {q.extra['slots']['rel']}</text_search>")
    assert turns[-1].endswith(f"<answer>{q.answer}</answer>")
    # an entity answer is named without its qualifier, and both spellings score
    from mmhops_lite.data.synth import _named

    assert _named("Io (moon)") == ("Io", ["Io", "Io (moon)"]) and _named("Jupiter") == ("Jupiter", ["Jupiter"])
    # a question without a template has no plan: discovery handles it
    bare = replace(q, extra={})
    assert gold_turns(bare) is None
