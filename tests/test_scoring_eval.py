import json

import pytest

from mmhops_lite.data.questions import load_questions
from mmhops_lite.errors import InputError
from mmhops_lite.eval import summarize
from mmhops_lite.scoring import score, words_to_digits


@pytest.mark.parametrize("pred, gold, ptype, ok", [
    ("Dijon", ["Dijon"], "String", True),
    ("  the dijon. ", ["Dijon"], "String", True),
    ("Dijon, France", ["Dijon"], "String", False),
    ("An Apple", ["apple"], "String", True),
    ("1889", ["1889"], "Time", True),
    ("March 31, 1889", ["March 31 1889"], "Time", True),
    ("twelve", [10, 15], "Numerical", True),
    ("about 2,100,000", [2000000, 2200000], "Numerical", True),
    ("2.1 million", [2000000, 2200000], "Numerical", True),
    ("3 million", [2000000, 2200000], "Numerical", False),
    ("between 2000 and 2021", [2000, 2020], "Numerical", True),
    ("1900-2010", [2000, 2020], "Numerical", False),
    ("no idea", [1, 2], "Numerical", False),
    (None, ["x"], "String", False),
])
def test_mmhops_rules(pred, gold, ptype, ok):
    assert score(pred, gold, ptype) is ok


def test_number_words():
    assert words_to_digits("one hundred and five") == "105"
    assert words_to_digits("two thousand twenty") == "2020"


def test_question_file_validation(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"x")
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"id": "1", "problem": "<image> p?", "images": ["img/a.jpg"], "answer": "x",
                             "split": "Bridge", "problem_type": "String"}) + "\n")
    q = load_questions(f)[0]
    assert q.images[0] == str(tmp_path / "img" / "a.jpg") and q.answer_eval == ("x",)
    f.write_text(json.dumps({"id": "1", "problem": "p", "answer": "3", "problem_type": "Numerical"}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:1.*\[low, high\]"):
        load_questions(f)
    f.write_text(json.dumps({"id": "1", "problem": "p", "images": ["img/missing.jpg"]}) + "\n")
    with pytest.raises(InputError, match="missing.jpg"):
        load_questions(f)
    f.write_text(json.dumps({"id": "1", "problem": "p", "split": "Bridging"}) + "\n")
    with pytest.raises(InputError, match="split"):
        load_questions(f)


def test_summary_groups():
    recs = [{"split": "Bridge", "problem_type": "String", "correct": True, "turns": 3, "searches": 2, "seconds": 1.0,
             "prediction": "a"},
            {"split": "Compare", "problem_type": "String", "correct": False, "turns": 1, "searches": 0,
             "seconds": 3.0, "prediction": None}]
    s = summarize(recs)
    assert s["all"]["accuracy"] == 0.5 and s["Bridge"]["accuracy"] == 1.0 and s["Compare"]["answered"] == 0.0
    assert s["all"]["searches"] == 1.0 and s["String"]["n"] == 2
