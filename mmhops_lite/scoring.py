"""MMhops scoring, following the official evaluator: normalised exact match; numbers against a range."""
from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                      "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_SCALES = {"hundred": 100, "thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lowercase, strip punctuation, then articles, and collapse spaces.

    >>> normalize("The  Eiffel Tower!")
    'eiffel tower'
    """
    text = str(text).lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def words_to_digits(text: str) -> str:
    """Rewrite number words as digits, so 'twenty-five million' reads as 25000000.

    >>> words_to_digits("about twenty-five million people")
    'about 25000000 people'
    >>> words_to_digits("3.5 million, one hundred and twelve or 1,204")
    '3500000 , 112 or 1204'
    """
    tokens = re.findall(r"[A-Za-z]+|\d+(?:[.,]\d+)*|\S", text.replace("-", " "))
    out: list[str] = []
    state = {"total": 0.0, "cur": 0.0, "on": False, "last": ""}

    def flush():
        if state["on"]:
            v = state["total"] + state["cur"]
            out.append(str(int(v)) if float(v).is_integer() else str(v))
        state.update(total=0.0, cur=0.0, on=False, last="")

    for i, tok in enumerate(tokens):
        low = tok.lower()
        nxt = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
        if re.fullmatch(r"\d+(?:[.,]\d+)*", tok):
            flush()
            thousands = re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", tok)
            state.update(cur=float(tok.replace(",", "") if thousands or "," not in tok else tok.replace(",", ".")),
                         on=True, last="digit")
        elif low in _UNITS or low in _TENS:
            if state["last"] in ("unit", "digit") or (low in _TENS and state["last"] == "tens"):
                flush()
            state["cur"] += _UNITS.get(low, _TENS.get(low, 0))
            state.update(on=True, last="tens" if low in _TENS else "unit")
        elif low in _SCALES and state["on"]:
            if low == "hundred":
                state["cur"] = (state["cur"] or 1) * 100
            else:
                state["total"] += (state["cur"] or 1) * _SCALES[low]
                state["cur"] = 0.0
            state["last"] = "scale"
        elif low == "and" and state["last"] == "scale" and (nxt in _UNITS or nxt in _TENS):
            continue
        else:
            flush()
            out.append(tok)
    flush()
    return " ".join(out)


def numbers(text: str) -> list[float]:
    """Every number in a text, number words included.

    >>> numbers("between 1,200 and two thousand")
    [1200.0, 2000.0]
    """
    return [float(x) for x in _NUM.findall(words_to_digits(str(text)))]


def _iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else float(a == b)


def score_numerical(prediction: str, answer_eval) -> bool:
    """A number inside [low, high]; a predicted range inside it or overlapping with IoU >= 0.5.

    >>> score_numerical("about 2.1 million", [2000000, 2200000])
    True
    >>> score_numerical("1990-2010", [2000, 2020])
    False
    >>> score_numerical("2001 to 2019", [2000, 2020])
    True
    """
    nums = numbers(prediction)
    if not nums:
        return False
    lo, hi = float(min(answer_eval[:2])), float(max(answer_eval[:2]))
    if len(nums) >= 2 and re.search(r"\d\s*(?:-|–|to|and)\s*-?\d|between", words_to_digits(str(prediction))):
        p = (min(nums[0], nums[1]), max(nums[0], nums[1]))
        return (lo <= p[0] and p[1] <= hi) or _iou(p, (lo, hi)) >= 0.5
    return lo <= nums[0] <= hi


def score(prediction: str | None, answer_eval, problem_type: str = "String") -> bool:
    """Is the prediction correct under MMhops rules?

    >>> score("the Dijon.", ["Dijon"], "String")
    True
    >>> score("1889", ["1889"], "Time")
    True
    >>> score(None, ["x"])
    False
    """
    if prediction is None or not str(prediction).strip():
        return False
    if problem_type == "Numerical":
        return score_numerical(prediction, list(answer_eval))
    p = normalize(prediction)
    return any(p == normalize(a) for a in answer_eval)


def f1(prediction: str | None, answer_eval) -> float:
    """Token F1 against the best gold answer (optional partial credit).

    >>> round(f1("Gustave Eiffel", ["Alexandre Gustave Eiffel"]), 2)
    0.8
    """
    if not prediction:
        return 0.0
    p = normalize(prediction).split()
    best = 0.0
    for a in answer_eval:
        g = normalize(str(a)).split()
        common = sum(min(p.count(w), g.count(w)) for w in set(p))
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best
