"""Synthesise checkable multi-hop questions from a KB folder: Bridge chains from an image entity through
triples and passages, and Compare questions over two image entities on a shared attribute."""
from __future__ import annotations

import hashlib
import io
import random
import re
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..index.kb import KnowledgeBase
from .questions import write_questions

_POP = re.compile(r"population of (?:about |over |approximately |around |nearly |more than |roughly )?"
                  r"(\d[\d.,]*)\s*(million|billion)", re.I)


def _dev(title: str, dev_fraction: float) -> bool:
    """Stable entity-level split: an entity and every question that starts from it share one side."""
    h = int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16)
    return (h % 1000) / 1000 < dev_fraction


def perturb(src: Path, dst: Path, rng: random.Random) -> None:
    """A question image is never the indexed file: crop 85-95%, resize, re-encode as JPEG."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        f = rng.uniform(0.85, 0.95)
        cw, ch = min(w, max(8, int(w * f))), min(h, max(8, int(h * f)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = im.crop((x, y, x + cw, y + ch))
        s = rng.uniform(0.8, 1.2)
        im = im.resize((max(8, int(cw * s)), max(8, int(ch * s))))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(65, 85))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())


def population(text: str) -> float | None:
    """Population stated in a passage, if it says 'population of N million/billion'.

    >>> population("It has a population of about 67.8 million people.")
    67800000.0
    """
    m = _POP.search(text)
    if not m:
        return None
    try:
        return float(m.group(1).replace(",", "")) * (1e6 if m.group(2).lower() == "million" else 1e9)
    except ValueError:
        return None


def _sides(pool: list[str], dev_fraction: float) -> list[list[str]]:
    """Split a pool of entity titles into its train and dev parts (pairs never straddle the split)."""
    return [[t for t in pool if not _dev(t, dev_fraction)], [t for t in pool if _dev(t, dev_fraction)]]


def _pairs(pool: list[str], rng: random.Random, rounds: int) -> list[tuple[str, str]]:
    """Distinct random pairs, each entity in at most `rounds` pairs."""
    out, seen = [], set()
    for _ in range(rounds):
        order = pool[:]
        rng.shuffle(order)
        for a, b in zip(order[::2], order[1::2]):
            key = tuple(sorted((a, b)))
            if key not in seen:
                seen.add(key)
                out.append((a, b))
    return out


def synthesize(kb_dir: str | Path, out_dir: str | Path, dev_fraction: float = 0.3, seed: int = 0,
               max_per_template: int | None = None, max_dev_per_template: int | None = 30) -> dict:
    """Write out_dir/train.jsonl, out_dir/dev.jsonl and out_dir/img/; returns counts per split and template."""
    kb = KnowledgeBase(kb_dir, check_images=False)
    out = Path(out_dir)
    rng = random.Random(seed)
    by_title = {}
    for p in kb.passages:
        by_title.setdefault(p.title, p)
    rel = defaultdict(dict)
    for t in kb.triples:
        rel[t.relation].setdefault(t.subject, t.object)
    images = defaultdict(list)
    for im in kb.images:
        if im.title in by_title:
            images[im.title].append(im)
    if not images:
        raise InputError(f"no image in {kb.root} has a passage with its title", path=kb.root,
                         fix="give images.jsonl titles that match passages.jsonl titles")
    qs: dict[str, list] = {"train": [], "dev": []}
    counter = defaultdict(int)

    def add(template, split_type, ptype, problem, imgs, answer, answer_eval, chain, gold_passages):
        side = "dev" if any(_dev(t, dev_fraction) for t in chain[: len(imgs)]) else "train"
        if len(imgs) > 1 and len({_dev(t, dev_fraction) for t in chain[: len(imgs)]}) > 1:
            return  # a comparison that straddles the split would leak entities
        key = (side, template)
        cap = max_dev_per_template if side == "dev" else max_per_template
        if cap and counter[key] >= cap:
            return
        counter[key] += 1
        qid = f"{side[0]}-{template}-{counter[key]:04d}"
        paths = []
        for j, im in enumerate(imgs):
            rel_path = f"img/{qid}-{j + 1}.jpg"
            perturb(kb.image_path(im), out / rel_path, rng)
            paths.append(rel_path)
        qs[side].append({"id": qid, "problem": problem, "images": paths, "answer": answer,
                         "answer_eval": answer_eval, "split": split_type, "problem_type": ptype,
                         "template": template, "gold_entities": chain[: len(imgs)] if len(imgs) > 1 else chain[:1],
                         "chain": chain, "gold_passages": gold_passages})

    titles = sorted(images)
    rng.shuffle(titles)
    for title in titles:
        im = rng.choice(images[title])
        p = by_title[title]
        cap = rel["capital"].get(title)
        if cap and cap in p.text:
            add("capital", "Bridge", "String", "<image> What is the capital of the country or region whose flag "
                "or picture is shown?", [im], cap, [cap], [title, cap], [p.id])
        parent = rel["part of"].get(title)
        pcap = rel["capital"].get(parent) if parent else None
        if parent and parent != title and parent in by_title and pcap and pcap in by_title[parent].text \
                and parent in p.text:
            add("parent-capital", "Bridge", "String", "<image> The place whose flag is shown is part of a larger "
                "country. What is the capital of that country?", [im], pcap, [pcap], [title, parent, pcap],
                [p.id, by_title[parent].id])
        pop = population(p.text)
        if pop:
            add("population", "Bridge", "Numerical", "<image> About how many people live in the country whose "
                "flag is shown?", [im], f"{pop:.0f}", [round(pop * 0.9), round(pop * 1.1)], [title], [p.id])
        cat = rel["category"].get(title)
        if cat and title.lower() not in cat.lower() and cat.lower() in p.text.lower():
            add("category", "Bridge", "String", "<image> In the picture collection, which category does the "
                "thing shown belong to?", [im], cat, [cat], [title, cat], [p.id])
    # Compare: pairs of entities that differ on a shared attribute.
    for attr, template, question in (
            ("part of", "continent", "<image><image> Which of these two places is part of {value}?"),
            ("category", "pick-category", "<image><image> Which of these two pictures shows one of the {value}?")):
        for side_pool in _sides([t for t in titles if t in rel[attr]], dev_fraction):
            for a, b in _pairs(side_pool, rng, rounds=3):
                if rel[attr][a] == rel[attr][b]:
                    continue
                value = rel[attr][a]
                pair = [a, b] if rng.random() < 0.5 else [b, a]
                add(template, "Compare", "String", question.format(value=value),
                    [rng.choice(images[t]) for t in pair], a, [a], pair + [value], [by_title[t].id for t in pair])
    pops = [(t, population(by_title[t].text)) for t in titles]
    pops = [(t, v) for t, v in pops if v]
    value_of = dict(pops)
    for side_pool in _sides([t for t, _ in pops], dev_fraction):
        for a, b in _pairs(side_pool, rng, rounds=4):
            va, vb = value_of[a], value_of[b]
            if va == vb:
                continue
            winner = a if va > vb else b
            add("larger-population", "Compare", "String", "<image><image> Which of these two countries has the "
                "larger population?", [rng.choice(images[a]), rng.choice(images[b])], winner, [winner], [a, b],
                [by_title[a].id, by_title[b].id])
    counts = {side: write_questions(out / f"{side}.jsonl", rows) for side, rows in qs.items()}
    by_template = defaultdict(dict)
    for (side, template), n in sorted(counter.items()):
        by_template[side][template] = n
    return {"counts": counts, "by_template": dict(by_template), "out": str(out)}
