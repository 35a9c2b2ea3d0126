import json

from mmhops_lite.data.questions import load_questions
from mmhops_lite.data.synth import synthesize


def test_synth_on_tiny_kb(tiny_kb, tmp_path):
    # Give the tiny KB continents, so Compare questions exist too.
    with open(tiny_kb / "triples.jsonl", "a") as f:
        for i, c in enumerate(["Freedonia", "Sylvania", "Latveria", "Genovia", "Elbonia", "Wakanda"]):
            f.write(json.dumps({"subject": c, "relation": "part of", "object": ["Europa", "Asiana"][i % 2]}) + "\n")
    res = synthesize(tiny_kb, tmp_path / "q", dev_fraction=0.5, seed=1, max_dev_per_template=None)
    train = load_questions(tmp_path / "q" / "train.jsonl") if res["counts"]["train"] else []
    dev = load_questions(tmp_path / "q" / "dev.jsonl") if res["counts"]["dev"] else []
    allq = train + dev
    assert allq and {q.split for q in allq} == {"Bridge", "Compare"}
    kb_passages = {json.loads(x)["title"]: json.loads(x)["text"] for x in (tiny_kb / "passages.jsonl").read_text().splitlines()}
    for q in allq:
        if q.extra["template"] == "capital":
            # The answer is checkable: it is in the gold entity's passage.
            assert q.answer in kb_passages[q.extra["gold_entities"][0]]
        for p in q.images:  # question images are perturbed copies, never the indexed files
            assert p.endswith(".jpg") and "images/" not in p
    # Entities are disjoint between the splits.
    ent = lambda qs: {e for q in qs for e in q.extra["gold_entities"]}  # noqa: E731
    assert not (ent(train) & ent(dev))
