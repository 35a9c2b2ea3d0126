"""Synthesise checkable multi-hop questions from any KB folder, by the template table (data/templates.py).

Facts come from triples of any relation name and, for every entity, from its own passage (data/facts.py), so a
KB with passages and image titles alone yields questions too. Bridge chains go image -> entity -> (a bridge entity
named in its passage ->) a fact; Compare questions pair two image entities on a shared attribute. Wordings are
drawn in turn from the template's list, with the KB's own type words ("this moon"); image domains named in
`holdout` (by name, e.g. "astronomy" for ids `astro:...`; see data/domains.py) never reach train/dev and are written as an out-of-domain set
asked with the held-out wordings only."""
from __future__ import annotations

import hashlib
import io
import random
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import InputError
from ..index.kb import KnowledgeBase
from ..scoring import normalize
from .domains import domain_of
from .facts import Fact, TitleIndex, describe_number, mine, short_name, triple_facts, type_word
from .questions import write_questions
from .templates import TEMPLATES, THESE, THIS, fill, plural

_KIND_TEMPLATE = {"entity": "fact", "string": "fact", "number": "number", "year": "year"}
# Relations that place an entity: a question names them by the place's own type ("the country of this tower").
PLACE_RELATIONS = {"location", "part of", "continent", "native region"}
# The type words a place relation may be named by; anything else keeps the relation's own name.
PLACE_TYPES = {"country", "city", "town", "village", "state", "region", "continent", "island", "province", "territory",
               "county", "nation", "kingdom", "republic", "archipelago", "peninsula", "planet", "galaxy",
               "constellation", "moon", "star", "district", "prefecture", "department", "oblast", "municipality",
               "ocean", "sea", "river", "lake", "mountain", "desert", "subregion", "capital", "cluster"}


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


def _named(title: str) -> tuple[str, list]:
    """An entity as an answer: its display name, and both spellings accepted."""
    short = short_name(title)
    return short, [short] + ([title] if short != title else [])


def _answer(f: Fact) -> tuple[str, list, str]:
    """(answer, answer_eval, problem_type) of a fact."""
    if f.kind == "number":
        v = float(f.value)
        return describe_number(v), [round(v * 0.9, 6), round(v * 1.1, 6)], "Numerical"
    if f.kind == "year":
        return f.value, [f.value], "Time"
    return (*_named(f.value), "String")


class _Writer:
    """Collects questions per side, balancing wordings and capping each (template, relation)."""

    def __init__(self, kb: KnowledgeBase, out: Path, rng: random.Random, caps: dict):
        self.kb, self.out, self.rng, self.caps = kb, out, rng, caps
        self.rows: dict[str, list] = defaultdict(list)
        self.count: Counter = Counter()
        self.per_rel: Counter = Counter()
        self.order: dict = {}

    def wording(self, side: str, template: str) -> tuple[int, str]:
        t = TEMPLATES[template]
        pool = t.heldout if side == "ood" else t.wordings
        key = (side, template)
        if key not in self.order:
            self.order[key] = self.rng.sample(range(len(pool)), len(pool))
        i = self.order[key][self.count[key] % len(pool)]
        return i, pool[i]

    def add(self, side: str, template: str, relation: str, images: list, slots: dict, answer: str, answer_eval: list,
            ptype: str, chain: list, gold_passages: list, domain: str) -> bool:
        cap = self.caps.get(side)
        if cap and self.per_rel[(side, template, relation)] >= cap:
            return False
        t = TEMPLATES[template]
        wi, wording = self.wording(side, template)
        self.count[(side, template)] += 1
        self.per_rel[(side, template, relation)] += 1
        n = self.count[(side, template)]
        qid = f"{side[0]}-{template}-{n:04d}"
        paths = []
        for j, im in enumerate(images):
            rel_path = f"img/{qid}-{j + 1}.jpg"
            perturb(self.kb.image_path(im), self.out / rel_path, self.rng)
            paths.append(rel_path)
        marker = "<image>" * len(images)
        slots = {**slots, "ans": answer}
        self.rows[side].append({
            "id": qid, "problem": f"{marker} {fill(wording, slots)}", "images": paths, "answer": answer,
            "answer_eval": answer_eval, "split": t.split, "problem_type": ptype, "template": template,
            "relation": relation, "wording": wi, "domain": domain, "gold_entities": chain[: max(1, len(images))],
            "chain": chain, "gold_passages": gold_passages, "slots": slots})
        return True


def synthesize(kb_dir: str | Path, out_dir: str | Path, dev_fraction: float = 0.3, seed: int = 0,
               max_per_template: int | None = 150, max_dev_per_template: int | None = 10,
               holdout: tuple[str, ...] = (), max_ood_per_template: int | None = 25) -> dict:
    """Write out_dir/{train,dev}.jsonl (and ood.jsonl for held-out domains) with images under out_dir/img/.
    The caps count questions per (template, relation) and side. Returns counts per side and template."""
    kb = KnowledgeBase(kb_dir, check_images=False)
    out = Path(out_dir)
    rng = random.Random(seed)
    by_title = {}
    for p in kb.passages:
        by_title.setdefault(p.title, p)
    images, domains = defaultdict(list), defaultdict(set)
    for im in kb.images:
        if im.title in by_title:
            images[im.title].append(im)
            domains[im.title].add(domain_of(im.id))
    if not images:
        raise InputError(f"no image in {kb.root} has a passage with its title", path=kb.root,
                         fix="give images.jsonl titles that match passages.jsonl titles")
    titles = TitleIndex(by_title)
    extra = defaultdict(list)
    for f in triple_facts(kb.triples, {t: p.text for t, p in by_title.items()}, set(by_title)):
        extra[f.subject].append(f)
    cache: dict[str, dict[str, Fact]] = {}

    def facts(title: str) -> dict[str, Fact]:
        if title not in cache:
            got = {f.relation: f for f in extra.get(title, [])}  # triples first: the KB's own relation names
            for f in mine(title, by_title[title].text, titles):
                got.setdefault(f.relation, f)
            cache[title] = got
        return cache[title]

    held = set(holdout)
    trained_titles = {t for t, ds in domains.items() if ds - held}

    def side_of(names: list[str]) -> str | None:
        """ood when only held-out domains show every entity, train/dev by entity hash when training domains show
        them all, None for a mix (a comparison must not straddle)."""
        shown = [n in trained_titles for n in names]
        if not any(shown):
            return "ood"
        if not all(shown):
            return None
        sides = {_dev(n, dev_fraction) for n in names}
        return None if len(sides) > 1 else ("dev" if sides.pop() else "train")

    def pic(title: str, side: str):
        """A KB image of the entity from the side's own domains (an held-out image never reaches training)."""
        return rng.choice([im for im in images[title] if (domain_of(im.id) in held) == (side == "ood")])

    kinds = {}
    for t in images:
        kinds[t] = type_word(by_title[t].text, t)

    def noun(f: Fact) -> str:
        """How a question names a relation: a place relation by the type of the place it points to."""
        if f.relation in PLACE_RELATIONS and f.kind == "entity" and f.value in by_title:
            t = type_word(by_title[f.value].text, f.value)
            return t if t in PLACE_TYPES else f.relation
        return f.relation

    fallback = {}
    for d in {d for ds in domains.values() for d in ds}:
        common = Counter(kinds[t] for t in images if d in domains[t] and kinds[t]).most_common(1)
        fallback[d] = common[0][0] if common else "thing"
    for t in images:
        kinds[t] = kinds[t] or fallback[next(iter(domains[t]))]
    w = _Writer(kb, out, rng, {"train": max_per_template, "dev": max_dev_per_template, "ood": max_ood_per_template})
    order = sorted(images)
    rng.shuffle(order)
    for a in order:  # Bridge: facts of the entity shown, and facts of a bridge entity its passage names
        side = side_of([a])
        if side is None:
            continue
        this = fill(rng.choice(THIS), {"type": kinds[a]})
        dom = domain_of(pic(a, side).id)
        for f in list(facts(a).values()):
            ans, ev, ptype = _answer(f)
            tmpl = _KIND_TEMPLATE[f.kind]
            slots = {"this": this, "type": kinds[a], "rel": noun(f), "verb": f.verb, "A": a, "va": ans}
            w.add(side, tmpl, f.relation, [pic(a, side)], slots, ans, ev, ptype, [a], [by_title[a].id], dom)
            m = f.value if f.kind == "entity" and f.value in by_title else None
            if m is None:
                continue
            for g in facts(m).values():
                if g.kind not in ("entity", "string", "year") or normalize(g.value) in (normalize(a), normalize(m)):
                    continue
                ans2, ev2, ptype2 = _answer(g)
                slots2 = {"this": this, "type": kinds[a], "rel": noun(f), "rel2": g.relation, "A": a, "M": m}
                w.add(side, "bridge", f"{f.relation}/{g.relation}", [pic(a, side)], slots2, ans2, ev2,
                      ptype2, [a, m, ans2], [by_title[a].id, by_title[m].id], dom)
    _compare(w, order, pic, facts, kinds, side_of, by_title, domains, rng, noun)
    counts = {side: write_questions(out / f"{side}.jsonl", w.rows.get(side, [])) for side in
              (("train", "dev", "ood") if held else ("train", "dev"))}
    by_template = defaultdict(dict)
    for (side, template), n in sorted(w.count.items()):
        by_template[side][template] = n
    return {"counts": counts, "by_template": dict(by_template), "out": str(out)}


def _compare(w: _Writer, order, pic, facts, kinds, side_of, by_title, domains, rng, noun,
             rounds: int = 4) -> None:
    """Compare questions over pairs of entities of one side that share an attribute; yes and no alternate."""
    by_rel: dict[tuple[str, str], list[str]] = defaultdict(list)
    for t in order:
        for rel, f in facts(t).items():
            by_rel[(rel, f.kind)].append(t)
    for (rel, kind), pool in sorted(by_rel.items()):
        if len(pool) < 2:
            continue
        pairs, seen = [], set()
        for _ in range(max(rounds, min(24, 160 // len(pool)))):  # a small pool is paired more often
            shuffled = pool[:]
            rng.shuffle(shuffled)
            pairs += list(zip(shuffled[::2], shuffled[1::2]))
        if kind in ("entity", "string"):  # pairs that share the value are rare by chance: add them on purpose
            groups = defaultdict(list)
            for t in pool:
                groups[normalize(facts(t)[rel].value)].append(t)
            same = [p for members in groups.values() for p in zip(members[::2], members[1::2])]
            rng.shuffle(same)
            differ = [p for p in pairs if normalize(facts(p[0])[rel].value) != normalize(facts(p[1])[rel].value)]
            pairs = [p for two in zip(same, differ) for p in two] + differ[len(same):]
        for a, b in pairs:
            if (a, b) in seen or (b, a) in seen or a == b:
                continue
            seen.add((a, b))
            side = side_of([a, b])
            if side is None:
                continue
            if rng.random() < 0.5:
                a, b = b, a
            fa, fb = facts(a)[rel], facts(b)[rel]
            types = plural(kinds[a]) if kinds[a] == kinds[b] else "things"
            base = {"these": fill(rng.choice(THESE), {"types": types}), "types": types, "rel": noun(fa), "A": a,
                    "B": b, "type": kinds[a]}
            imgs = [pic(a, side), pic(b, side)]
            gp, dom = [by_title[a].id, by_title[b].id], domain_of(imgs[0].id)
            if kind == "number":
                va, vb = float(fa.value), float(fb.value)
                if max(va, vb) < 1.05 * min(va, vb):
                    continue  # too close to call from rounded figures
                win = a if va > vb else b
                w.add(side, "more", rel, imgs, {**base, "va": describe_number(va), "vb": describe_number(vb)},
                      *_named(win), "String", [a, b], gp, dom)
            elif kind in ("entity", "string"):
                same_value = normalize(fa.value) == normalize(fb.value)
                w.add(side, "same", rel, imgs, {**base, "va": short_name(fa.value), "vb": short_name(fb.value),
                                                "branch": "yes" if same_value else "no"},
                      "yes" if same_value else "no", ["yes" if same_value else "no"], "String", [a, b], gp, dom)
                if not same_value:
                    ans = rng.choice([a, b])
                    value = short_name((fa if ans == a else fb).value)
                    w.add(side, "pick", rel, imgs, {**base, "va": short_name(fa.value), "value": value,
                                                    "branch": "yes" if ans == a else "no"},
                          *_named(ans), "String", [a, b, value], gp, dom)
