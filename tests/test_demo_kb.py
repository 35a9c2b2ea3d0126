"""build_demo_kb on a tiny fake source tree: real content, stable ids, atomic files, clear errors."""
import json
from pathlib import Path

import pytest
from PIL import Image

from mmhops_lite.data.demo_kb import DemoSources, build_demo_kb, slug
from mmhops_lite.errors import InputError

SUMMARIES = {
    "France": {"title": "France", "extract": "France is a country in Western Europe. Its capital is Paris.",
               "description": "Country in Western Europe", "topic": "Geography"},
    "Paris": {"title": "Paris", "extract": "Paris is the capital and largest city of France.",
              "description": "Capital of France", "topic": "Geography"},
    "Lion": {"title": "Lion", "extract": "The lion is a large cat of the genus Panthera, native to Africa.",
             "description": "Large cat of the genus Panthera", "topic": "Biology and health sciences"},
    "Turkey": {"title": "Turkey", "extract": "Turkey is a country in West Asia and Southeast Europe.",
               "description": "Country in West Asia and Southeast Europe", "topic": "Uncategorized"},
    "Empty": {"title": "Empty", "extract": "", "description": "", "topic": "Uncategorized"},
}

KGM = """<?xml version="1.0" encoding="utf-8"?>
<map><mapFile>europe.png</mapFile><name>Europe</name><divisionsName>Countries</divisionsName><author>t</author>
  <division><name>Water</name><ignore>yes</ignore><color><red>0</red><green>0</green><blue>255</blue></color></division>
  <division><name>France</name><flag>france.png</flag><capital>Paris</capital>
    <color><red>1</red><green>2</green><blue>3</blue></color></division>
  <division><name>Freedonia</name><flag>freedonia.png</flag><capital>Fredville</capital>
    <color><red>4</red><green>5</green><blue>6</blue></color></division>
</map>
"""


def _flag(path: Path, colours, size=(300, 200)) -> None:
    im = Image.new("RGB", size, colours[0])
    im.paste(Image.new("RGB", (size[0] // 2, size[1]), colours[1]), (size[0] // 2, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def sources(tmp_path) -> DemoSources:
    summaries = tmp_path / "wiki" / "data" / "summaries_en-us.json"
    summaries.parent.mkdir(parents=True)
    summaries.write_text(json.dumps(SUMMARIES, ensure_ascii=False), encoding="utf-8")
    kgeo = tmp_path / "kgeography"
    (kgeo / "flags").mkdir(parents=True)
    (kgeo / "europe.kgm").write_text(KGM, encoding="utf-8")
    _flag(kgeo / "flags" / "france.png", [(0, 35, 149), (237, 41, 57)])
    _flag(kgeo / "flags" / "freedonia.png", [(0, 128, 0), (255, 255, 0)])
    stamps = tmp_path / "stamps"
    lion = stamps / "animals" / "mammals" / "lion.png"
    lion.parent.mkdir(parents=True)
    Image.new("RGBA", (400, 300), (0, 0, 0, 0)).save(lion)  # fully transparent: must come out white, not black
    (lion.with_suffix(".txt")).write_text("A lion.\nfr.utf8=Un lion.\nen_GB.utf8=A lion.\n", encoding="utf-8")
    turkey = stamps / "animals" / "birds" / "turkey.png"
    turkey.parent.mkdir(parents=True)
    Image.new("LA", (50, 60), (90, 255)).save(turkey)
    turkey.with_suffix(".txt").write_text("A turkey.\n", encoding="utf-8")
    (stamps / "animals" / "birds" / "only_svg.svg").write_text("<svg/>", encoding="utf-8")
    (stamps / "animals" / "birds" / "only_svg.txt").write_text("A bird.\n", encoding="utf-8")
    # The two newer domains are faked empty here (tests/test_domains.py covers them): a font whose only emoji has
    # no article, and a Stellarium tree without images.
    from test_domains import _fake_font

    sky = tmp_path / "stellarium"
    for sub in ("textures", "nebulae/default", "skycultures/western"):
        (sky / sub).mkdir(parents=True)
    return DemoSources(summaries=summaries, kgeography_root=kgeo, stamps_root=stamps,
                       emoji_font=_fake_font(tmp_path / "emoji.ttf", [(0x1F600, 0x1F600)]), stellarium_root=sky)


def _rows(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_builds_real_content(tmp_path, sources):
    out = tmp_path / "kb"
    manifest = build_demo_kb(out, progress=False, sources=sources)
    passages, images, triples = (_rows(out / f"{n}.jsonl") for n in ("passages", "images", "triples"))
    assert all(set(p) == {"id", "title", "text", "source"} for p in passages)
    assert all(set(i) == {"id", "path", "title", "caption"} for i in images)
    assert len({p["id"] for p in passages}) == len(passages) and len({i["id"] for i in images}) == len(images)

    by_title = {p["title"]: p for p in passages}
    assert "Empty" not in by_title  # an article without text is not a passage
    assert by_title["France"]["id"] == "wiki:france" and by_title["France"]["source"] == "wikipedia"
    assert by_title["Freedonia"]["source"] == "kgeography-data" and "Fredville" in by_title["Freedonia"]["text"]
    # The stamp turkey must not be linked to the country Turkey: it gets its own disambiguated passage.
    assert by_title["Turkey (birds)"]["source"] == "tuxpaint-stamps-default"

    imgs = {i["id"]: i for i in images}
    assert set(imgs) == {"flag:france", "flag:freedonia", "stamp:animals/mammals/lion", "stamp:animals/birds/turkey"}
    assert imgs["flag:france"]["title"] == "France" and imgs["flag:france"]["caption"] == "Flag of France"
    assert imgs["stamp:animals/mammals/lion"]["title"] == "Lion"
    assert imgs["stamp:animals/birds/turkey"]["title"] == "Turkey (birds)"
    assert all(i["title"] in by_title for i in images)
    for i in images:
        with Image.open(out / i["path"]) as im:
            assert im.mode == "RGB" and max(im.size) <= 256
    with Image.open(out / imgs["flag:france"]["path"]) as im:
        assert im.size == (256, 171)
        assert im.getpixel((10, 10)) == (0, 35, 149) and im.getpixel((245, 160)) == (237, 41, 57)
    with Image.open(out / imgs["stamp:animals/mammals/lion"]["path"]) as im:
        assert im.getpixel((5, 5)) == (255, 255, 255)

    trip = {(t["subject"], t["relation"], t["object"]) for t in triples}
    assert ("France", "capital", "Paris") in trip and ("France", "part of", "Europe") in trip
    assert ("Freedonia", "capital", "Fredville") in trip and ("Lion", "category", "Mammals") in trip
    assert not any(t[0] == "Water" for t in trip)

    counts = manifest["counts"]
    assert counts["passages"] == len(passages) == 4 + 2  # 4 articles with text + Freedonia, Turkey (birds)
    assert counts["images"] == 4 and counts["images_with_wikipedia_passage"] == 2
    assert counts["triples_by_relation"] == {"capital": 2, "part of": 2, "category": 2}
    assert counts["skipped"]["stamp_svg_only"] == 1
    assert manifest["title_match"]["flag_titles"] == 2 and manifest["title_match"]["rate"] == 0.5
    on_disk = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk["counts"] == counts
    assert "CC-BY-SA-4.0" in on_disk["sources"]["wikipedia"]["license"]
    for name in ("kgeography-data", "tuxpaint-stamps-default"):
        assert on_disk["sources"][name]["license"] and on_disk["sources"][name]["attribution"]
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries behind


def test_duplicate_flags_kept_once_and_rebuild_is_stable(tmp_path, sources):
    world = KGM.replace("<name>Europe</name>", "<name>World</name>").replace("freedonia.png", "france_copy.png")
    (sources.kgeography_root / "world.kgm").write_text(world, encoding="utf-8")
    _flag(sources.kgeography_root / "flags" / "france_copy.png", [(0, 35, 149), (237, 41, 57)])
    out = tmp_path / "kb"
    first = build_demo_kb(out, progress=False, sources=sources)
    # World lists france.png again and a byte-identical copy under another name: both dropped by content hash.
    assert first["counts"]["skipped"]["flag_duplicate"] == 2 and first["counts"]["images"] == 4
    images = (out / "images.jsonl").read_text(encoding="utf-8")
    build_demo_kb(out, progress=True, sources=sources)  # also exercises the rich progress bars
    assert (out / "images.jsonl").read_text(encoding="utf-8") == images


@pytest.mark.parametrize("field, fix", [("summaries", "pip install"), ("kgeography_root", "kgeography-data"),
                                        ("stamps_root", "tuxpaint-stamps-default")])
def test_missing_source_names_path_and_fix(tmp_path, sources, field, fix):
    missing = tmp_path / "nowhere"
    bad = DemoSources(**{**sources.__dict__, field: missing})
    with pytest.raises(InputError) as err:
        build_demo_kb(tmp_path / "kb", progress=False, sources=bad)
    assert str(missing) in str(err.value) and fix in str(err.value)


def test_malformed_summaries_is_an_input_error(tmp_path, sources):
    sources.summaries.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="summaries"):
        build_demo_kb(tmp_path / "kb", progress=False, sources=sources)


def test_slug_is_ascii_and_stable():
    assert slug("Côte d'Ivoire") == "cote-d-ivoire"
    assert slug("Łódź") == "lodz"
    assert slug("Eiffel Tower") == "eiffel-tower"
