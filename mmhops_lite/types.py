"""The concepts passed between modules: one frozen dataclass each, with to_dict/from_dict for JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


class _Json:
    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Passage(_Json):
    """A text passage of the knowledge base."""

    id: str
    title: str
    text: str
    source: str = ""


@dataclass(frozen=True)
class ImageRecord(_Json):
    """An image of the knowledge base, naming the entity it shows."""

    id: str
    path: str
    title: str
    caption: str = ""


@dataclass(frozen=True)
class Triple(_Json):
    """A (subject, relation, object) fact of the knowledge base."""

    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class PassageHit(_Json):
    """A passage returned by a text search, with its fused score and the rankers' evidence."""

    passage: Passage
    score: float
    dense: float | None = None
    bm25_rank: int | None = None

    @property
    def id(self) -> str:
        return self.passage.id

    @property
    def title(self) -> str:
        return self.passage.title


@dataclass(frozen=True)
class Entity(_Json):
    """An entity found by image search: the best-matching KB image, its title and passage head."""

    id: str
    title: str
    score: float
    caption: str = ""
    path: str = ""
    passage_id: str | None = None
    passage_head: str = ""


@dataclass(frozen=True)
class Question(_Json):
    """A question in the MMhops schema (paths already resolved against the question file)."""

    id: str
    problem: str
    images: tuple[str, ...] = ()
    answer: str = ""
    answer_eval: tuple = ()
    split: str = "Bridge"
    problem_type: str = "String"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Action(_Json):
    """What the policy chose in one turn: image_search (argument = 1-based image number), text_search, answer,
    or invalid (argument = why)."""

    kind: str
    argument: str
    think: str = ""
    raw: str = ""


@dataclass(frozen=True)
class Hop(_Json):
    """One turn of the loop: the action, what came back, and what it cost."""

    action: str
    argument: str
    results: tuple = ()  # ({"id", "title", "score"}, ...)
    seconds: float = 0.0
    tokens_evaluated: int = 0
    tokens_generated: int = 0
    think: str = ""
    raw: str = ""
    forced: bool = False  # an answer the loop asked for when the turns ran out (loop.final_answer)


@dataclass(frozen=True)
class Trace(_Json):
    """A whole episode: the question, every hop, the answer and the evidence it rests on."""

    question: str
    images: tuple = ()
    hops: tuple = ()
    answer: str | None = None
    evidence: tuple = ()
    tokens: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    transcript: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hops"] = [h.to_dict() if hasattr(h, "to_dict") else h for h in self.hops]
        return d
