"""Facts for question synthesis, from any KB: its triples (any relation name) and, when it has none, facts mined
from the passages themselves (numbers with units, years, "located in / part of / capital is / designed by"-style
statements, the entity's type word). Every fact carries the sentence it was read from, so each synthesised answer
is checked in the very text a chain reads."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..scoring import normalize


@dataclass(frozen=True)
class Fact:
    """One checkable statement about a KB entity. kind: entity (value is another KB title, so a chain can go on
    from it), string, number (value is a float as text) or year."""

    subject: str
    relation: str  # as a noun phrase: "capital", "constellation", "height in metres", "year of discovery"
    value: str
    kind: str
    evidence: str = ""
    verb: str = ""  # years: the participle a question uses ("discovered")


# Statements whose object is another KB entity: (relation noun, pattern with the object's start as group 1).
# A pattern only finds where the object starts; the object itself is the longest KB title found there.
ENTITY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("capital", r"\b(?:[Ii]ts|[Tt]he) capital(?: city)?(?: and (?:largest|most populous) city)? is ()"),
    ("capital", r"\bwith (?:[Ii]ts|[Tt]he) capital (?:at|in) ()"),
    ("constellation", r"\bin the constellation(?: of)? ()"),
    ("host planet", r"\b(?:moons?|satellites?) of (?:the (?:planet|dwarf planet) )?()"),
    ("host planet", r"\borbits (?:the (?:planet|dwarf planet) )?()"),
    ("country of origin", r"\b(?:originated|originating|originates|first domesticated|domesticated|invented|developed)"
                          r" (?:in|from) (?:the )?()"),
    ("part of", r"\b(?:is|are|was|forms?) (?:a |an )?part of (?:the )?()"),
    ("location", r"\b(?:located|situated|found|lies|lying|stands|standing|sited|based) (?:in|on|at) (?:the )?()"),
    ("native region", r"\bnative to (?:the )?()"),
    ("designer", r"\bdesigned by (?:the )?(?:\w+ )?(?:architect |sculptor |engineer )?()"),
    ("builder", r"\bbuilt by (?:the )?()"),
    ("founder", r"\bfounded by (?:the )?()"),
    ("discoverer", r"\bdiscovered by (?:the )?(?:\w+ )?(?:astronomer )?()"),
    ("namesake", r"\bnamed (?:after|for) (?:the )?(?:(?:\w+ )?(?:god|goddess|hero|king|queen|emperor|saint|figure|"
                 r"astronomer|scientist|explorer|mathematician|physicist) )?()"),
    ("official language", r"\bofficial languages? (?:is|are) ()"),
    ("largest city", r"\b(?:[Ii]ts|[Tt]he) largest city is ()"),
    ("birthplace", r"\bborn in ()"),
    ("continent", r"\b(?:country|state|nation|island|territory) in (?:\w+ ){0,2}?()"),
)
# Read in the first sentence only, where a bare "in X" places the entity ("a mausoleum in Agra, India").
FIRST_SENTENCE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("location", r"\b(?:in|on) ()(?=[A-Z])"),
)
# Relations whose value may be a plain name when no KB entry has it ("designed by Frederic Bartholdi").
NAMES_OK = {"constellation", "designer", "builder", "founder", "discoverer", "namesake", "capital", "location",
            "native region", "host planet"}
# "an Italian dish": a demonym before the type word names the country of origin.
DEMONYMS = {"American": "United States", "British": "United Kingdom", "English": "England", "French": "France",
            "German": "Germany", "Italian": "Italy", "Spanish": "Spain", "Portuguese": "Portugal", "Dutch": "Netherlands",
            "Greek": "Greece", "Russian": "Russia", "Chinese": "China", "Japanese": "Japan", "Korean": "Korea",
            "Indian": "India", "Mexican": "Mexico", "Brazilian": "Brazil", "Egyptian": "Egypt", "Turkish": "Turkey",
            "Persian": "Iran", "Iranian": "Iran", "Swiss": "Switzerland", "Swedish": "Sweden", "Norwegian": "Norway",
            "Danish": "Denmark", "Polish": "Poland", "Austrian": "Austria", "Belgian": "Belgium", "Irish": "Ireland",
            "Scottish": "Scotland", "Canadian": "Canada", "Australian": "Australia", "Peruvian": "Peru",
            "Argentine": "Argentina", "Thai": "Thailand", "Vietnamese": "Vietnam", "Indonesian": "Indonesia",
            "Hungarian": "Hungary", "Czech": "Czech Republic", "Finnish": "Finland", "Arab": "Arabia",
            "Ethiopian": "Ethiopia", "Moroccan": "Morocco", "Israeli": "Israel", "Filipino": "Philippines"}
_ORDINALS = {w: i for i, w in enumerate("zeroth first second third fourth fifth sixth seventh eighth ninth tenth "
                                        "eleventh twelfth".split())}
# Statements with a plain string value.
STRING_PATTERNS: tuple[tuple[str, str], ...] = (
    ("family", r"\bfamily ([A-Z][a-z]+idae)\b"),
    ("genus", r"\bgenus ([A-Z][a-z]{3,})\b"),
    ("order", r"\border ([A-Z][a-z]+(?:formes|ptera|dea|a))\b"),
)
_NUM = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
_ABOUT = r"(?:about |approximately |around |nearly |roughly |some |over |more than |almost |an estimated )?"
_SCALE = r"(?:\s*(million|billion|thousand))?"
# Numeric attributes: (relation, pattern: group 1 the number, group 2 an optional scale word).
NUMBER_PATTERNS: tuple[tuple[str, str], ...] = (
    ("population", rf"\bpopulation of {_ABOUT}{_NUM}{_SCALE}"),
    ("population", rf"\b{_ABOUT}{_NUM}{_SCALE} (?:people|inhabitants|residents)\b"),
    ("distance from Earth in light-years", rf"\b{_ABOUT}{_NUM}{_SCALE}\s*(?:light[- ]years?|ly)\b(?: \([^)]*\))? (?:away )?from (?:the )?Earth"),
    ("distance from Earth in light-years", rf"\(\s*{_ABOUT}{_NUM}{_SCALE}\s*(?:light[- ]years?|ly)\)\s*(?:away )?from (?:the )?Earth"),
    ("height in metres", rf"\b(?:height|elevation) of {_ABOUT}{_NUM}{_SCALE}\s*(?:m|metres|meters)\b"),
    ("height in metres", rf"\b{_NUM}{_SCALE}\s*(?:m|metres|meters)(?: \([^)]*\))? (?:tall|high)\b"),
    ("area in square kilometres", rf"\barea of {_ABOUT}{_NUM}{_SCALE}\s*(?:km2|km²|square kilometres|square kilometers|sq km)"),
    ("diameter in kilometres", rf"\bdiameter of {_ABOUT}{_NUM}{_SCALE}\s*(?:km|kilometres|kilometers)\b"),
    ("length in kilometres", rf"\b{_NUM}{_SCALE}\s*(?:km|kilometres|kilometers)(?: \([^)]*\))? long\b"),
    ("weight in kilograms", rf"\bweigh(?:s|ing)? (?:up to |about |around |as much as |between |approximately )?"
                            rf"{_NUM}{_SCALE}\s*(?:kg|kilograms)\b"),
    ("apparent magnitude", rf"\bapparent (?:visual )?magnitude (?:is|of) {_ABOUT}{_NUM}"),
    ("radius in kilometres", rf"\bradius of {_ABOUT}{_NUM}{_SCALE}\s*(?:km|kilometres|kilometers)\b"),
    ("orbital period in days", rf"\borbital period of {_ABOUT}{_NUM}{_SCALE}\s*(?:Earth )?days\b"),
    ("lifespan in years", rf"\b(?:lifespan|life expectancy) of (?:up to )?{_ABOUT}{_NUM}{_SCALE}\s*years\b"),
    ("speed in km/h", rf"\b(?:speeds?|run|running|fly|flying|swim|swimming) (?:of |at )?(?:up to )?{_ABOUT}{_NUM}"
                      rf"{_SCALE}\s*(?:km/h|kilometres per hour|kilometers per hour)"),
)
_POSITION = re.compile(r"\bis the (first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth)"
                       r" (planet|moon|satellite) from (?:the )?([A-Z]\w+)")
_DEMONYM = re.compile(r"\b(?:is|are|was) (?:an?|the) (?:\w+ ){0,2}?(" + "|".join(sorted(DEMONYMS, key=len, reverse=True))
                      + r") ([a-z]+)")
# Years: (participle, relation noun) read from "<participle> ... in 1731".
YEAR_VERBS = {"founded": "year of founding", "established": "year of founding", "built": "year of construction",
              "completed": "year of completion", "discovered": "year of discovery", "dedicated": "year of dedication",
              "opened": "year of opening", "constructed": "year of construction", "invented": "year of invention",
              "first described": "year of first description", "launched": "year of launch",
              "erected": "year of construction", "formed": "year of formation", "created": "year of creation"}
_YEAR = re.compile(r"\b(" + "|".join(sorted(YEAR_VERBS, key=len, reverse=True)) +
                   r")\b[^.;]{0,60}?\b(?:in|on)\s+(?:(?:early |late |mid-)?(?:January|February|March|April|May|June|July|"
                   r"August|September|October|November|December)\s+(?:\d{1,2},?\s+)?)?(\d{3,4})\b(?!\s*(?:BC|BCE))")
_NAME = re.compile(r"[A-Z][\w'’-]+(?: (?:[A-Z][\w'’-]+|de|van|von|da|of))*(?<! of)(?<! de)")
_SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9}
_COPULA = re.compile(r"\b(?:is|are|was|were)\s+(?:one of\s+)?(?:(?:a|an|the)\s+)?(.{0,120})")
_BOUNDARY = re.compile(r"\s+(?:of|in|on|at|that|which|who|whose|with|from|for|located|situated|by|to|between|"
                       r"and|or|near|where|consisting|made|found|native|known|used|called|visible|during|containing|including|"
                       r"like|such|orbiting|based|built|typically|usually|commonly|often)\b|[,.;:()]")
# Head words that are not types on their own ("a set of stars", "one of the largest cities").
_WEAK_HEADS = {"set", "part", "group", "member", "kind", "type", "form", "collection", "pair", "series", "number",
               "term", "name", "one", "largest", "smallest", "biggest", "oldest", "highest", "most", "first",
               "second", "third", "fourth", "fifth", "only", "main", "best", "variety", "family", "genus", "class",
               "order", "piece", "list", "system", "body", "unit", "area", "region", "sixth", "seventh", "eighth",
               "ninth", "tenth", "last", "farthest", "closest", "nearest", "innermost", "outermost"}
_PLURALS = (("ies", "y"), ("ae", "a"), ("sses", "ss"), ("xes", "x"), ("ches", "ch"), ("shes", "sh"), ("s", ""))


def singular(word: str) -> str:
    """A plural noun made singular, well enough for type words.

    >>> [singular(w) for w in ("galaxies", "nebulae", "moons", "species", "glass")]
    ['galaxy', 'nebula', 'moon', 'species', 'glass']
    """
    if word.endswith(("ss", "us", "is", "species", "series")):
        return word
    for suf, rep in _PLURALS:
        if word.endswith(suf) and len(word) > len(suf) + 2:
            return word[: -len(suf)] + rep
    return word


def type_word(text: str, title: str = "") -> str | None:
    """The entity's type word: a title's qualifier ("Io (moon)"), else the head noun of its first sentence.

    >>> type_word("The Crab Nebula is a supernova remnant and pulsar wind nebula in Taurus.")
    'remnant'
    >>> type_word("Orion is a prominent set of stars visible during winter.")
    'star'
    >>> type_word("Peru, officially the Republic of Peru, is a country in western South America.")
    'country'
    >>> type_word("Io is the innermost and second smallest of the four Galilean moons of Jupiter.")
    'moon'
    >>> type_word("Orion is a set of stars.", "Orion (constellation)")
    'constellation'
    """
    qual = re.search(r"\(([a-z][a-z ]{2,20})\)$", title)
    if qual:
        return qual.group(1).split()[-1]
    first = re.split(r"(?<=[a-z)])\.\s", text, maxsplit=1)[0]
    m = _COPULA.search(first)
    rest = m.group(1) if m else ""
    for _ in range(3):
        b = _BOUNDARY.search(rest)
        chunk, rest = (rest[: b.start()], rest[b.end():]) if b else (rest, "")
        raw = re.findall(r"[A-Za-z-]+", chunk)
        if raw and all(w[:1].isupper() for w in raw) and _ > 0:
            break  # "the western region of Europe": after "of" comes a name, not a type
        # A type word is a common noun: no proper names ("Italian", "Europe"), adverbs, participles or adjectives.
        words = [w for w in re.findall(r"[A-Za-z-]+", chunk) if w.lower() not in _NOT_TYPES and w[:1].islower()
                 and not w.endswith("ly") and not (len(w) > 5 and w.endswith("ed") and not w.endswith("eed"))
                 and not (w.endswith("ing") and w not in _ING_NOUNS)]
        if words:
            head = singular(words[-1].lower())
            adjective = head.endswith(_ADJ_ENDINGS) and head not in _NOUNS_LIKE_ADJ
            if head not in _WEAK_HEADS and head.isalpha() and len(head) >= 3 and not head.endswith(("est", "most")) \
                    and not adjective:
                return head
        rest = re.sub(r"^\s*(?:the|a|an)?\s*(?:\d+|two|three|four|five|six|seven|eight|nine|ten|many|several)?\s*",
                      "", rest)
        if not rest:
            break
    return None


_NOT_TYPES = {"the", "a", "an", "various", "any", "round", "common", "several", "many", "other", "different", "major",
              "famous", "popular", "large", "small", "big", "main", "traditional", "typical", "native", "modern",
              "ancient", "former", "new", "old", "well", "known", "total", "sovereign", "independent", "landlocked"}
_ADJ_ENDINGS = ("al", "ic", "ous", "ive", "ful", "less", "able", "ible", "ary", "ian", "ese", "ish")
_NOUNS_LIKE_ADJ = {"animal", "canal", "festival", "mineral", "capital", "hospital", "signal", "crystal", "terminal",
                   "metal", "mammal", "cathedral", "arsenal", "music", "republic", "mosaic", "chemical", "clinic",
                   "fabric", "comic", "relic", "plastic", "tunic", "magic", "arabic", "library", "dictionary",
                   "sanctuary", "estuary", "tributary", "boundary", "mercenary", "monastery", "primary", "cemetery",
                   "missionary", "salary", "olive", "detective", "locomotive", "explosive", "sedative", "fish",
                   "dish", "radish", "relish", "musician", "physician", "civilian", "guardian", "librarian",
                   "reptile", "amphibian", "historian", "vegetarian", "mammalian", "journal", "portal", "rival",
                   "pedal", "petal", "coral", "oval", "spiral", "funeral", "general", "admiral", "memorial",
                   "ritual", "manual", "official", "cereal", "vessel", "sandal", "cymbal", "total", "pascal"}
_ING_NOUNS = {"building", "painting", "ring", "king", "string", "wing", "spring", "clothing", "dwelling", "sibling",
              "seedling", "ceiling", "swing", "sling", "earring", "pudding", "dumpling", "bowling", "wedding"}


def short_name(title: str) -> str:
    """A KB title without its qualifier, as text and answers name it ("Io (moon)" -> "Io")."""
    return re.sub(r"\s*\([^)]*\)$", "", title) or title


class TitleIndex:
    """Finds KB titles named in text: the longest title starting at a position, by its first word."""

    def __init__(self, titles: Iterable[str]):
        self.by_first: dict[str, list[tuple[list[str], str, bool]]] = {}
        for t in titles:
            for surface in {t, short_name(t)}:  # "Io (moon)" is written "Io" in text
                words = surface.split()
                if words and surface[:1].isupper():
                    self.by_first.setdefault(words[0], []).append((words, t, surface != t))
        for v in self.by_first.values():  # longest first; an exact title before one known by its short name
            v.sort(key=lambda x: (-len(x[0]), x[2]))

    def at(self, text: str) -> str | None:
        """The KB title that `text` starts with, only if it spans the whole capitalised name there
        ("New York" is not found in "New York Harbor")."""
        return self._at(_TOKENS.findall(text[:200]))

    def _at(self, words: list[str]) -> str | None:
        if not words:
            return None
        for cand, title, _ in self.by_first.get(words[0], []):
            n = len(cand)
            if words[:n] == cand:
                nxt = words[n] if n < len(words) else ""
                return None if nxt[:1].isupper() else title
        return None

    def mentioned(self, text: str, exclude: str = "") -> list[str]:
        """Every KB title named in a text (each a whole capitalised name), in order of first mention."""
        words = _TOKENS.findall(text)
        out: list[str] = []
        for i, w in enumerate(words):
            if w[:1].isupper() and not (i and words[i - 1][:1].isupper()):
                t = self._at(words[i:i + 12])
                if t and t != exclude and t not in out:
                    out.append(t)
        return out


# Qualifiers under which a title may be found by its short name ("Io" for "Io (moon)").
_SENSES = {"moon", "planet", "dwarf planet", "constellation", "country", "state", "city", "island", "region",
           "river", "mountain", "province", "continent", "star", "galaxy", "nebula", "volcano", "lake", "sea"}
_TOKENS = re.compile(r"[\w'’-]+|[^\w\s]")


def _number(num: str, scale: str | None) -> float | None:
    try:
        v = float(num.replace(",", ""))
    except ValueError:
        return None
    return v * _SCALES.get((scale or "").lower(), 1.0)


def _sentence(text: str, pos: int) -> str:
    start = max(text.rfind(". ", 0, pos) + 2, 0)
    end = text.find(". ", pos)
    return text[start: end + 1 if end >= 0 else len(text)].strip()


def mine(title: str, text: str, titles: TitleIndex) -> list[Fact]:
    """Facts stated about `title` in its own passage (one per relation: the first statement wins)."""
    out: dict[str, Fact] = {}
    first = re.split(r"(?<=[a-z)])\.\s", text, maxsplit=1)[0]
    for rel, pat, scope in [(r, p, text) for r, p in ENTITY_PATTERNS] + \
            [(r, p, first) for r, p in FIRST_SENTENCE_PATTERNS]:
        for m in re.finditer(pat, scope):
            obj = titles.at(text[m.end(1):])
            if rel == "location":  # "in Agra, Uttar Pradesh, India": the last named place is the widest
                tail = re.match(r"[^.;()]{0,80}", text[m.end(1):]).group(0)
                named = [t for t in titles.mentioned(tail, exclude=title)]
                obj = named[-1] if named else obj
            if rel == "location" and obj and any(w[:1].islower() for w in obj.split()[1:]):
                obj = None  # "in Greek mythology" places nothing
            qual = re.search(r"\(([^)]*)\)$", obj or "")
            if qual and not text[m.end(1):].startswith(obj) and qual.group(1) not in _SENSES:
                obj = None  # "Draco" read as "Draco (legislator)": a title known by its short name, other sense
            if obj and any(f.value == obj for f in out.values()):
                obj = None  # "lies in the constellation Cygnus" is already the constellation, not a location too
            if obj and obj != title and rel not in out and normalize(obj) not in normalize(title):
                out[rel] = Fact(title, rel, obj, "entity", _sentence(text, m.start()))
                break
            name = _NAME.match(text[m.end(1):]) if rel in NAMES_OK and not obj and rel != "location" else None
            if name and rel not in out and normalize(name.group(0)) not in normalize(title):
                out[rel] = Fact(title, rel, name.group(0), "string", _sentence(text, m.start()))
                break
    for rel, pat in STRING_PATTERNS:
        m = re.search(pat, text)
        if m and rel not in out:
            out[rel] = Fact(title, rel, m.group(1), "string", _sentence(text, m.start()))
    for rel, pat in NUMBER_PATTERNS:
        m = re.search(pat, text, re.I)
        if m and rel not in out:
            v = _number(m.group(1), m.group(2) if m.lastindex and m.lastindex >= 2 else None)
            if v and v > 0:
                out[rel] = Fact(title, rel, f"{v:g}" if v < 1e15 else str(v), "number", _sentence(text, m.start()))
    m = _POSITION.search(text)
    if m:
        rel = f"position from the {m.group(3)}"
        out.setdefault(rel, Fact(title, rel, str(_ORDINALS[m.group(1)]), "number", _sentence(text, m.start())))
    m = _DEMONYM.search(first)
    origin = titles.at(DEMONYMS[m.group(1)]) if m else None
    if m and origin and "country of origin" not in out and origin != title:
        out["country of origin"] = Fact(title, "country of origin", origin, "entity", _sentence(text, m.start()))
    for m in _YEAR.finditer(text):
        verb, year = m.group(1), m.group(2)
        rel = YEAR_VERBS[verb]
        if rel not in out and 100 <= int(year) <= 2030:
            out[rel] = Fact(title, rel, year, "year", _sentence(text, m.start()), verb=verb)
    return list(out.values())


def triple_facts(triples, passages_by_title: dict[str, str], titles: set[str]) -> list[Fact]:
    """Facts from triples of any relation name, kept only where the subject's passage states the object."""
    out = []
    for t in triples:
        text = passages_by_title.get(t.subject)
        if not text or t.subject == t.object or normalize(t.object) not in normalize(text):
            continue
        kind = "entity" if t.object in titles else "string"
        pos = normalize(text).find(normalize(t.object))
        out.append(Fact(t.subject, t.relation.strip(), t.object, kind, text[:300] if pos < 0 else ""))
    return out


def describe_number(v: float) -> str:
    """How a number is written in a question's answer and in gold reasoning.

    >>> describe_number(67800000.0), describe_number(3776.0), describe_number(2.5e6)
    ('67.8 million', '3776', '2.5 million')
    """
    if v >= 1e9:
        return f"{v / 1e9:.4g} billion"
    if v >= 1e6:
        return f"{v / 1e6:.4g} million"
    return f"{v:.6g}"
