"""The emoji and astronomy domains of the demo KB, on tiny fake sources (the real emoji font only if installed)."""
import gzip
import json
import math
import re
import struct
from pathlib import Path

import pytest
from PIL import Image

from mmhops_lite.data.astronomy import _constellation, _read_spans, add_astronomy
from mmhops_lite.data.demo_kb import _KB, EMOJI_FONT, DemoSources, build_demo_kb
from mmhops_lite.data.domains import DOMAINS, add_emoji, domain_of, emoji_title, font_codepoints
from mmhops_lite.errors import InputError


def _wiki(**entries: tuple[str, str]) -> dict[str, dict]:
    """title=(description, text) -> the summaries as _load_wiki returns them."""
    return {title.replace("_", " "): {"description": d, "text": t} for title, (d, t) in entries.items()}


EMOJI_WIKI = {
    **_wiki(Elephant=("Largest living land animal", "Elephants are the largest living land animals."),
            Statue_of_Liberty=("Colossal sculpture in New York Harbor", "The Statue of Liberty is a sculpture."),
            Mount_Fuji=("Volcano in Japan", "Mount Fuji is an active stratovolcano."),
            Dog=("Domesticated species of canid", "The dog is a domesticated descendant of wolves."),
            Heart=("Organ found in humans and other animals", "The heart is a muscular organ."),
            Turkey=("Country in Southeastern Europe and West Asia", "Turkey is a country in Anatolia."),
            Cricket=("Bat-and-ball game", "Cricket is a bat-and-ball game played between two teams."),
            Scale_insect=("Superfamily of insects", "Scale insects are small insects."),
            Symbol=("Something that represents an idea", "A symbol is a mark, sign, or word."),
            Cherry=("Fruit of some plants of the genus Prunus", "A cherry is the fruit of many plants."),
            Peanuts=("Comic strip by Charles M. Schulz", "Peanuts is a syndicated daily comic strip."),
            Peanut=("Legume crop grown for its edible seeds", "The peanut is a legume crop."),
            Freezing=("Phase transition of liquid to solid", "Freezing is a phase transition.")),
    "Turkey (bird)": {"description": "Large bird of the genus Meleagris", "text": "The turkey is a large bird."},
    "Cricket (insect)": {"description": "Small insects of the family Gryllidae", "text": "Crickets are insects."},
}


@pytest.fixture
def emoji_kb(tmp_path) -> _KB:
    return _KB(tmp_path / "kb", EMOJI_WIKI)


@pytest.mark.parametrize("name, expected", [
    ("ELEPHANT", ("Elephant", 0)), ("STATUE OF LIBERTY", ("Statue of Liberty", 0)), ("MOUNT FUJI", ("Mount Fuji", 0)),
    ("DOG FACE", ("Dog", 2)),                      # the drawing word is dropped, at a lower rank than DOG itself
    ("CHERRIES", ("Cherry", 1)),                   # plural -> singular article
    ("TURKEY", ("Turkey (bird)", 1)),              # the disambiguated creature, never the country
    ("CRICKET", ("Cricket (insect)", 1)),          # the insect emoji, not the sport
    ("PEANUTS", ("Peanut", 1)),                    # a comic strip is a work, not a thing
    ("ANATOMICAL HEART", ("Heart", 1)),            # alias: the organ drawing is the organ
    ("BLUE HEART", None),                          # a heart shape is a symbol, not the organ
    ("SCALES", None),                              # "scale (insect)" must not slug-match "Scale insect"
    ("BABY SYMBOL", None), ("FREEZING FACE", None), ("GRINNING FACE", None), ("SPONGE", None),
])
def test_emoji_title(emoji_kb, name, expected):
    assert emoji_title(name, emoji_kb) == expected


def test_emoji_title_rejects_a_country_without_a_creature_article(tmp_path):
    kb = _KB(tmp_path / "kb", {"Turkey": EMOJI_WIKI["Turkey"]})
    assert emoji_title("TURKEY", kb) is None


def _fake_font(path: Path, groups: list[tuple[int, int]]) -> Path:
    """A font file holding only a cmap table with one format-12 subtable: enough for font_codepoints."""
    sub = struct.pack(">HHIII", 12, 0, 16 + 12 * len(groups), 0, len(groups))
    sub += b"".join(struct.pack(">III", a, b, 1) for a, b in groups)
    cmap = struct.pack(">HHHHI", 0, 1, 3, 10, 12) + sub
    header = struct.pack(">IHHHH", 0x00010000, 1, 16, 0, 0) + b"cmap" + struct.pack(">III", 0, 28, len(cmap))
    path.write_bytes(header + cmap)
    return path


def test_font_codepoints_reads_the_cmap(tmp_path):
    font = _fake_font(tmp_path / "f.ttf", [(0x1F418, 0x1F419), (0x2601, 0x2601)])
    assert font_codepoints(font) == [0x2601, 0x1F418, 0x1F419]
    (tmp_path / "bad.ttf").write_bytes(b"\0\1\0\0\0\1")
    with pytest.raises(InputError, match="fonts-noto-color-emoji"):
        font_codepoints(tmp_path / "bad.ttf")


def test_add_emoji_matches_before_it_needs_a_renderable_font(tmp_path):
    font = _fake_font(tmp_path / "f.ttf", [(0x1F418, 0x1F418), (0x1F600, 0x1F600), (0x1F1E6, 0x1F1FF)])
    kb = _KB(tmp_path / "kb", {"Lion": EMOJI_WIKI["Elephant"]})
    # ELEPHANT and GRINNING FACE are candidates (regional indicators are not); neither has an article here.
    assert add_emoji(font, kb, lambda items, desc: items) == {"candidates": 2, "titles": 0}
    assert kb.images == [] and kb.skipped["emoji_no_article"] == 2
    kb = _KB(tmp_path / "kb", EMOJI_WIKI)  # now ELEPHANT matches, and the cmap-only file cannot be drawn
    with pytest.raises(InputError, match="cannot load the emoji font"):
        add_emoji(font, kb, lambda items, desc: items)


needs_font = pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji is not installed")


@needs_font
def test_add_emoji_renders_the_real_font(tmp_path):
    wiki = {t: EMOJI_WIKI[t] for t in ("Elephant", "Dog", "Turkey", "Symbol")}
    kb = _KB(tmp_path / "kb", wiki)
    stats = add_emoji(EMOJI_FONT, kb, lambda items, desc: items)
    assert stats["titles"] == 2 and stats["candidates"] > 1000
    rows = {i["id"]: i for i in kb.images}
    assert set(rows) == {"emoji:elephant", "emoji:dog"}
    assert rows["emoji:dog"]["caption"] == "Emoji: dog"  # DOG beats DOG FACE
    assert rows["emoji:elephant"] == {"id": "emoji:elephant", "path": "images/emoji/elephant.png",
                                      "title": "Elephant", "caption": "Emoji: elephant"}
    with Image.open(kb.out / rows["emoji:elephant"]["path"]) as im:
        assert im.mode == "RGB" and max(im.size) <= 256
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent corners come out white
        assert len(im.getcolors(1 << 16)) > 20  # a colour drawing, not a blank or a one-colour box


# ------------------------------------------------------------------------------------------------ astronomy
ASTRO_WIKI = {
    **_wiki(Jupiter=("Fifth planet from the Sun", "Jupiter is the fifth planet from the Sun."),
            Crab_Nebula=("Supernova remnant in the constellation Taurus",
                         "The Crab Nebula (catalogue designations M1, NGC 1952, Taurus A) is a supernova remnant."),
            Pinwheel_Galaxy=("Spiral galaxy in the constellation Ursa Major",
                             "The Pinwheel Galaxy (also known as Messier 101, M101 or NGC 5457) is a spiral galaxy."),
            Pleiades=("Star cluster in the constellation of Taurus", "The Pleiades is an open star cluster."),
            Large_Magellanic_Cloud=("Satellite galaxy of the Milky Way", "The Large Magellanic Cloud is a galaxy."),
            Starburst_galaxy=("Galaxy with a high star formation rate", "A starburst galaxy forms stars fast."),
            Hydra=("Serpentine water monster in Greek mythology", "The Hydra is a serpentine monster."),
            Halo=("Optical phenomenon", "A halo is an optical phenomenon produced by light.")),
    "Io (moon)": {"description": "Innermost of the four Galilean moons of Jupiter",
                  "text": "Io is the innermost Galilean moon."},
    "Orion (constellation)": {"description": "Constellation on the celestial equator", "text": "Orion is a "
                              "prominent constellation."},
}


def _png(path: Path, colour=(200, 120, 40), size=(64, 32), noise=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    if noise:  # many distinct pixels: a larger PNG file than a plain one
        im.putdata([((i * 37) % 256, (i * 91) % 256, (i * 13) % 256) for i in range(size[0] * size[1])])
    im.save(path)


def _qstring(text: str) -> bytes:
    data = text.encode("utf-16-be")
    return struct.pack(">I", len(data)) + data


def _catalog(path: Path, records: list[dict]) -> None:
    """A catalog.dat in Stellarium's 3.16 layout: the given catalogue numbers (integers; text for CED and PK..VDBH)
    and fields (type, ra, dec in radians, bmag, vmag, axes in degrees, kpc); the rest zero, empty or null."""
    ints = ("NGC", "IC", "M", "C", "B", "SH2", "VDB", "RCW", "LDN", "LBN", "CR", "MEL", "PGC", "UGC")
    strs = ("PK", "PNG", "SNRG", "ACO", "HCG", "ESO", "VDBH")
    null = struct.pack(">I", 0xFFFFFFFF)
    out = _qstring("3.16") + _qstring("standard")
    for n, rec in enumerate(records, 1):
        out += struct.pack(">I4dI", n, rec.get("ra", 1.0), rec.get("dec", 0.5), rec.get("bmag", 99.0),
                           rec.get("vmag", 8.0), rec.get("type", 3)) + _qstring("Sb")
        out += struct.pack(">2di6d", *rec.get("axes", (0.1, 0.05)), 90, 0, 0, 0, 0, rec.get("kpc", 0.0), 0)
        out += struct.pack(">14I", *(rec.get(c, 0) for c in ints)) + (_qstring(rec["CED"]) if "CED" in rec else null)
        out += struct.pack(">2I", rec.get("ARP", 0), 0) + b"".join(_qstring(rec.get(c, "")) for c in strs)
        out += struct.pack(">5I", *[0] * 5)
    path.write_bytes(gzip.compress(out))


TEXTURES_JSON = """{
  "shortName": "Nebulae", "subTiles" : [
  {"imageCredits": {"short" : "Stephane Dumont"}, "imageUrl" : "m1dumont.png",
   "worldCoords" : [[[83.6970, 21.9454], [83.5510, -.9559]]], "minResolution" : 0.13},
  {"imageCredits" : {"Short": "Someone", "infoUrl": "https://example.org"}, "imageUrl" : "m99.png"},
  {"imageCredits" : {"short": "Plover Hill"}, "imageUrl" : "m101-vasey.png"},
  {"imageCredits" : {"short": "HG"}, "imageUrl" : "pleiades.png"},
  {"imageCredits" : {"short": "S"}, "imageUrl" : "ic10.png"},
  {"imageCredits" : {"short": "N"}, "imageUrl" : "n9999.png"},
  {"imageCredits" : {"short": "ESO"}, "imageUrl" : "lmc_01.png"},
  {"imageCredits" : {"short": "ESO"}, "imageUrl" : "lmc_02.png"}
  ]
}
"""
NAMES_DAT = "".join(f"{p:<5}{i:<15}_(\"{n}\") # WK\n" for p, i, n in [
    ("NGC", "1952", "Crab Nebula"), ("NGC", "1952", "Taurus A"), ("NGC", "4254", "Coma Pinwheel Galaxy"),
    ("NGC", "4254", "Pinwheel Galaxy"), ("NGC", "5457", "Pinwheel Galaxy"), ("IC", "10", "Starburst Galaxy")])


@pytest.fixture
def stellarium(tmp_path) -> Path:
    root = tmp_path / "stellarium"
    tex = root / "textures"
    _png(tex / "jupiter.png", (200, 150, 100))
    _png(tex / "io.png", (220, 200, 60))
    _png(tex / "halo.png", (250, 250, 250))   # not a body: skipped by name although "Halo" has an article
    _png(tex / "vulcan.png", (90, 90, 90))    # no article
    neb = root / "nebulae" / "default"
    neb.mkdir(parents=True)
    (neb / "textures.json").write_text(TEXTURES_JSON, encoding="utf-8")
    (neb / "names.dat").write_text("# Stellarium DSO Catalog Names\n" + NAMES_DAT, encoding="utf-8")
    _catalog(neb / "catalog.dat", [{"M": 1, "NGC": 1952, "SH2": 244}, {"M": 99, "NGC": 4254},
                                   {"M": 101, "NGC": 5457}, {"IC": 10, "UGC": 192}])
    for i, stem in enumerate(["m1dumont", "m99", "m101-vasey", "pleiades", "ic10", "n9999", "lmc_01"]):
        _png(neb / f"{stem}.png", (10 + 30 * i, 20, 40), (48, 48))
    _png(neb / "lmc_02.png", size=(48, 48), noise=True)
    sky = root / "skycultures" / "western"
    sky.mkdir(parents=True)
    (sky / "constellationsart.fab").write_text("Ori orion.png 1 2 3 4 5 6 7 8 9\nHya hydra.png 1 2 3 4 5 6 7 8 9\n",
                                               encoding="utf-8")
    (sky / "constellation_names.eng.fab").write_text('Ori\t"Orion"\t_("Orion")\nHya\t"Hydra"\t_("Hydra")\n',
                                                     encoding="utf-8")
    Image.new("L", (64, 64), 128).save(sky / "orion.png")
    Image.new("L", (64, 64), 100).save(sky / "hydra.png")
    return root


def test_add_astronomy_titles_ids_and_files(tmp_path, stellarium):
    kb = _KB(tmp_path / "kb", ASTRO_WIKI)
    stats = add_astronomy(stellarium, kb, lambda items, desc: items)
    rows = {i["id"]: i for i in kb.images if i["title"] in ASTRO_WIKI}  # the images shown under an article
    assert {i: r["title"] for i, r in rows.items()} == {
        "astro:jupiter": "Jupiter", "astro:io-moon": "Io (moon)", "astro:crab-nebula": "Crab Nebula",
        "astro:pinwheel-galaxy": "Pinwheel Galaxy", "astro:pleiades": "Pleiades",
        "astro:large-magellanic-cloud": "Large Magellanic Cloud", "astro:orion-constellation": "Orion (constellation)"}
    assert {k: stats[k] for k in ("candidates", "titles")} == {"candidates": 3 + 8 + 2, "titles": 7}  # not halo.png
    # Named through catalog.dat (M 1 = NGC 1952) and names.dat, with the photographer credited.
    assert rows["astro:crab-nebula"]["caption"] == \
        "Deep-sky image of the Crab Nebula (M 1, NGC 1952; Stellarium; image: Stephane Dumont)"
    # M 99 is also called "Pinwheel Galaxy"; the article cites M 101, so M 101's image wins.
    assert "M 101" in rows["astro:pinwheel-galaxy"]["caption"]
    assert rows["astro:io-moon"]["caption"] == "Texture map of Io (Stellarium)"
    assert rows["astro:orion-constellation"]["caption"].startswith("Constellation art of Orion (Stellarium")
    assert rows["astro:pleiades"]["path"] == "images/astro/pleiades.png"
    for r in rows.values():
        with Image.open(kb.out / r["path"]) as im:
            assert im.mode == "RGB" and max(im.size) <= 256
    with Image.open(kb.out / rows["astro:large-magellanic-cloud"]["path"]) as im:
        assert len(im.getcolors(1 << 16)) > 100  # of the two LMC tiles the one with structure (the larger file)
    # vulcan, n9999 and hydra have no sky article and no catalogue entry; lmc_01 loses to the larger lmc_02.
    assert kb.skipped["astro_no_article"] == 3 and kb.skipped["astro_more_of_entity"] == 1
    # ic10 has only a class article ("Starburst galaxy"), and m99 lost "Pinwheel Galaxy" to M 101 (whose article it
    # is): both are catalogue objects of their own, with a generated passage. "Pinwheel Galaxy" names two objects
    # in names.dat, so M 99 is titled by the name only it has; IC 10's name is taken by the class article.
    generated = {r["title"]: r for r in kb.images if r["title"] not in ASTRO_WIKI}
    assert {r["id"] for r in generated.values()} == {"astro:coma-pinwheel-galaxy",
                                                      "astro:starburst-galaxy-deep-sky-object"}
    assert kb.generated["Coma Pinwheel Galaxy"] == {"source": "stellarium-data", "texts": [
        ("Coma Pinwheel Galaxy is an interacting galaxy. It is also catalogued as Messier 99 and NGC 4254. "
         "Its apparent visual magnitude is 8.0. Its apparent size is 6 by 3 arcminutes.")]}
    assert kb.generated["Starburst Galaxy (deep-sky object)"]["texts"][0].startswith(
        "Starburst Galaxy (deep-sky object) is an interacting galaxy. It is also catalogued as IC 10 and UGC 192.")
    assert generated["Coma Pinwheel Galaxy"]["caption"] == \
        "Deep-sky image of Coma Pinwheel Galaxy (M 99, NGC 4254; Stellarium; image: Someone)"
    assert stats["generated"] == 2 and stats["generated_types"] == {"interacting galaxy": 2}
    assert stats["generated_facts"] == {"magnitude": 2, "size": 2}  # no distances; no constellation table here


def test_add_astronomy_without_catalog_names_files_by_their_own_designation(tmp_path, stellarium):
    (stellarium / "nebulae" / "default" / "catalog.dat").unlink()
    kb = _KB(tmp_path / "kb", ASTRO_WIKI)
    add_astronomy(stellarium, kb, lambda items, desc: items)
    titles = {i["title"] for i in kb.images}
    assert "Crab Nebula" not in titles and "Pleiades" in titles  # "m1dumont" is M 1, which names.dat does not name
    (stellarium / "nebulae" / "default" / "catalog.dat").write_bytes(b"not gzip")
    kb = _KB(tmp_path / "kb2", ASTRO_WIKI)
    add_astronomy(stellarium, kb, lambda items, desc: items)
    assert kb.skipped["astro_catalog_unreadable"] == 1


def test_add_astronomy_missing_folder_names_the_package(tmp_path):
    with pytest.raises(InputError, match="apt-get install stellarium-data"):
        add_astronomy(tmp_path / "nowhere", _KB(tmp_path / "kb", ASTRO_WIKI), lambda items, desc: items)


def test_domain_of():
    assert DOMAINS == {"flag": "flags", "stamp": "stamps", "emoji": "emoji", "astro": "astronomy"}
    assert domain_of("astro:crab-nebula") == "astronomy" and domain_of("flag:france") == "flags"
    assert domain_of("stamp:animals/mammals/lion") == "stamps" and domain_of("emoji:dog") == "emoji"
    assert domain_of("custom:thing") == "custom"


# ------------------------------------------------------------------------------------------------ generated passages
DSO_TEXTURES = """{"shortName": "Nebulae", "subTiles": [
  {"imageCredits": {"short": "Adam Block"}, "imageUrl": "n7000.png"},
  {"imageCredits": {"short": "DSS"}, "imageUrl": "n7000-dss.png"},
  {"imageCredits": {"short": "S"}, "imageUrl": "sh2-155.png"},
  {"imageCredits": {"short": "B"}, "imageUrl": "barnard33.png"},
  {"imageCredits": {"short": "B"}, "imageUrl": "barnard34.png"},
  {"imageCredits": {"short": "C"}, "imageUrl": "coma_cluster.png"},
  {"imageCredits": {"short": "L"}, "imageUrl": "m65.png"},
  {"imageCredits": {"short": "L"}, "imageUrl": "m66.png"},
  {"imageCredits": {"short": "N"}, "imageUrl": "n9999.png"}]}
"""
DSO_NAMES = "".join(f"{p:<5}{i:<15}_(\"{n}\") # {src}\n" for p, i, n, src in [
    ("NGC", "7000", "Cygnus Wall", "SIMBAD"), ("NGC", "7000", "North America Nebula", "WK, SEDS"),
    ("ACO", "1656", "Coma Cluster", "NED"), ("NGC", "3623", "Leo Triplet", "WK"), ("NGC", "3627", "Leo Triplet", "WK"),
    ("NGC", "3627", "Hamburger Galaxy", "B500")])
# Roman's table: a band above Cygnus that must not match first, then Cygnus; the south has no row on purpose.
DSO_SPANS = " 0:00:00 24:00:00 88:00 UMi\n20:00:00 22:00:00 40:00 Cyg\n"


@pytest.fixture
def deep_sky(tmp_path) -> Path:
    """A Stellarium tree of deep-sky images none of which has an article in ASTRO_WIKI."""
    root = tmp_path / "stellarium-dso"
    (root / "textures").mkdir(parents=True)
    neb = root / "nebulae" / "default"
    neb.mkdir(parents=True)
    (neb / "textures.json").write_text(DSO_TEXTURES, encoding="utf-8")
    (neb / "names.dat").write_text("# names\n" + DSO_NAMES, encoding="utf-8")
    _catalog(neb / "catalog.dat", [
        {"NGC": 7000, "C": 20, "SH2": 117, "LBN": 373, "CED": "183d", "type": 17, "vmag": 4.0,
         "axes": (2.0, 1.6666666), "kpc": 0.58, "ra": math.radians(314.75), "dec": math.radians(44.33)},
        {"SH2": 155, "type": 17, "vmag": 99.0, "bmag": 7.7, "axes": (0.8333333, 0.5), "dec": -1.2},
        {"B": 33, "type": 12, "vmag": 4.0, "axes": (0.0666667, 0.0), "dec": -0.04},  # V holds an opacity here
        {"B": 34, "type": 12, "vmag": 99.0, "axes": (1 / 60, 1 / 60), "dec": -0.04},  # one arcminute, singular
        {"ACO": "1656", "type": 33, "vmag": 10.7, "axes": (0.0, 0.0), "dec": -0.5},  # a string catalogue
        {"M": 65, "NGC": 3623, "type": 0, "vmag": 9.3, "kpc": 10700.0, "dec": -0.2},
        {"M": 66, "NGC": 3627, "ARP": 16, "type": 0, "vmag": 8.9, "dec": -0.2}])
    for i, stem in enumerate(["n7000-dss", "sh2-155", "barnard33", "barnard34", "coma_cluster", "m65", "m66", "n9999"]):
        _png(neb / f"{stem}.png", (10 + 30 * i, 20, 40), (48, 48))
    _png(neb / "n7000.png", size=(48, 48), noise=True)  # the larger of NGC 7000's two files
    sky = root / "skycultures" / "western"
    sky.mkdir(parents=True)
    (sky / "constellation_names.eng.fab").write_text('Cyg\t"Cygnus"\t_("Cygnus")\nUMi\t"Ursa Minor"\t_("Ursa Minor")\n',
                                                     encoding="utf-8")
    (root / "data").mkdir()
    (root / "data" / "constellations_spans.dat").write_text(DSO_SPANS, encoding="utf-8")
    return root


# A reader of the fixed wordings, as a question synthesiser would use it.
FACT_PATTERNS = {"type": r"^.+? is an? (.+?)(?: in the constellation|\.)",
                 "constellation": r"in the constellation (.+?)\.",
                 "magnitude": r"Its apparent (?:visual|blue) magnitude is (-?[\d.]+)\.",
                 "distance": r"It lies about ([\d,]+) light-years from Earth\.",
                 "size": r"Its apparent size is ([\d.]+(?: by [\d.]+)?) arcminutes?\."}


def _facts(text: str) -> dict:
    return {k: m.group(1) for k, pattern in FACT_PATTERNS.items() if (m := re.search(pattern, text))}


def test_add_astronomy_generates_passages_from_the_catalogue(tmp_path, deep_sky):
    kb = _KB(tmp_path / "kb", ASTRO_WIKI)
    kb.add_text("Coma Cluster", "kgeography-data", "Coma Cluster is a made-up region.")  # a title already taken
    stats = add_astronomy(deep_sky, kb, lambda items, desc: items)
    texts = {title: g["texts"] for title, g in kb.generated.items() if g["source"] == "stellarium-data"}
    assert texts == {
        # The proper name marked WK wins over the file's first one, which becomes an alias; NGC before Caldwell.
        "North America Nebula": [("North America Nebula is an HII region in the constellation Cygnus. It is also "
                                  "catalogued as NGC 7000, Caldwell 20, Sh2-117, LBN 373 and Ced 183d. It is also "
                                  "known as Cygnus Wall. Its apparent visual magnitude is 4.0. It lies about 1,890 "
                                  "light-years from Earth. Its apparent size is 120 by 100 arcminutes.")],
        # Only a B magnitude; no constellation row covers it, so none is stated.
        "Sh2-155": [("Sh2-155 is an HII region. Its apparent blue magnitude is 7.7. Its apparent size is 50 by 30 "
                     "arcminutes.")],
        "Barnard 33": ["Barnard 33 is a dark nebula. Its apparent size is 4 arcminutes."],  # opacity is no magnitude
        "Barnard 34": ["Barnard 34 is a dark nebula. Its apparent size is 1 arcminute."],
        # A file named after the object, found through names.dat in a string catalogue; its title was taken.
        "Coma Cluster (ACO 1656)": [("Coma Cluster (ACO 1656) is a cluster of galaxies. It is also catalogued as "
                                     "ACO 1656. Its apparent visual magnitude is 10.7.")],
        # "Leo Triplet" names two objects: neither is titled by it; M 66 has a name of its own.
        "Messier 65": [("Messier 65 is a galaxy. It is also catalogued as NGC 3623. Its apparent visual magnitude is "
                        "9.3. It lies about 34,900,000 light-years from Earth. Its apparent size is 6 by 3 "
                        "arcminutes.")],
        "Hamburger Galaxy": [("Hamburger Galaxy is a galaxy. It is also catalogued as Messier 66, NGC 3627 and "
                              "Arp 16. Its apparent visual magnitude is 8.9. Its apparent size is 6 by 3 arcminutes.")],
    }
    facts = _facts(texts["North America Nebula"][0])
    assert facts == {"type": "HII region", "constellation": "Cygnus", "magnitude": "4.0", "distance": "1,890",
                     "size": "120 by 100"}
    assert _facts(texts["Barnard 33"][0]) == {"type": "dark nebula", "size": "4"}
    assert _facts(texts["Barnard 34"][0]) == {"type": "dark nebula", "size": "1"}
    rows = {r["title"]: r for r in kb.images}
    assert set(rows) == set(texts)  # n9999 is in no catalogue: no image without a passage
    assert rows["North America Nebula"]["id"] == "astro:north-america-nebula"
    assert rows["North America Nebula"]["caption"] == \
        "Deep-sky image of North America Nebula (NGC 7000, C 20; Stellarium; image: Adam Block)"  # the larger file
    assert rows["Coma Cluster (ACO 1656)"]["id"] == "astro:coma-cluster-aco-1656"
    assert kb.generated["Coma Cluster"]["texts"] == ["Coma Cluster is a made-up region."]  # untouched
    assert kb.skipped["astro_more_of_entity"] == 1 and kb.skipped["astro_no_article"] == 1  # n7000-dss, n9999
    assert stats == {"candidates": 9, "titles": 0, "generated": 7,
                     "generated_facts": {"magnitude": 5, "distance": 2, "size": 6, "constellation": 1},
                     "generated_types": {"HII region": 2, "dark nebula": 2, "cluster of galaxies": 1, "galaxy": 2}}


def test_generated_titles_never_take_an_article_title(tmp_path, deep_sky):
    wiki = {**ASTRO_WIKI, "Messier 65": {"description": "Wikipedia disambiguation page", "text": "Messier 65 may be."},
            "North America Nebula": {"description": "2001 film", "text": "A film by a Canadian director."}}
    kb = _KB(tmp_path / "kb", wiki)
    add_astronomy(deep_sky, kb, lambda items, desc: items)
    titles = {r["title"] for r in kb.images}
    assert {"North America Nebula (deep-sky object)", "Messier 65 (deep-sky object)"} <= titles
    assert not titles & wiki.keys() and len(titles) == len(kb.images) == 7
    assert kb.generated["Messier 65 (deep-sky object)"]["texts"][0].startswith(
        "Messier 65 (deep-sky object) is a galaxy. It is also catalogued as NGC 3623.")


def test_constellation_from_roman_table():
    spans = _read_spans(Path("/nonexistent"))
    assert spans == [] and _constellation(1.0, 0.5, spans) is None
    table = [(300.0, 330.0, 40.0, "Cyg"), (0.0, 360.0, -90.0, "Oct")]
    assert _constellation(math.radians(314.75), math.radians(44.33), table) == "Cyg"
    # Precession matters: at J2000 RA 300.9 deg lies east of 300, but it was west of it in 1875.
    assert _constellation(math.radians(300.9), math.radians(45.0), table) == "Oct"


# ------------------------------------------------------------------------------------------------ build_demo_kb
KGM = """<?xml version="1.0" encoding="utf-8"?>
<map><mapFile>w.png</mapFile><name>World</name><divisionsName>Countries</divisionsName>
  <division><name>Freedonia</name><flag>freedonia.png</flag><capital>Fredville</capital></division></map>
"""


@pytest.fixture
def sources(tmp_path, stellarium) -> DemoSources:
    wiki = {t: {"title": t, "extract": e["text"] + " " * 20, "description": e["description"]}
            for t, e in {**ASTRO_WIKI, "Elephant": EMOJI_WIKI["Elephant"]}.items()}
    summaries = tmp_path / "summaries.json"
    summaries.write_text(json.dumps(wiki), encoding="utf-8")
    kgeo = tmp_path / "kgeo"
    (kgeo / "world.kgm").parent.mkdir()
    (kgeo / "world.kgm").write_text(KGM, encoding="utf-8")
    _png(kgeo / "flags" / "freedonia.png")
    (tmp_path / "stamps").mkdir()
    return DemoSources(summaries=summaries, kgeography_root=kgeo, stamps_root=tmp_path / "stamps",
                       emoji_font=EMOJI_FONT, stellarium_root=stellarium)


@needs_font
def test_build_demo_kb_adds_both_domains(tmp_path, sources):
    manifest = build_demo_kb(tmp_path / "out", progress=False, sources=sources)
    assert manifest["counts"]["images_by_kind"] == {"flag": 1, "emoji": 1, "astro": 7 + 2}
    astro = manifest["title_match"]["astronomy"]
    assert manifest["title_match"]["emoji"]["titles"] == 1 and astro["titles"] == 7 and astro["generated"] == 2
    passages = {p["title"]: p for p in _jsonl(tmp_path / "out" / "passages.jsonl")}
    assert passages["Coma Pinwheel Galaxy"]["id"] == "stellarium:coma-pinwheel-galaxy"
    assert passages["Coma Pinwheel Galaxy"]["source"] == "stellarium-data"
    assert passages["Crab Nebula"]["source"] == "wikipedia"  # an object with an article keeps it, no generated text
    for pkg, path in (("fonts-noto-color-emoji", EMOJI_FONT), ("stellarium-data", sources.stellarium_root)):
        entry = manifest["sources"][pkg]
        assert entry["path"] == str(path) and entry["package"] == f"debian:{pkg}"
        assert entry["license"] and entry["attribution"] and entry["version"] is None  # not the installed default
    images = _jsonl(tmp_path / "out" / "images.jsonl")
    assert {domain_of(i["id"]) for i in images} == {"flags", "emoji", "astronomy"}
    assert all((tmp_path / "out" / i["path"]).is_file() for i in images)


def test_build_demo_kb_without_the_real_packages(tmp_path, sources):
    """A font without matching emoji and an empty Stellarium tree: how other tests can fake the two sources."""
    (tmp_path / "empty" / "textures").mkdir(parents=True)
    (tmp_path / "empty" / "nebulae" / "default").mkdir(parents=True)
    (tmp_path / "empty" / "skycultures" / "western").mkdir(parents=True)
    bare = DemoSources(**{**sources.__dict__, "emoji_font": _fake_font(tmp_path / "f.ttf", [(0x1F600, 0x1F600)]),
                          "stellarium_root": tmp_path / "empty"})
    manifest = build_demo_kb(tmp_path / "out", progress=False, sources=bare)
    assert manifest["counts"]["images_by_kind"] == {"flag": 1}
    assert manifest["title_match"]["emoji"] == {"candidates": 1, "titles": 0}
    assert manifest["title_match"]["astronomy"] == {"candidates": 0, "titles": 0, "generated": 0,
                                                    "generated_facts": {}, "generated_types": {}}


@pytest.mark.parametrize("field, fix", [("emoji_font", "apt-get install fonts-noto-color-emoji"),
                                        ("stellarium_root", "apt-get install stellarium-data")])
def test_missing_domain_source_names_the_package(tmp_path, sources, field, fix):
    bad = DemoSources(**{**sources.__dict__, field: tmp_path / "nowhere"})
    with pytest.raises(InputError) as err:
        build_demo_kb(tmp_path / "out", progress=False, sources=bad)
    assert str(tmp_path / "nowhere") in str(err.value) and fix in str(err.value)



def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]
