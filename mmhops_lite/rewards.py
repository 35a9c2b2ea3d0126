"""Rewards for GRPO as a table: each part is one function of an episode, registered under a name with its default
weight. The built-in parts are outcome (MMhops scorer), format, and action (counted only when the answer is right);
defaults outcome 1.0, format 0.2, action 0.3. `--reward name=value,...` sets weights and the options f1, coverage.

A new part is one function and one `@reward(...)` line:

    @reward("brevity", weight=0.0, help="1 for at most three turns")
    def brevity(ep: Scored) -> float:
        return float(len(ep.trace.hops) <= 3)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from . import grammar
from .scoring import f1, score


@dataclass(frozen=True)
class Scored:
    """What a reward part sees of one episode: its Trace, its Question, whether the answer is right (MMhops rules),
    and the switched-on options."""

    trace: object
    question: object
    correct: bool
    options: frozenset = frozenset()

    @property
    def policy_turns(self) -> list[str]:
        # A forced answer (loop.final_answer) is the loop's request, not the policy's choice: format counts it
        # as unanswered, so the policy is still paid for finishing on its own.
        return [h.raw for h in self.trace.hops if h.raw and not getattr(h, "forced", False)]


@dataclass(frozen=True)
class Part:
    fn: Callable[[Scored], float]
    weight: float
    help: str


REWARDS: dict[str, Part] = {}  # name -> part, in the order they add up
OPTIONS = {"f1": "wrong String answers earn their token F1 instead of 0 (outcome part)",
           "coverage": "the action part pays per gold entity and passage found, not for any one"}


def reward(name: str, weight: float = 0.0, help: str = ""):
    """Register a reward part under `name` with its default weight (decorator)."""
    if name in OPTIONS or name in ("total", "correct"):
        raise ValueError(f"{name!r} is a reserved reward name")

    def put(fn: Callable[[Scored], float]):
        REWARDS[name] = Part(fn, float(weight), help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return put


@dataclass(frozen=True)
class Weights:
    """Weights of the reward parts (a part not named keeps its registered default) and the options switched on.
    Outcome dominates by default so that format or searching alone never pays more than a right answer."""

    values: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    options: frozenset = frozenset()

    def of(self, name: str) -> float:
        return float(self.values.get(name, REWARDS[name].weight))

    def to_dict(self) -> dict:
        """Every part's weight and every option, as recorded in a run's metadata."""
        return {**{n: self.of(n) for n in REWARDS}, **{o: o in self.options for o in OPTIONS}}

    @classmethod
    def parse(cls, spec: str) -> Weights:
        """Weights from `name=value` pairs; parts left out keep their defaults; options are 0 or 1.

        >>> Weights.parse("action=0.5, coverage=1").to_dict()
        {'outcome': 1.0, 'format': 0.2, 'action': 0.5, 'f1': False, 'coverage': True}
        >>> Weights.parse("speed=1")
        Traceback (most recent call last):
        ...
        mmhops_lite.errors.InputError: unknown reward part 'speed' Fix: write e.g. --reward outcome=1,format=0.2,action=0.3,f1=0,coverage=0 (parts: outcome, format, action; options: f1, coverage)
        """
        from .errors import InputError

        example = ",".join([f"{n}={p.weight:g}" for n, p in REWARDS.items()] + [f"{o}=0" for o in OPTIONS])
        fix = f"write e.g. --reward {example} (parts: {', '.join(REWARDS)}; options: {', '.join(OPTIONS)})"
        values, options = {}, set()
        for item in filter(None, (p.strip() for p in spec.split(","))):
            key, _, val = item.partition("=")
            key = {"f1_partial": "f1"}.get(key.strip(), key.strip())
            if key not in REWARDS and key not in OPTIONS:
                raise InputError(f"unknown reward part {key!r}", fix=fix)
            if not val.strip():
                raise InputError(f"no value for {key!r}", fix=fix)
            try:
                v = float(val)
            except ValueError:
                raise InputError(f"reward part {key!r} needs a number, not {val.strip()!r}",
                                 fix="write e.g. --reward action=0.3 (options f1, coverage: 0 or 1)") from None
            if key in OPTIONS:
                options = options | {key} if v else options - {key}
            else:
                values[key] = v
        return cls(MappingProxyType(values), frozenset(options))


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


@reward("outcome", 1.0, "1 for a correct answer under MMhops rules (token F1 when option f1 is on)")
def _outcome(ep: Scored) -> float:
    return outcome_reward(ep.trace.answer, ep.question.answer_eval, ep.question.problem_type, "f1" in ep.options)


@reward("format", 0.2, "share of the policy's turns holding exactly one well-formed action; 0 if it never answered")
def _format(ep: Scored) -> float:
    return format_reward(ep.policy_turns, len(ep.question.images))


@reward("action", 0.3, "useful searches (gold entity found, gold passage read), only when the answer is right")
def _action(ep: Scored) -> float:
    x = ep.question.extra
    return action_reward(ep.trace.hops, x.get("gold_entities", ()), x.get("gold_passages", ()), ep.correct,
                         "coverage" in ep.options)


def scored(trace, question, weights: Weights = Weights()) -> Scored:
    """One episode (a Trace) for one Question as its reward parts see it."""
    correct = score(trace.answer, question.answer_eval, question.problem_type)
    return Scored(trace, question, correct, weights.options)


def total_reward(trace, question, weights: Weights = Weights()) -> dict:
    """Every registered part of one episode (a Trace) for one Question, their weighted sum ("total") and
    whether the answer is right ("correct", 0 or 1)."""
    ep = scored(trace, question, weights)
    correct = ep.correct
    parts = {name: float(part.fn(ep)) for name, part in REWARDS.items()}
    parts["total"] = sum(weights.of(name) * v for name, v in parts.items())
    parts["correct"] = float(correct)
    return parts


def part_names(record: Mapping) -> list[str]:
    """The reward parts present in a `total_reward` result, in table order."""
    return [n for n in REWARDS if n in record]


SCORED_FIELD = "mmhops_scored"  # the column a trl rollout_func hands its episodes to the reward functions in


def trl_reward_functions(weights: Weights = Weights()) -> tuple[list, list[float]]:
    """The reward table as trl `reward_funcs` and `reward_weights`: one function per part, named after it (trl logs
    `rewards/<name>/mean`), reading the episodes a rollout_func returned under SCORED_FIELD. The parts themselves
    are the ones `total_reward` adds up, so both trainers optimise one definition.

    >>> from types import SimpleNamespace as NS
    >>> funcs, w = trl_reward_functions(Weights.parse("action=0.5"))
    >>> [f.__name__ for f in funcs], w
    (['outcome', 'format', 'action'], [1.0, 0.2, 0.5])
    >>> q = NS(answer_eval=["Dijon"], problem_type="String", images=["a.png"], extra={})
    >>> tr = NS(answer="Dijon", hops=[NS(raw="<answer>Dijon</answer>", action="answer")])
    >>> [f(prompts=["p"], completions=["c"], mmhops_scored=[scored(tr, q)]) for f in funcs]
    [[1.0], [1.0], [0.0]]
    """
    funcs = []
    for name, part in REWARDS.items():
        def fn(prompts=None, completions=None, _part=part, **kwargs):
            return [float(_part.fn(ep)) for ep in kwargs[SCORED_FIELD]]
        fn.__name__ = fn.__qualname__ = name
        funcs.append(fn)
    return funcs, [weights.of(name) for name in REWARDS]
