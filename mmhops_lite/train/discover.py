"""Trajectories for questions that have a known answer but no template: a breadth-first search over the loop's own
actions until what the loop would show supports the answer (discovery), and rejection sampling of the policy."""
from __future__ import annotations

import dataclasses
import hashlib
import html
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import grammar
from ..loop import Episode, Searcher, answer, answer_many
from ..scoring import normalize, numbers, score
from ..types import Question

_STOP = set("""a an the of in on at to for from by with and or as is are was were be been being do does did has have
had it its this these that those there here which what who whom whose where when why how many much image images
picture pictures photo photos shown show shows depicted pictured one two three both either each than into about
same other another""".split())
# Words of the asking, not of the thing asked about: a query carrying them ("Flamingo family things yes no") is noise
# the policy would learn to type.
_ASKING = set("""tell me give name find know please yes no thing things first second pick point out would could can
you i like want look looking identify report work check whether true answer say between whose ones goes go matches
alike share shared common identical wins scores ranks""".split())
_DEMONSTRATIVE = {"this", "these", "that", "those"}
# Comparatives whose direction is unambiguous (not older/earlier: a year and an age run opposite ways).
_MORE = set("larger more higher bigger greater taller longer most largest highest biggest greatest tallest longest"
            .split())
_LESS = set("smaller fewer less lower shorter least smallest lowest shortest fewest".split())
_UNSEARCHED = _STOP | _ASKING | _MORE | _LESS  # never a word of a discovered query


@dataclass(frozen=True)
class Discovery:
    """A found trajectory: the policy's turns, the (action, argument) of each turn, and what supports the answer."""

    turns: list
    path: list
    reason: str


@dataclass(frozen=True)
class _Step:
    """One search on a path, with the hits exactly as its <information> block shows them."""

    kind: str
    arg: str
    subject: str  # the entity the query is about
    via: str  # "" for an image entity, else the title of the passage that named the subject
    said: str  # the sentence of that passage naming the subject (escaped, as shown)
    hits: tuple  # ((title, shown text), ...)


def question_terms(problem: str) -> list[str]:
    """The question's content words, minus the noun a demonstrative points at (the image entity's type), the words
    of the asking itself and comparatives (the direction of a comparison is read from the question, not searched)."""
    out, skip = [], False
    for w in re.findall(r"\w+", problem.replace("<image>", " ").lower()):
        if w in _DEMONSTRATIVE:
            skip = True
        elif skip and (w.isdigit() or w in ("two", "three", "both")):
            continue  # "these two countries": the noun is still to come
        elif skip:
            skip = False  # "this tower": the type of what image search already found, noise in a query
        elif w not in _UNSEARCHED and w not in out:
            out.append(w)
    return out


_plain = html.unescape  # shown text is escaped (&lt; &gt; &amp;); matching wants the plain text


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+", text) if s.strip()]


def _answer_range(q: Question):
    try:
        lo, hi = float(q.answer_eval[0]), float(q.answer_eval[1])
        return min(lo, hi), max(lo, hi)
    except (IndexError, TypeError, ValueError):
        n = numbers(q.answer)
        return (n[0], n[0]) if n else None


def _holds(q: Question, title: str, body: str) -> bool:
    """Does one shown hit state the answer (a number in range for Numerical)?"""
    if q.problem_type == "Numerical":
        r = _answer_range(q)
        return bool(r) and any(r[0] <= x <= r[1] for x in numbers(_plain(body)))
    text = f" {normalize(_plain(title + ' ' + body))} "
    return any(a and f" {a} " in text for a in (normalize(str(x)) for x in (q.answer, *q.answer_eval)))


def _query(subject: str, terms: Sequence[str]) -> str:
    have = set(normalize(subject).split())
    words = subject.replace("<", " ").replace(">", " ").split() + [t for t in terms if t not in have]
    return " ".join(words)  # single spaces: parse_action normalises the argument, the cache key must match


def _number(body: str, terms: Sequence[str]):
    """The first number in the first shown sentence that uses one of the question's terms."""
    want = set(terms) - _MORE - _LESS
    for s in _sentences(_plain(body)):
        if want & set(normalize(s).split()) and numbers(s):
            return numbers(s)[0]
    return None


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,g}"


class _Mentions:
    """KB titles a shown passage names (case as in the KB), in order of appearance; memoised per text."""

    def __init__(self, index):
        self.store, self.memo = getattr(index, "store", None), {}

    def __call__(self, body: str) -> list[str]:
        if self.store is None:
            return []
        if body not in self.memo:
            plain = _plain(body)
            words = [w for w in (x.strip(".,;:!?\"'()[]…") for x in plain.split()) if w]
            grams = list(dict.fromkeys(" ".join(words[i:j]) for i in range(len(words))
                                       for j in range(i + 1, min(len(words), i + 6) + 1)))
            titles = {t for k in range(0, len(grams), 200) for _, t in self.store.labels_for_titles(grams[k:k + 200])}
            # Case-sensitive: a title that is also a common word ("Tower") is not a mention of that entity.
            pos = {t: m.start() for t in titles if (m := re.search(rf"(?<!\w){re.escape(t)}(?!\w)", plain))}
            self.memo[body] = sorted(pos, key=lambda t: (pos[t], t))
        return self.memo[body]


def _read(search: Searcher, kind: str, arg: str, perceptions, subject="", via="", said="") -> _Step:
    lines, recs = search(kind, arg, perceptions)
    hits = []
    for i, (line, r) in enumerate(zip(lines, recs), 1):
        rest = line[len(f"[{i}] {grammar.escape(r['title'])}"):]  # ": text", or " (image match s): head"
        hits.append((r["title"], rest.split(": ", 1)[1] if ": " in rest else ""))
    return _Step(kind, arg, subject, via, said, tuple(hits))


def _candidates(node: tuple, entities: list[str], terms: list[str], mentions: _Mentions, beam: int) -> list:
    """Next searches from a path: image entities not yet searched, then entities the read passages name."""
    used = {normalize(s.subject) for s in node}
    read = {normalize(t) for s in node for t, _ in s.hits}
    subjects = [(e, "", "") for e in entities]
    for s in reversed(node):  # the newest passage first: a chain continues from what was just read
        for title, body in s.hits:
            for m in mentions(body):
                if normalize(m) not in read:  # a passage already shown would only be shown again
                    said = next((x for x in _sentences(body) if m in _plain(x)), "")
                    subjects.append((m, title, " ".join(said.split()[:25])))
    out, seen = [], set()
    for subject, via, said in subjects:
        if normalize(subject) in used | seen:
            continue
        seen.add(normalize(subject))
        for query in dict.fromkeys((_query(subject, terms), _query(subject, []))):
            out.append((subject, via, said, query))
    return out[:beam]


def _accept(q: Question, images: list, path: tuple, entities: list[str], terms: list[str], compare: bool):
    """None, "contradicted", or the evidence the answer turn cites: (title holding the answer, numbers read)."""
    steps = list(images) + list(path)
    # Only a passage about what was searched counts (an image's own entity, a text search's subject): an answer
    # that merely turns up in a passage retrieved beside it is a coincidence, not a chain worth teaching.
    where = next((t for s in reversed(steps) for t, b in s.hits
                  if (s.kind == "image_search" or normalize(t) == normalize(s.subject)) and _holds(q, t, b)), None)
    if not compare:
        return (where, {}) if where else None
    own = {}  # each compared entity's passage, as its own search showed it
    for s in path:
        for t, b in s.hits:
            if s.subject in entities and normalize(t) == normalize(s.subject):
                own.setdefault(s.subject, b)
    a, b = entities[:2]
    if a not in own or b not in own:
        return None  # both must have been read before the policy may compare them
    nums = {e: _number(own[e], terms) for e in (a, b)}
    both = None not in nums.values()
    ans = normalize(q.answer)
    if ans in (normalize(a), normalize(b), "yes", "no"):
        asked = set(re.findall(r"\w+", q.problem.lower()))
        way = "more" if asked & _MORE else "less" if asked & _LESS else None
        if both and way and ans != "yes" and ans != "no" and nums[a] != nums[b]:
            want = a if (nums[a] > nums[b]) == (way == "more") else b
            if normalize(want) != ans:
                return "contradicted"
        return (where, nums)
    if q.problem_type == "Numerical" and both:
        r = _answer_range(q)
        if r and r[0] <= abs(nums[a] - nums[b]) <= r[1]:
            return (where, nums)
    return (where, nums) if where else None


_V = {  # think phrasings, picked per question by a seeded rng so the policy does not learn one fixed sentence
    "identify": ["First identify what image {i} shows.", "What is in image {i}? Search it.", "What does image {i} show?"],
    "shows": ["Image {i} shows {e}.", "Image {i} is {e}.", "It is {e}."],
    "first": ["Now search {s}.", "Next, look up {s}.", "Find out more about {s}."],
    "then": ["Now search {s}.", "Next, look up {s}.", "Follow it to {s}."],
    "named": ['The passage on {t} says: "{said}"', '{t}: "{said}"', 'From the passage on {t}: "{said}"'],
    "number": ["{p}: {n}.", "{p} has {n}.", "The passage gives {n} for {p}."],
    "read": ["I have read about {p}.", "That was {p}.", "{p} is read."],
    "found": ["The passage on {t} gives it: {a}.", "The {t} passage answers it: {a}.", "Found in the passage on {t}: {a}."],
    "numbers": ["{x}: {nx}, {y}: {ny}. So the answer is {a}.", "{x} has {nx} and {y} has {ny}; the answer is {a}.",
                "Comparing {x} ({nx}) with {y} ({ny}): {a}."],
    "both": ["Both {x} and {y} are read. The answer is {a}.", "Having read {x} and {y}, the answer is {a}."],
}


def _write(q: Question, images: list, path: tuple, evidence, entities: list[str]) -> Discovery:
    """The policy's turns for a found path, each <think>what was found, what is searched next</think> + action."""
    rng = random.Random(int(hashlib.sha1(q.id.encode()).hexdigest()[:8], 16))

    def say(key, **kw):
        return rng.choice(_V[key]).format(**{k: grammar.escape(str(v)) if k != "said" else v for k, v in kw.items()})

    turns, pairs = [], []
    for i, _ in enumerate(images, 1):
        lead = say("shows", i=i - 1, e=entities[i - 2]) + " " if i > 1 else ""
        turns.append(f"<think>{lead}{say('identify', i=i)}</think><image_search>{i}</image_search>")
        pairs.append(("image_search", str(i)))
    where, nums = evidence
    prev = None
    for s in path:
        if prev is None:
            found = say("shows", i=len(entities), e=entities[-1])
        elif s.via and s.said:
            found = say("named", t=s.via, said=s.said)  # already escaped, as shown
        elif nums.get(prev.subject) is not None:
            found = say("number", p=prev.subject, n=_fmt(nums[prev.subject]))
        else:
            found = say("read", p=prev.subject)
        nxt = say("first" if prev is None else "then", s=s.subject)
        turns.append(f"<think>{found} {nxt}</think><text_search>{grammar.escape(s.arg)}</text_search>")
        pairs.append(("text_search", s.arg))
        prev = s
    if len(nums) == 2 and None not in nums.values():
        (x, nx), (y, ny) = nums.items()
        final = say("numbers", x=x, nx=_fmt(nx), y=y, ny=_fmt(ny), a=q.answer)
    elif where:
        final = say("found", t=where, a=q.answer)
    else:
        final = say("both", x=entities[0], y=entities[1], a=q.answer)
    turns.append(f"<think>{final}</think><answer>{grammar.escape(q.answer)}</answer>")
    pairs.append(("answer", q.answer))
    why = "both compared entities read" if len(nums) == 2 else f"answer read in the passage on {where}"
    return Discovery(turns, pairs, f"{why} after {len(path)} text search(es)")


def _in_kb(q: Question, index) -> bool:
    """Whether some passage states the answer at all (a BM25 look-up; True when it cannot tell)."""
    store = getattr(index, "store", None)
    if store is None or q.problem_type == "Numerical":
        return True
    labels = [lab for lab, _ in store.bm25(" ".join(str(a) for a in (q.answer, *q.answer_eval)), 50)]
    return bool(labels) and any(_holds(q, p.title, p.text) for p in store.passages_by_label(labels).values())


def discover_turns(q: Question, index, cfg, perceptions, search_cache: dict | None = None, max_text_searches: int = 3,
                   beam: int = 6, count_tokens: Callable[[str], int] | None = None,
                   failures: list | None = None) -> Discovery | None:
    """The shortest trajectory whose retrieved text supports q's answer; None (reason appended to `failures`)."""
    def fail(reason: str) -> None:
        if failures is not None:
            failures.append(reason)

    # The loop's own Searcher: same hits, same trimming (given the same count_tokens), same cache.
    search = Searcher(index, cfg, count_tokens or (lambda s: len(s.split())), search_cache)
    images = [_read(search, "image_search", str(i), perceptions) for i in range(1, len(perceptions) + 1)]
    if not images or not all(s.hits for s in images):
        return fail("no image entity")
    entities = [s.hits[0][0] for s in images]
    compare = q.split == "Compare" and len(entities) >= 2
    # A trajectory the deployed loop would cut off (max_turns) teaches nothing it can use.
    depth = min(max_text_searches, cfg.loop.max_turns - len(images) - 1)
    if depth < (2 if compare else 1):
        return fail(f"max_turns {cfg.loop.max_turns} leaves no room for the text searches")
    terms, mentions = question_terms(q.problem), _Mentions(index)
    frontier, contradicted = [()], False
    for _ in range(depth):
        grown = []
        for node in frontier:
            for subject, via, said, query in _candidates(node, entities, terms, mentions, beam):
                path = node + (_read(search, "text_search", query, perceptions, subject, via, said),)
                verdict = _accept(q, images, path, entities, terms, compare)
                if verdict == "contradicted":
                    contradicted = True
                elif verdict:
                    return _write(q, images, path, verdict, entities)
                grown.append(path)
        frontier = grown[:beam]
    if contradicted:
        return fail("the numbers read contradict the answer")
    if not compare and not _in_kb(q, index):
        return fail("answer not in KB text")
    return fail(f"answer not found within {depth} searches")


def discovered_episode(q: Question, render, count_tokens, index, cfg, perceptions, search_cache: dict | None = None,
                       failures: list | None = None, **search_kw) -> tuple[Episode, object] | None:
    """Discover q's turns and replay them through the loop, as gold_episode does: (Episode, Trace) or None."""
    from ..data.gold import Teacher  # lazily: the same teacher gold_episode uses

    found = discover_turns(q, index, cfg, perceptions, search_cache, count_tokens=count_tokens, failures=failures,
                           **search_kw)
    if found is None:
        return None
    eps: list[Episode] = []
    tr = answer(q.problem, Teacher(render, count_tokens, found.turns), index, cfg, perceptions,
                search_cache=search_cache, episode_out=eps)
    if tr.answer != q.answer or [(h.action, h.argument) for h in tr.hops] != found.path:
        if failures is not None:
            failures.append("replay diverged from discovery")
        return None
    return eps[0], tr


def _kept(q: Question, tr, ep: Episode, require_support: bool) -> bool:
    gold = tuple(q.answer_eval) or (q.answer,)
    if not score(tr.answer, gold, q.problem_type) or any(h.action == "invalid" for h in tr.hops):
        return False  # a corrected invalid turn is still the policy's text: it would be taught
    if any(h.forced for h in tr.hops):
        return False  # the loop asked for that answer: SFT would teach waiting for the request
    if not require_support or q.split == "Compare":
        return True
    shown = " ".join(t for t, by_policy in ep.segments if not by_policy)
    return _holds(q, "", re.sub(r"\[\d+\] |\(image match [\d.]+\)", " ", shown))  # no lucky guesses


def rejection_sample(questions: Sequence[Question], generator, index, cfg,
                     perceptions_of: Callable[[Question], list], samples: int = 4, temperature: float = 0.8,
                     seed: int = 0, search_cache: dict | None = None,
                     require_support: bool = True) -> list[tuple[Question, Episode]]:
    """Sample episodes per question and keep its shortest correct one (at most one per question)."""
    hot = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, temperature=temperature))
    cache = {} if search_cache is None else search_cache
    out = []
    for q in questions:
        perc = list(perceptions_of(q))
        eps: list[Episode] = []
        traces = answer_many([q.problem] * samples, generator, index, hot, [perc] * samples,
                             [seed + j for j in range(samples)], cache, eps)
        kept = [ep for tr, ep in zip(traces, eps) if _kept(q, tr, ep, require_support)]
        if kept:
            out.append((q, min(kept, key=lambda e: (len(e.hops), len(e.transcript)))))
    return out


__all__ = ["Discovery", "discover_turns", "discovered_episode", "question_terms", "rejection_sample"]
