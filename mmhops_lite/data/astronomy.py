"""The astronomy image domain of the demo KB, from Stellarium: planet and moon maps, constellation art and
deep-sky images; objects without a Wikipedia summary get a passage written from Stellarium's own catalogue."""
from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from collections import Counter, defaultdict
from pathlib import Path

from mmhops_lite.data.demo_kb import _KB, STELLA_DEB, slug
from mmhops_lite.errors import InputError

# An article about a body, object or pattern in the sky (checked on the description and first sentence).
ASTRO_WORDS = re.compile(r"\b(planets?|moons?|satellites?|stars?|galax(y|ies)|nebulae?|clusters?|constellations?|"
                         r"asteroids?|supernova|remnant)\b", re.I)
# Stellarium textures that are not maps of one body: markers, halos, rings, clouds, generic comet and nebula hints.
TEXTURE_SKIP = re.compile(r"^(neb|fog|halo|pointeur|star16|comet|corona|planet-indicator|nomap|gray|zodiacal|"
                          r"testsquare|lune|cross|disk|gear|zenith|telescope)|(_rings|_normals|_cmap|-shadow|-clouds)",
                          re.I)
TEXTURE_ALIASES = {"earthmap": "Earth", "milkyway": "Milky Way"}
# Deep-sky file names: catalogue prefix and number ("m1dumont" is M 1, "n5128" NGC 5128, "sh2-308" Sh2 308).
DSO_FILE = re.compile(r"^(m|n|ic|barnard|sh2-|rcw|ldn|lbn|vdb|u|p)(\d+)", re.I)
DSO_PREFIX = {"m": "M", "n": "NGC", "ic": "IC", "barnard": "B", "sh2-": "SH2", "rcw": "RCW", "ldn": "LDN",
              "lbn": "LBN", "vdb": "VDB", "u": "UGC", "p": "PGC"}
# Files named after the object, and objects whose Wikipedia title names.dat spells otherwise ("ω Cen Cluster").
DSO_ALIASES = {"lmc": "Large Magellanic Cloud", "smc": "Small Magellanic Cloud", "etacarinae": "Carina Nebula",
               "velasnr": "Vela Supernova Remnant", "NGC 5139": "Omega Centauri", "NGC 3372": "Carina Nebula"}
# The 14 integer catalogue numbers of a catalog.dat record, in file order: the ones that name files and candidates.
CATALOG_INTS = ("NGC", "IC", "M", "C", "B", "SH2", "VDB", "RCW", "LDN", "LBN", "CR", "MEL", "PGC", "UGC")
CATALOG_STRS = ("PK", "PNG", "SNRG", "ACO", "HCG", "ESO", "VDBH")  # the 7 string ones after Ced, Arp and VV
CATALOG_LAST = ("DWB", "TR", "ST", "RU", "VDBHA")  # and the 5 integers that end a record
# Catalogue (names.dat's prefix) -> how a passage writes a designation, in order of preference for a title: that
# of Stellarium, except that NGC and IC come before Caldwell ("NGC 7000", which is also C 20).
DSO_STYLE = {"M": "Messier {}", "NGC": "NGC {}", "IC": "IC {}", "C": "Caldwell {}", "B": "Barnard {}", "SH2": "Sh2-{}",
             "VDB": "vdB {}", "RCW": "RCW {}", "LDN": "LDN {}", "LBN": "LBN {}", "CR": "Collinder {}",
             "MEL": "Melotte {}", "PGC": "PGC {}", "UGC": "UGC {}", "CED": "Ced {}", "ARP": "Arp {}", "VV": "VV {}",
             "PK": "PK {}", "PNG": "PN G{}", "SNRG": "SNR G{}", "ACO": "ACO {}", "HCG": "HCG {}", "ESO": "ESO {}",
             "VDBH": "vdBH {}", "DWB": "DWB {}", "TR": "Trumpler {}", "ST": "Stock {}", "RU": "Ruprecht {}",
             "VDBHA": "vdB-Ha {}"}
_PRIORITY = {c: i for i, c in enumerate(DSO_STYLE)}
# Object type codes of catalog.dat (Stellarium's Nebula::NebulaType, 0..36), as plain English names.
DSO_TYPES = ("galaxy", "active galaxy", "radio galaxy", "interacting galaxy", "quasar", "star cluster",
             "open star cluster", "globular star cluster", "stellar association", "star cloud", "nebula",
             "planetary nebula", "dark nebula", "reflection nebula", "bipolar nebula", "emission nebula",
             "star cluster with nebulosity", "HII region", "supernova remnant", "region of interstellar matter",
             "emission object", "BL Lacertae object", "blazar", "molecular cloud", "young stellar object",
             "possible quasar", "possible planetary nebula", "protoplanetary nebula", "star", "symbiotic star",
             "emission-line star", "supernova candidate", "supernova remnant candidate", "cluster of galaxies",
             "part of a galaxy", "region of the sky", "object of unknown nature")
DARK_NEBULA = 12  # its "V magnitude" field holds an opacity class, not a brightness
KPC_LY = 3261.56  # light-years per kiloparsec; catalog.dat gives every distance in kpc
PER_ENTITY = 1  # images per astronomical object: the first one keeps the index small


def _cited(designation: str) -> str:
    """A pattern for a designation as articles write it: "M 101" as "Messier 101" or "M101", "NGC 5457" as is."""
    prefix, number = designation.rsplit(" ", 1)
    return rf"\b({'Messier|M' if prefix == 'M' else re.escape(prefix)})\s?{re.escape(number)}\b"


def _astro_title(names: list[str], ids: list[str], kb: _KB, suffixes: tuple[str, ...]):
    """(title, rank) of the first name with an article about a sky object; rank puts first an article that cites
    one of the object's designations (M 99 is also called "Pinwheel Galaxy", the article's M 101 is not M 99)."""
    for i, name in enumerate(filter(None, names)):
        for cand in [f"{name} {s}" if s[0].isupper() else f"{name} ({s})" for s in suffixes] + [name]:
            title = kb.lookup(cand)
            entry = kb.wiki.get(title) if title else None
            # A sentence-case title is a class of objects ("Starburst galaxy"), not one object.
            if not entry or re.search(r" (?!(of|the|and|in)\b)[a-z]", re.sub(r"\s*\([^)]*\)$", "", title)):
                continue
            if ASTRO_WORDS.search(entry["description"] + " " + entry["text"].split(". ")[0]):
                return title, (0 if any(re.search(_cited(d), entry["text"]) for d in ids) else 1, i)
    return None


def _label(title: str, kb: _KB) -> str:
    """ "Io (moon)" -> "Io", "Crab Nebula" -> "the Crab Nebula" (as its article begins)."""
    label = re.sub(r"\s*\([^)]*\)$", "", title)
    return f"the {label}" if kb.wiki.get(title, {}).get("text", "").startswith(f"The {label}") else label


def _read_names(path: Path, well_known_first: bool = False) -> dict[str, list[str]]:
    """names.dat: designation ("NGC 1952") -> proper names in file order (the well-known one first), or with the
    names whose sources include "WK" (the file's mark of the preferred name) moved first."""
    names, well_known = defaultdict(list), set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.search(r'_\("([^"]+)"\)', line)
        if line.startswith("#") or not m or not line[:5].strip():
            continue
        key = f"{line[:5].strip().upper()} {line[5:20].strip()}"
        names[key].append(m.group(1))
        if re.search(r"#.*\bWK\b", line[m.end():]):
            well_known.add((key, m.group(1)))
    if well_known_first:
        for key, entry in names.items():
            entry.sort(key=lambda n, k=key: (k, n) not in well_known)  # stable: file order otherwise
    return names


_HEAD = struct.Struct(">I4dI")  # id, RA and Dec (J2000, radians), B and V magnitude (99 = unknown), type
_SIZE = struct.Struct(">2di6d")  # axes (degrees), orientation, redshift, parallax and distance (kpc), each +- error


def _read_catalog(catalog: Path, wanted: set[str]) -> dict[str, dict]:
    """Each designation of the objects named in `wanted` -> that object's record, from Stellarium's catalog.dat.

    A gzipped Qt data stream (big-endian; a string is a uint32 byte count, 0xFFFFFFFF for null, then UTF-16):
    version and edition, then per object uint32 id, 4 doubles (RA, Dec, B and V mag), uint32 type, string morphology,
    2 doubles (axes), int32 orientation, 6 doubles (redshift, parallax, distance, each with its error), 14 uint32
    catalogue numbers, string Ced, 2 uint32 (Arp, VV), 7 strings (PK, PN G, SNR G, ACO, HCG, ESO, vdBH), 5 uint32
    (DWB, Tr, St, Ru, vdB-Ha). A number 0 or an empty string means "not in that catalogue".
    """
    data = gzip.decompress(Path(catalog).read_bytes())
    u32, ints2, ints5, ints7, ints14 = (struct.Struct(f">{n}I").unpack_from for n in (1, 2, 5, 7, 14))
    none = {0, 0xFFFFFFFF}  # an empty or a null string
    # (catalogue, number) pairs, compared as the file holds them: integers, or text for the string catalogues.
    textual = {"CED", *CATALOG_STRS}
    pairs = {(c, n if c in textual or not n.isdigit() else int(n)) for c, n in (w.split(" ", 1) for w in wanted)}

    def string(pos: int) -> tuple[str, int]:
        (n,) = u32(data, pos)
        return ("", pos + 4) if n in none else (data[pos + 4:pos + 4 + n].decode("utf-16-be"), pos + 4 + n)

    pos = string(string(0)[1])[1]  # version ("3.16") and edition
    found = {}
    while pos < len(data):  # one pass over ~95,000 objects: kept to cheap steps, the slow path only for a hit
        head, (_, size) = pos, string(pos + 40)
        nums = ints14(data, size + 68)
        ced, pos = string(size + 124)
        more = [("CED", ced), *zip(("ARP", "VV"), ints2(data, pos))]
        pos += 8
        if set(ints7(data, pos)) <= none:  # most objects are in none of the 7 string catalogues
            pos += 28
        else:
            for prefix in CATALOG_STRS:
                text, pos = string(pos)
                more.append((prefix, text))
        more += zip(CATALOG_LAST, ints5(data, pos))
        pos += 20
        if pairs.isdisjoint(zip(CATALOG_INTS, nums)) and pairs.isdisjoint(more):
            continue
        ids = {f"{c} {n}" for c, n in [*zip(CATALOG_INTS, nums), *more] if n}
        nb, ra, dec, bmag, vmag, kind = _HEAD.unpack_from(data, head)
        major, minor, _, _, _, _, _, kpc, _ = _SIZE.unpack_from(data, size)
        rec = {"nb": nb, "ids": sorted(ids, key=lambda i: (_PRIORITY[i.split()[0]], len(i), i)), "type": kind,
               "bmag": bmag, "vmag": vmag, "major": major, "minor": minor, "kpc": kpc, "ra": ra, "dec": dec}
        found.update(dict.fromkeys(ids, rec))
    return found


def _name_key(name: str) -> str:
    """ "Jones-Emberson 1", "jones_emberson1" -> "jonesemberson1": how file stems and names.dat names are compared."""
    return slug(name).replace("-", "")


def _nebula_entries(folder: Path, kb: _KB) -> tuple[list[tuple], dict[str, list[str]]]:
    """(file, candidate names, designations, credit, catalogue record or None) for each image in textures.json, in
    file order; and names.dat."""
    if not (folder / "textures.json").is_file():
        return [], {}
    text = (folder / "textures.json").read_text(encoding="utf-8", errors="replace")
    # Not strict JSON ("-.9794"), so read the two fields each tile needs with patterns.
    tiles = [(m.group(2), re.search(r'"short"\s*:\s*"([^"]*)"', m.group(1), re.I))
             for m in re.finditer(r'\{\s*"imageCredits"\s*:\s*(\{[^}]*\})\s*,\s*"imageUrl"\s*:\s*"([^"]+)"', text)]
    names = _read_names(folder / "names.dat") if (folder / "names.dat").is_file() else {}
    exact, loose = defaultdict(set), defaultdict(set)  # name -> designations; loose drops "Nebula", "Cluster", "Galaxy"
    for designation, proper in names.items():
        for name in proper:
            exact[_name_key(name)].add(designation)
            loose[_name_key(re.sub(r"\s+(nebula|cluster|galaxy)$", "", name, flags=re.I))].add(designation)
    keys, named = {}, {}
    for url, _ in tiles:
        stem = re.sub(r"(-vasey|-dss|-sdss2?|-2mass|-trev|-darkskies|dumont|oleg|spano)$", "", Path(url).stem)
        if m := DSO_FILE.match(stem):
            keys[url] = f"{DSO_PREFIX[m.group(1).lower()]} {int(m.group(2))}"
        else:  # "coma_cluster" is names.dat's "Coma Cluster" (ACO 1656), "Jones-Emberson1" its "Jones-Emberson 1"
            key = _name_key(re.sub(r"[-_]\d+$", "", stem))
            named[url] = exact.get(key) or loose.get(key) or set()
    catalog = {}
    try:  # without the cross-identifications only names.dat's own designation names a file ("m1" has none)
        if (folder / "catalog.dat").is_file():
            catalog = _read_catalog(folder / "catalog.dat", set(keys.values()).union(*named.values()))
    except (OSError, EOFError, struct.error, zlib.error, UnicodeDecodeError, KeyError):  # damaged, or another format
        kb.skipped["astro_catalog_unreadable"] += 1
    entries = []
    for url, credit in tiles:
        stem = Path(url).stem
        words = re.sub(r"(-vasey|-dss|-sdss2?|-2mass|-trev|-darkskies|dumont|oleg|spano)$", "", stem)
        words = re.sub(r"[-_]*\d*$", "", words.split("-")[0] if stem.lower().startswith("smc") else words)
        rec = catalog.get(keys.get(url, ""))
        if url in named:  # a name is trusted only when it leads to exactly one catalogue object
            recs = {r["nb"]: r for d in named[url] if (r := catalog.get(d))}
            rec = next(iter(recs.values())) if len(recs) == 1 else None
        cross = {i for i in rec["ids"] if i.split()[0] in CATALOG_INTS} if rec and url in keys else set()
        ids = sorted(cross or ({keys[url]} if url in keys else set()),
                     key=lambda i: (not i.startswith("M "), i))  # Messier first, then alphabetical
        cands = [DSO_ALIASES.get(words.lower(), "")]
        cands += [n for i in ids for n in [DSO_ALIASES.get(i, "")] + names.get(i, [])]
        cands += [f"Messier {i[2:]}" for i in ids if i.startswith("M ")]
        cands += [] if url in keys else [re.sub(r"(?<=[a-z])(?=[A-Z])|_", " ", words)]  # "etaCarinae" -> "eta Carinae"
        entries.append((url, cands, ids, credit.group(1).strip() if credit else "", rec))
    return entries, names


def _read_spans(path: Path) -> list[tuple[float, float, float, str]]:
    """Roman's (1987) constellation table: (RA from, RA to, Dec from, abbreviation), B1875 degrees, in file order."""
    spans = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if m := re.match(r"^\s*(\d+):(\d+):(\d+)\s+(\d+):(\d+):(\d+)\s+(-?)(\d+):(\d+)\s+([A-Za-z]{3})\s*$", line):
                n = [int(g) for g in m.groups()[:6] + m.groups()[7:9]]
                dec = (n[6] + n[7] / 60) * (-1 if m.group(7) else 1)
                spans.append(((n[0] * 3600 + n[1] * 60 + n[2]) / 240, (n[3] * 3600 + n[4] * 60 + n[5]) / 240, dec,
                              m.group(10)))
    return spans


def _constellation(ra: float, dec: float, spans: list[tuple[float, float, float, str]]) -> str | None:
    """The IAU constellation (abbreviation) at J2000 RA/Dec in radians: precessed to B1875, the epoch of the
    boundaries (IAU 1976 precession), then the first row (rows go north to south) whose lower Dec limit is at or
    below it and whose RA range holds it."""
    t = (2405889.25855 - 2451545.0) / 36525  # B1875.0 in Julian centuries from J2000
    arcsec = math.pi / 648000
    zeta = (2306.2181 * t + 0.30188 * t ** 2 + 0.017998 * t ** 3) * arcsec
    z = (2306.2181 * t + 1.09468 * t ** 2 + 0.018203 * t ** 3) * arcsec
    theta = (2004.3109 * t - 0.42665 * t ** 2 - 0.041833 * t ** 3) * arcsec
    a = math.cos(dec) * math.sin(ra + zeta)
    b = math.cos(theta) * math.cos(dec) * math.cos(ra + zeta) - math.sin(theta) * math.sin(dec)
    c = math.sin(theta) * math.cos(dec) * math.cos(ra + zeta) + math.cos(theta) * math.sin(dec)
    ra75, dec75 = math.degrees(math.atan2(a, b) + z) % 360, math.degrees(math.asin(max(-1.0, min(1.0, c))))
    return next((abbr for lo, hi, south, abbr in spans if dec75 >= south and lo <= ra75 < hi), None)


def _styled(designation: str) -> str:
    """ "SH2 155" -> "Sh2-155", "M 27" -> "Messier 27", "PNG 164.8+31.1" -> "PN G164.8+31.1"."""
    prefix, number = designation.split(" ", 1)
    return DSO_STYLE[prefix].format(number)


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _dso_facts(rec: dict, constellation: str | None) -> dict:
    """The catalogue fields a passage states, formatted; a field that is unknown (or meaningless) is left out."""
    facts = {"type": DSO_TYPES[rec["type"]] if rec["type"] < len(DSO_TYPES) else "deep-sky object"}
    if constellation:
        facts["constellation"] = constellation
    if rec["type"] != DARK_NEBULA and rec["vmag"] < 50:  # 99 marks an unknown magnitude
        facts["magnitude"] = ("visual", f"{rec['vmag']:.1f}")
    elif rec["type"] != DARK_NEBULA and rec["bmag"] < 50:
        facts["magnitude"] = ("blue", f"{rec['bmag']:.1f}")
    if rec["kpc"] * KPC_LY >= 1:  # 0 marks an unknown distance
        ly = rec["kpc"] * KPC_LY
        facts["distance"] = f"{round(ly, 2 - math.floor(math.log10(ly))):,.0f}"  # three significant figures
    axes = [f"{round(a * 60, 1):g}" for a in (rec["major"], rec["minor"]) if round(a * 60, 1) > 0]
    if axes:
        facts["size"] = axes[0] if len(axes) == 1 or axes[0] == axes[1] else f"{axes[0]} by {axes[1]}"
    return facts


def _own_names(rec: dict, names: dict[str, list[str]], owners: dict[str, set[str]]) -> list[str]:
    """The object's proper names that names.dat gives to no other object ("Leo Triplet" names three galaxies)."""
    ids = set(rec["ids"])
    return list(dict.fromkeys(n for i in rec["ids"] for n in names.get(i, []) if owners[n] <= ids))


def _dso_title(rec: dict, own: list[str], kb: _KB, used: set[str]) -> tuple[str, str]:
    """(title, the name it uses): the object's first own proper name, else its preferred designation; with
    " (deep-sky object)" when an article has that title, the designation in brackets when a passage already does."""
    design = _styled(rec["ids"][0])
    base = own[0] if own else design
    options = [f"{base} (deep-sky object)" if kb.lookup(base) else base]
    options += [f"{base} ({design})"] if own else []
    options += [f"{design} (Stellarium DSO {rec['nb']})"]
    return next((t for t in options if slug(t) not in used and not kb.lookup(t)), options[-1]), base


def _dso_passage(title: str, base: str, rec: dict, own: list[str], facts: dict) -> str:
    """Up to six plain sentences, one per known field, each in a fixed wording that a pattern can read back."""
    kind, where = facts["type"], f" in the constellation {facts['constellation']}" if "constellation" in facts else ""
    out = [f"{title} is {'an' if kind[0] in 'aeiouH' else 'a'} {kind}{where}."]
    if others := [d for d in map(_styled, rec["ids"]) if d != base]:
        out.append(f"It is also catalogued as {_listed(others)}.")
    if aliases := [n for n in own if n != base][:3]:
        out.append(f"It is also known as {_listed(aliases)}.")
    if "magnitude" in facts:
        out.append(f"Its apparent {facts['magnitude'][0]} magnitude is {facts['magnitude'][1]}.")
    if "distance" in facts:
        out.append(f"It lies about {facts['distance']} light-years from Earth.")
    if "size" in facts:
        out.append(f"Its apparent size is {facts['size']} arcminute{'' if facts['size'] == '1' else 's'}.")
    return " ".join(out)


def _add_generated(spare: list[tuple], covered: set[int], names: dict, sky: dict[str, str], spans: list, kb: _KB,
                   track) -> dict:
    """One image and one generated passage per catalogue object whose images found no article; returns counts."""
    groups = defaultdict(list)  # object id -> [(-bytes, file order, path, record, credit)]
    for entry in sorted(spare, key=lambda e: e[1]):
        groups[entry[3]["nb"]].append(entry)
    owners = defaultdict(set)  # proper name -> the designations names.dat gives it to
    for designation, proper in names.items():
        for name in proper:
            owners[name].add(designation)
    used = {slug(t) for t in kb.generated}
    stats = {"generated": 0, "generated_facts": Counter(), "generated_types": Counter()}
    for nb, group in track(list(groups.items()), "stellarium catalogue"):
        if nb in covered:  # another tile of this object already shows it under its article
            kb.skipped["astro_more_of_entity"] += len(group)
            continue
        rec = group[0][3]
        own = _own_names(rec, names, owners)
        title, base = _dso_title(rec, own, kb, used)
        facts = _dso_facts(rec, sky.get(_constellation(rec["ra"], rec["dec"], spans) or ""))
        main = [i for i in rec["ids"] if i.split()[0] in ("M", "C", "NGC", "IC", "B")]
        done = False
        for *_, path, _, credit in sorted(group):  # the largest file has the most structure, as for articles
            if done:
                kb.skipped["astro_more_of_entity"] += 1
                continue
            note = "; ".join(filter(None, [", ".join(main), "Stellarium", f"image: {credit}" if credit else ""]))
            if kb.add_image(path, "astro", Path(slug(title) or "x"), title, f"Deep-sky image of {title} ({note})"):
                kb.add_text(title, STELLA_DEB, _dso_passage(title, base, rec, own, facts))
                used.add(slug(title))
                done = True
                stats["generated"] += 1
                stats["generated_facts"].update(k for k in ("magnitude", "distance", "size", "constellation")
                                                if k in facts)
                stats["generated_types"][facts["type"]] += 1
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}


def add_astronomy(root: Path, kb: _KB, track) -> dict:
    """Add Stellarium planet and moon maps, deep-sky images and constellation art of objects with an article, and
    a deep-sky image plus a passage generated from Stellarium's catalogue for each other catalogued object."""
    root = Path(root)
    folders = {"textures": root / "textures", "nebulae": root / "nebulae" / "default",
               "constellations": root / "skycultures" / "western"}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise InputError(f"Stellarium {name} folder not found: {folder}", path=folder,
                             fix=f"apt-get install {STELLA_DEB}")
    items = []  # (source file, title candidates, designations, title suffixes, caption template, record, credit)
    for png in sorted(folders["textures"].glob("*.png")):
        if not TEXTURE_SKIP.search(png.stem):
            name = TEXTURE_ALIASES.get(png.stem.lower(), png.stem.replace("_", " ").title())
            items.append((png, [name], [], ("moon", "planet", "dwarf planet"), "Texture map of {label} (Stellarium)",
                          None, ""))
    entries, names = _nebula_entries(folders["nebulae"], kb)
    for url, cands, ids, credit, rec in entries:
        main = [i for i in ids if i.split()[0] in ("M", "C", "NGC", "IC", "B")]  # the catalogues people quote
        note = "; ".join(filter(None, [", ".join(main), "Stellarium", f"image: {credit}" if credit else ""]))
        items.append((folders["nebulae"] / url, cands, ids, ("Galaxy", "Nebula", "star cluster"),
                      f"Deep-sky image of {{label}} ({note})", rec, credit))
    sky = folders["constellations"]
    english = {}
    if (sky / "constellation_names.eng.fab").is_file():
        for line in (sky / "constellation_names.eng.fab").read_text(encoding="utf-8", errors="replace").splitlines():
            if m := re.match(r'^\s*(\w+)\s+"[^"]*"\s+_\("([^"]+)"\)', line):
                english[m.group(1)] = m.group(2)
    if (sky / "constellationsart.fab").is_file():
        for line in (sky / "constellationsart.fab").read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.startswith("#") and parts[0] in english:
                items.append((sky / parts[1], [english[parts[0]]], [], ("constellation",),
                              "Constellation art of {label} (Stellarium western sky culture, Johan Meuris)", None, ""))
    by_title = defaultdict(list)  # title -> [(rank, -bytes, file order, path, caption, record, credit)]
    spare = []  # (-bytes, file order, path, record, credit) of catalogued deep-sky images not shown under an article
    for order, (path, cands, ids, suffixes, caption, rec, credit) in enumerate(track(items, "stellarium")):
        # Of equal matches (the 16 tiles of the LMC) the largest file has the most structure, not just stars.
        size = path.stat().st_size if path.is_file() else 0
        if found := _astro_title(cands, ids, kb, suffixes):
            by_title[found[0]].append((found[1], -size, order, path, caption, rec, credit))
        elif rec:
            spare.append((-size, order, path, rec, credit))
        else:
            kb.skipped["astro_no_article"] += 1
    added, covered = Counter(), set()
    for title, matches in by_title.items():
        for _, size, order, path, caption, rec, credit in sorted(matches, key=lambda m: m[:3]):
            if added[title] >= PER_ENTITY:
                if rec:  # M 99 loses "Pinwheel Galaxy" to M 101, whose article it is: M 99 is still an object
                    spare.append((size, order, path, rec, credit))
                else:
                    kb.skipped["astro_more_of_entity"] += 1
                continue
            caption = caption.replace("{label}", _label(title, kb))
            if kb.add_image(path, "astro", Path(slug(title) or "x"), title, caption):
                added[title] += 1
                covered.update([rec["nb"]] if rec else [])
    spans = _read_spans(root / "data" / "constellations_spans.dat")
    if (folders["nebulae"] / "names.dat").is_file():  # for titles: the file's preferred name first
        names = _read_names(folders["nebulae"] / "names.dat", well_known_first=True)
    return {"candidates": len(items), "titles": len(added),
            **_add_generated(spare, covered, names, english, spans, kb, track)}
