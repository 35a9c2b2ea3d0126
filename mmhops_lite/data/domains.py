"""Demo KB image domains beyond flags and stamps: their names, emoji (Noto Color Emoji) here, astronomy (Stellarium)
in astronomy.py, and the manifest entries of both."""
from __future__ import annotations

import re
import struct
import unicodedata
from pathlib import Path

from mmhops_lite.data.demo_kb import _KB, EMOJI_DEB, STELLA_DEB, _deb_license, _deb_version, _variants, slug
from mmhops_lite.errors import InputError

# Image id prefix -> domain name; accuracy can be reported per domain (and on one that training never saw).
DOMAINS = {"flag": "flags", "stamp": "stamps", "emoji": "emoji", "astro": "astronomy"}


def domain_of(image_id: str) -> str:
    """The domain of an image id, from its prefix ("astro:crab-nebula" -> "astronomy"); unknown prefixes as is."""
    prefix = image_id.split(":", 1)[0]
    return DOMAINS.get(prefix, prefix)


# ------------------------------------------------------------------------------------------------ emoji
EMOJI_PX = 109  # the only bitmap size (strike) in Noto Color Emoji: FreeType refuses any other size for CBDT fonts
# Words that name the drawing rather than the thing ("DOG FACE" is a dog, "ATOM SYMBOL" an atom).
EMOJI_DROP = {"face", "symbol", "sign"}
# Shapes are symbols: a blue heart is not the organ, an orange diamond not the mineral, a red circle no geometry.
EMOJI_SHAPES = {"heart", "hearts", "circle", "square", "diamond", "triangle"}
# Names whose article the generic rules miss, or get wrong ("" = none: the kitchen sponge is not the animal).
EMOJI_ALIASES = {"ANATOMICAL HEART": "Heart", "BLACK SUN WITH RAYS": "Sun", "EARTH GLOBE EUROPE-AFRICA": "Earth",
                 "FULL MOON SYMBOL": "Moon", "SPONGE": ""}
# Wikipedia disambiguations worth trying ("CRICKET" -> "Cricket (insect)", not the sport).
EMOJI_HINTS = ("animal", "bird", "fish", "fruit", "plant", "insect", "tool", "sport", "game", "weapon")
# Regional indicators (flags), hair components, and the zodiac signs, whose names are constellations or diseases.
EMOJI_SKIP = [(0x1F1E6, 0x1F1FF), (0x1F9B0, 0x1F9B3), (0x2648, 0x2653), (0x26CE, 0x26CE)]
# An emoji is a thing or a creature: never a country, city, person (born ...), year or creative work.
NOT_A_THING = re.compile(r"\b(country|city|capital|province|born|film|novel|album|comic strip)\b|\b\d{4}\b", re.I)


def font_codepoints(font_path: Path) -> list[int]:
    """The code points a TrueType font maps, read from its cmap table (format 12, the full Unicode subtable)."""
    data = Path(font_path).read_bytes()
    try:
        (ntables,) = struct.unpack_from(">H", data, 4)
        tables = {data[12 + 16 * i:16 + 16 * i]: struct.unpack_from(">I", data, 20 + 16 * i)[0] for i in range(ntables)}
        cmap = tables[b"cmap"]
        cps = set()
        for i in range(struct.unpack_from(">H", data, cmap + 2)[0]):
            sub = cmap + struct.unpack_from(">I", data, cmap + 8 + 8 * i)[0]
            if struct.unpack_from(">H", data, sub)[0] == 12:  # format 4 covers only the BMP, which 12 repeats
                for g in range(struct.unpack_from(">I", data, sub + 12)[0]):
                    start, end, _ = struct.unpack_from(">III", data, sub + 16 + 12 * g)
                    cps.update(range(start, end + 1))
    except (struct.error, KeyError) as exc:
        raise InputError(f"cannot read the character map of {font_path}: {exc!r}", path=font_path,
                         fix=f"apt-get install --reinstall {EMOJI_DEB}") from exc
    return sorted(cps)


def emoji_title(name: str, kb: _KB) -> tuple[str, int] | None:
    """The Wikipedia title for an emoji's Unicode name and the match's rank (0 exact, 1 variant, 2 name minus FACE)."""
    if name in EMOJI_ALIASES:
        return (title, 1) if (title := kb.lookup(EMOJI_ALIASES[name])) else None
    words = name.lower().split()
    if EMOJI_SHAPES & set(words) or name.startswith("EMOJI COMPONENT"):
        return None
    core = [w for w in words if w not in EMOJI_DROP]
    bases = [(" ".join(words), 0)] + ([(" ".join(core), 2)] if core and core != words else [])
    for base, rank in bases:
        if rank == 2 and re.search(r"(ing|ed)$", base):  # "GRINNING FACE", "FREEZING FACE" are smileys
            continue
        for i, cand in enumerate(_variants(base) + [base + "s"]):
            for hinted in [f"{cand} ({h})" for h in EMOJI_HINTS] + [cand]:
                title = kb.lookup(hinted)
                # Slugs drop brackets: "scales (insect)" must not reach "Scale insect", only "X (insect)" itself.
                if not title or (hinted != cand and not title.endswith(")")) or slug(title) in EMOJI_DROP:
                    continue
                if not NOT_A_THING.search(kb.wiki[title]["description"]):
                    return title, max(rank, int(i > 0 or hinted != cand))
    return None


def render_emoji(char: str, font):
    """One emoji drawn in colour on a transparent RGBA canvas cut to the glyph's box."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(char)
    im = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (255, 255, 255, 0))
    ImageDraw.Draw(im).text((-left, -top), char, font=font, embedded_color=True)
    return im


def add_emoji(font_path: Path, kb: _KB, track) -> dict:
    """Add one emoji image per Wikipedia title (the best-matching emoji); returns match counts."""
    from PIL import ImageFont

    best: dict[str, tuple[int, int, str]] = {}
    candidates = 0
    for cp in font_codepoints(font_path):
        char = chr(cp)
        # So (other symbol) drops digits, keycaps, joiners, variation selectors, tags and skin-tone modifiers.
        if unicodedata.category(char) != "So" or any(a <= cp <= b for a, b in EMOJI_SKIP):
            continue
        name = unicodedata.name(char, "")  # emoji newer than this Python's Unicode database have no name yet
        if not name:
            continue
        candidates += 1
        match = emoji_title(name, kb)
        if match is None:
            kb.skipped["emoji_no_article"] += 1
        elif match[0] not in best or (match[1], cp) < best[match[0]][:2]:
            best[match[0]] = (match[1], cp, name)
    try:  # loaded after matching: a KB whose titles no emoji names needs no renderable font
        font = ImageFont.truetype(str(font_path), EMOJI_PX) if best else None
    except OSError as exc:  # a FreeType without PNG (CBDT) support, or a damaged font
        raise InputError(f"cannot load the emoji font {font_path}: {exc}", path=font_path,
                         fix=f"apt-get install --reinstall {EMOJI_DEB}; pip install -U pillow") from exc
    for title, (_, cp, name) in track(sorted(best.items(), key=lambda kv: kv[1][1]), "emoji"):
        im = render_emoji(chr(cp), font)
        if im.getbbox() is None:  # mapped but blank
            kb.skipped["emoji_blank"] += 1
            continue
        kb.add_image(im, "emoji", Path(slug(title) or "x"), title, f"Emoji: {name.lower()}")
    return {"candidates": candidates, "titles": len(best)}


def source_entries(emoji_font: Path, stellarium_root: Path, default: bool) -> dict:
    """The manifest's "sources" entries of the two domains (package version and licence only for installed ones)."""
    return {
        EMOJI_DEB: {"path": str(emoji_font), "package": f"debian:{EMOJI_DEB}",
                    "version": _deb_version(EMOJI_DEB) if default else None,
                    # The copyright file's `Files: *` stanza covers the build tools (Apache-2.0); the font is OFL.
                    "license": _deb_license(EMOJI_DEB, "OFL-1.1", files="fonts/*") if default else "OFL-1.1",
                    "attribution": "Noto Color Emoji font (SIL Open Font License 1.1), Google Inc. and contributors"},
        STELLA_DEB: {"path": str(stellarium_root), "package": f"debian:{STELLA_DEB}",
                     "version": _deb_version(STELLA_DEB) if default else None,
                     "license": (_deb_license(STELLA_DEB, "GPL-2+") if default else "GPL-2+")
                     + "; per-image credits and terms in the package's copyright file, section 4 (Graphics)",
                     "attribution": "Stellarium planet maps, deep-sky images (photographer credited in each caption), "
                                    "the deep-sky catalogue and names that generated passages are written from "
                                    "(nebulae/default/catalog.dat, names.dat), the constellation table "
                                    "(data/constellations_spans.dat, after Roman 1987) and western constellation "
                                    "art by Johan Meuris (Free Art License); Fabien Chéreau and the Stellarium team"},
    }
