"""The multi-hop loop shared by `ask`, `eval` and the trainer: perceive, then search or answer, turn by turn."""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import grammar
from .config import Config
from .types import Hop, Trace

Event = Callable[[str, object], None]
FORCED = "<answer>"  # what the loop writes to open a forced final answer


@dataclass(frozen=True)
class Perception:
    """What the policy learns of one input image: labels and OCR as text, plus the embedding for image search."""

    text: str
    embedding: np.ndarray | None = None
    labels: tuple = ()
    ocr: str = ""


def perceive(images: Sequence[str | Path], image_encoder, ocr: bool = True, top_k: int = 3) -> list[Perception]:
    """Run the vision tower on each input image."""
    out = []
    if not images:
        return out
    described = image_encoder.describe([Path(p) for p in images], top_k=top_k)
    for p, (emb, labels) in zip(images, described):
        text_in_image = ""
        if ocr:
            from .encoders.ocr import ocr_text

            text_in_image = ocr_text(Path(p))
        parts = ["looks like: " + ", ".join(f"{name} ({prob:.2f})" for name, prob in labels)]
        if text_in_image:
            parts.append(f"text in image: {text_in_image[:200]}")
        out.append(Perception("; ".join(parts), emb, tuple(labels), text_in_image))
    return out


@dataclass
class Episode:
    """Mutable state of one episode; the trainer reads `segments` to mask what the loop wrote."""

    prompt: str
    segments: list = field(default_factory=list)  # (text, written_by_policy)
    hops: list = field(default_factory=list)
    answer: str | None = None
    evaluated: int = 0
    generated: int = 0
    draws: list = field(default_factory=list)  # per policy turn: (drawn tokens, sampler log-probs), () unrecorded

    @property
    def transcript(self) -> str:
        return "".join(t for t, _ in self.segments)

    def add(self, text: str, by_policy: bool) -> None:
        self.segments.append((text, by_policy))


def _norm(s: str) -> str:
    return re.sub(r"[^\w ]", " ", s.lower())


class Searcher:
    """Runs the loop's searches against an index, caching results per (kind, argument)."""

    def __init__(self, index, cfg: Config, count_tokens: Callable[[str], int], cache: dict | None = None):
        self.index, self.cfg, self.count = index, cfg, count_tokens
        self.cache = {} if cache is None else cache

    def __call__(self, kind: str, arg: str, perceptions: Sequence[Perception]) -> tuple[list[str], list[dict]]:
        """Information lines for the policy and result records for the trace."""
        k = self.cfg.loop.image_top_k if kind == "image_search" else self.cfg.loop.top_k
        if kind == "image_search":
            emb = perceptions[int(arg) - 1].embedding
            # Keyed by the embedding's bytes, not the object's id(): ids are reused once a question's
            # perceptions are freed, and a shared cache would then answer for another image.
            key = (kind, hashlib.sha1(np.ascontiguousarray(emb).tobytes()).hexdigest())
            if key not in self.cache:
                self.cache[key] = self.index.search_image(perceptions[int(arg) - 1].embedding, k)
            hits = self.cache[key]
            texts = [(f"{h.title} (image match {h.score:.2f})", h.passage_head or h.caption) for h in hits]
            recs = [{"id": h.id, "title": h.title, "score": round(h.score, 4), "text": h.passage_head} for h in hits]
        else:
            key = (kind, arg)
            if key not in self.cache:
                self.cache[key] = self.index.search_text(arg, k)
            hits = self.cache[key]
            texts = [(h.title, h.passage.text) for h in hits]
            recs = [{"id": h.passage.id, "title": h.title, "score": round(h.score, 4), "text": h.passage.text}
                    for h in hits]
        per = max(16, self.cfg.loop.info_tokens // max(len(texts), 1))
        lines = [f"[{i}] {grammar.escape(t)}: {grammar.escape(grammar.trim_to_tokens(x, per, self.count))}"
                 for i, (t, x) in enumerate(texts, 1)]
        return lines, recs


def _evidence(answer: str | None, hops: list[Hop]) -> tuple:
    """The retrieved items the answer rests on: those whose text names it, else the last search's best hit."""
    if not answer:
        return ()
    a = _norm(answer).strip()
    found = [r for h in hops for r in h.results if a and a in _norm(r.get("title", "") + " " + r.get("text", ""))]
    if not found:
        last = [h for h in hops if h.results]
        found = list(last[-1].results[:1]) if last else []
    seen, out = set(), []
    for r in found:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append({"id": r["id"], "title": r["title"], "score": r["score"]})
    return tuple(out[:3])


def _turn(ep: Episode, prefill: str):
    """One policy turn as a request to the driver: it is sent back the Generation of the prompt so far."""
    g = yield ep.prompt + ep.transcript + prefill
    ep.evaluated += g.evaluated_tokens
    ep.generated += g.completion_tokens
    ep.draws.append((g.tokens, g.logprobs))
    return g, grammar.close_action(prefill + g.text)


def answer(question: str, generator, index, cfg: Config, perceptions: Sequence[Perception] = (),
           mode: str = "agent", on_event: Event | None = None, seed: int | None = None,
           search_cache: dict | None = None, episode_out: list | None = None) -> Trace:
    """Answer one question: mode agent (the policy plans), pipeline (fixed chain) or direct (no retrieval)."""
    steps = _episode(question, generator, index, cfg, perceptions, mode, on_event, search_cache, episode_out)
    try:
        prompt = next(steps)
        while True:
            prompt = steps.send(generator.generate(prompt, grammar.STOP, cfg.loop.max_new_tokens,
                                                   cfg.loop.temperature, seed))
    except StopIteration as done:
        return done.value


def answer_many(questions: Sequence[str], generator, index, cfg: Config,
                perceptions: Sequence[Sequence[Perception]], seeds: Sequence[int | None],
                search_cache: dict | None = None, episode_out: list | None = None) -> list[Trace]:
    """Run several agent episodes side by side (e.g. a GRPO group): each turn, the episodes still going are decoded
    together by `generator.generate_many`, episode i in KV slot i. Episodes stay independent: each reads only its
    own searches and samples with its own seed. Generators without generate_many run the episodes one by one."""
    if not hasattr(generator, "generate_many"):
        return [answer(q, generator, index, cfg, p, seed=s, search_cache=search_cache, episode_out=episode_out)
                for q, p, s in zip(questions, perceptions, seeds)]
    eps: list = [[] for _ in questions]
    runs = [_episode(q, generator, index, cfg, p, "agent", None, search_cache, eps[i])
            for i, (q, p) in enumerate(zip(questions, perceptions))]
    traces: list = [None] * len(runs)
    pending = {i: next(r) for i, r in enumerate(runs)}
    while pending:
        slots = sorted(pending)
        outs = generator.generate_many([pending[i] for i in slots], grammar.STOP, cfg.loop.max_new_tokens,
                                       cfg.loop.temperature, [seeds[i] for i in slots], slots)
        for i, g in zip(slots, outs):
            try:
                pending[i] = runs[i].send(g)
            except StopIteration as done:
                traces[i] = done.value
                del pending[i]
    if episode_out is not None:
        episode_out.extend(e[0] for e in eps)
    return traces


def _episode(question: str, generator, index, cfg: Config, perceptions: Sequence[Perception], mode: str,
             on_event: Event | None, search_cache: dict | None, episode_out: list | None):
    """The loop as a coroutine: yields each prompt the policy must continue, is sent its Generation, returns the
    Trace. `answer` drives one; `answer_many` drives a group in lockstep."""
    t_start = time.perf_counter()
    emit = on_event or (lambda kind, payload: None)
    search = Searcher(index, cfg, generator.count_tokens, search_cache)
    ep = Episode(generator.render(grammar.messages(question, [p.text for p in perceptions])))
    n_img = len(perceptions)

    def run_search(kind: str, arg: str, by_policy_text: str | None, think: str = "", g=None, t0=None):
        lines, recs = search(kind, arg, perceptions)
        if by_policy_text is None:  # pipeline: the loop itself writes the action
            ep.add(f"<{kind}>{grammar.escape(arg)}</{kind}>", False)
        ep.add(grammar.information(lines), False)
        hop = Hop(kind, arg, tuple(recs), round(time.perf_counter() - (t0 or time.perf_counter()), 3),
                  g.evaluated_tokens if g else 0, g.completion_tokens if g else 0, think, by_policy_text or "")
        ep.hops.append(hop)
        emit("hop", hop)

    if mode == "pipeline":
        entities = []
        for i in range(1, n_img + 1):
            t0 = time.perf_counter()
            run_search("image_search", str(i), None, t0=t0)
            if ep.hops[-1].results:
                entities.append(ep.hops[-1].results[0]["title"])
        t0 = time.perf_counter()
        q = grammar.user_message(question, []).replace("Question: ", "")
        run_search("text_search", " ".join(entities + [q]), None, t0=t0)
    if mode in ("pipeline", "direct"):
        t0 = time.perf_counter()
        g, text = yield from _turn(ep, "<answer>")
        act = grammar.parse_action(text, n_img)
        ep.add(text, True)
        ep.answer = act.argument if act.kind == "answer" else (g.text.strip() or None)
        hop = Hop("answer", ep.answer or "", (), round(time.perf_counter() - t0, 3), g.evaluated_tokens,
                  g.completion_tokens, "", text)
        ep.hops.append(hop)
        emit("hop", hop)
    else:
        corrected, exhausted = False, False
        for _ in range(cfg.loop.max_turns):
            t0 = time.perf_counter()
            g, text = yield from _turn(ep, "")
            act = grammar.parse_action(text, n_img)
            ep.add(text, True)
            if act.kind == "answer":
                ep.answer = act.argument
                hop = Hop("answer", act.argument, (), round(time.perf_counter() - t0, 3), g.evaluated_tokens,
                          g.completion_tokens, act.think, text)
                ep.hops.append(hop)
                emit("hop", hop)
                break
            if act.kind == "invalid":
                hop = Hop("invalid", act.argument, (), round(time.perf_counter() - t0, 3), g.evaluated_tokens,
                          g.completion_tokens, act.think, text)
                ep.hops.append(hop)
                emit("hop", hop)
                if corrected:
                    break  # one corrective message only: the episode ends unanswered
                corrected = True
                ep.add(grammar.information([grammar.CORRECTION]), False)
                continue
            run_search(act.kind, act.argument, text, act.think, g, t0)
        else:
            exhausted = True
        if exhausted and ep.answer is None and cfg.loop.final_answer:
            # Budget forcing: the turns ran out, so the loop opens the answer and the policy must complete it
            # from what it has read. The opening tag is the loop's; only the completion is the policy's.
            t0 = time.perf_counter()
            ep.add(grammar.information([grammar.LAST_TURN]), False)
            g, text = yield from _turn(ep, FORCED)
            ep.add(FORCED, False)
            ep.add(text[len(FORCED):], True)
            act = grammar.parse_action(text, n_img)
            ep.answer = (act.argument if act.kind == "answer" else g.text.strip()) or None
            hop = Hop("answer", ep.answer or "", (), round(time.perf_counter() - t0, 3), g.evaluated_tokens,
                      g.completion_tokens, "", text, forced=True)
            ep.hops.append(hop)
            emit("hop", hop)
    trace = Trace(question=question, images=(), hops=tuple(ep.hops), answer=ep.answer,
                  evidence=_evidence(ep.answer, ep.hops),
                  tokens={"prompt": generator.count_tokens(ep.prompt + ep.transcript), "evaluated": ep.evaluated,
                          "generated": ep.generated},
                  timings={"total_s": round(time.perf_counter() - t_start, 3)},
                  models={"policy": generator.id}, transcript=ep.transcript)
    if episode_out is not None:
        episode_out.append(ep)
    emit("answer", trace)
    return trace
