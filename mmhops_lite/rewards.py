"""Rewards for GRPO, as plain functions: outcome (MMhops scorer), format, and action (counted only when the
answer is right). Defaults: outcome 1.0, format 0.2, action 0.3 (see `Weights`; `--reward` on the command line)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import grammar
from .scoring import f1, score


@dataclass(frozen=True)
class Weights:
    """How the parts add up; outcome dominates so that format or searching alone never pays more than a right answer."""

    outcome: float = 1.0
    format: float = 0.2
    action: float = 0.3
    f1_partial: bool = False  # give String answers token-F1 partial credit instead of 0 when wrong
    coverage: bool = False  # action credit in proportion to the gold entities and passages found (not any one)

    @classmethod
    def parse(cls, spec: str) -> Weights:
        """Weights from `name=value` pairs; names left out keep their defaults.

        >>> Weights.parse("action=0.5, coverage=1")
        Weights(outcome=1.0, format=0.2, action=0.5, f1_partial=False, coverage=True)
        >>> Weights.parse("speed=1")
        Traceback (most recent call last):
        ...
        mmhops_lite.errors.InputError: unknown reward part 'speed' Fix: write e.g. --reward outcome=1,...
        """
        from dataclasses import fields, replace

        from .errors import InputError

        names = {f.name: f.type for f in fields(cls)}
        names["f1"] = "bool"
        out = cls()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, val = part.partition("=")
            key = key.strip()
            if key not in names or not val.strip():
                raise InputError(f"unknown reward part {key!r}" if key not in names else f"no value for {key!r}",
                                 fix="write e.g. --reward outcome=1,format=0.2,action=0.3,f1=0,coverage=0")
            try:
                v = float(val)
            except ValueError:
                raise InputError(f"reward part {key!r} needs a number, not {val.strip()!r}",
                                 fix="write e.g. --reward action=0.3 (flags f1, coverage: 0 or 1)") from None
            key = "f1_partial" if key == "f1" else key
            out = replace(out, **{key: bool(v) if key in ("f1_partial", "coverage") else v})
        return out


def outcome_reward(prediction: str | None, answer_eval: Sequence, problem_type: str = "String",
                   f1_partial: bool = False) -> float:
    """1.0 for a correct answer under MMhops rules, else 0 (or token F1 when f1_partial).

    >>> outcome_reward("the Dijon", ["Dijon"])
    1.0
    >>> outcome_reward("twenty", [15, 25], "Numerical")
    1.0
    >>> outcome_reward("Paris", ["Dijon"])
    0.0
    >>> round(outcome_reward("Gustave Eiffel", ["Alexandre Gustave Eiffel"], f1_partial=True), 2)
    0.8
    """
    if score(prediction, answer_eval, problem_type):
        return 1.0
    if f1_partial and problem_type != "Numerical":
        return f1(prediction, answer_eval)
    return 0.0


def format_reward(policy_turns: Sequence[str], n_images: int) -> float:
    """Share of the policy's turns that hold exactly one well-formed action; 0 if the episode never answered.

    >>> format_reward(["<think>a</think><image_search>1</image_search>", "<answer>x</answer>"], 1)
    1.0
    >>> format_reward(["<image_search>1</image_search><text_search>q</text_search>", "<answer>x</answer>"], 1)
    0.5
    >>> format_reward(["<text_search>q</text_search>"], 1)
    0.0
    """
    if not policy_turns:
        return 0.0
    actions = [grammar.parse_action(t, n_images) for t in policy_turns]
    if actions[-1].kind != "answer":
        return 0.0
    return sum(a.kind != "invalid" for a in actions) / len(actions)


def action_reward(hops: Sequence, gold_entities: Sequence[str], gold_passages: Sequence[str], correct: bool,
                  coverage: bool = False) -> float:
    """Useful tool use, counted only when the answer is right: half for an image search whose top entity is a gold
    one, half for a text search that retrieved a gold passage. With `coverage`, each half is the share of the gold
    entities (passages) found, so a comparison pays in full only when both sides were looked up.

    >>> hops = [{"action": "image_search", "results": [{"id": "flag:fr", "title": "France"}]},
    ...         {"action": "text_search", "results": [{"id": "wiki:x"}, {"id": "wiki:france"}]}]
    >>> action_reward(hops, ["France"], ["wiki:france"], correct=True)
    1.0
    >>> action_reward(hops, ["France"], ["wiki:france"], correct=False)
    0.0
    >>> action_reward(hops[:1], ["Spain"], ["wiki:france"], correct=True)
    0.0
    >>> action_reward(hops, ["France", "Peru"], ["wiki:france", "wiki:peru"], correct=True, coverage=True)
    0.5
    """
    if not correct:
        return 0.0
    found = {r.get("title", "").lower() for h in hops if _get(h, "action") == "image_search" and _get(h, "results")
             for r in _get(h, "results")[:1]}
    read = {r.get("id") for h in hops if _get(h, "action") == "text_search" for r in _get(h, "results")}
    gold_e, gold_p = {g.lower() for g in gold_entities}, set(gold_passages)
    if coverage:
        img = len(gold_e & found) / len(gold_e) if gold_e else 0.0
        txt = len(gold_p & read) / len(gold_p) if gold_p else 0.0
    else:
        img, txt = float(bool(gold_e & found)), float(bool(gold_p & read))
    return 0.5 * img + 0.5 * txt


def _get(h, key):
    return h[key] if isinstance(h, dict) else getattr(h, key)


def total_reward(trace, question, weights: Weights = Weights()) -> dict:
    """All reward parts of one episode (a Trace) for one Question, and their weighted sum."""
    turns = [h.raw for h in trace.hops if h.raw]
    correct = score(trace.answer, question.answer_eval, question.problem_type)
    parts = {
        "outcome": outcome_reward(trace.answer, question.answer_eval, question.problem_type, weights.f1_partial),
        "format": format_reward(turns, len(question.images)),
        "action": action_reward(trace.hops, question.extra.get("gold_entities", ()),
                                question.extra.get("gold_passages", ()), correct, weights.coverage),
    }
    parts["total"] = weights.outcome * parts["outcome"] + weights.format * parts["format"] + \
        weights.action * parts["action"]
    parts["correct"] = float(correct)
    return parts
