import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads real models or runs long; run with -m slow")
    config.addinivalue_line("markers", "faults: the fault suite (kill -9 at numbered points, disk full, a reader "
                                       "beside a writer); run with -m faults")


@pytest.fixture
def tiny_kb(tmp_path):
    """A KB of 40 passages, 6 coloured-shape images and a few triples."""
    from PIL import Image, ImageDraw

    kb = tmp_path / "kb"
    (kb / "images").mkdir(parents=True)
    countries = [("Freedonia", "Fredville", (200, 30, 30)), ("Sylvania", "Sylport", (30, 160, 40)),
                 ("Latveria", "Doomstadt", (30, 40, 200)), ("Genovia", "Pyrus", (220, 200, 20)),
                 ("Elbonia", "Mudton", (120, 60, 20)), ("Wakanda", "Birnin Zana", (90, 20, 140))]
    passages, images, triples = [], [], []
    for i, (c, cap, col) in enumerate(countries):
        passages.append({"id": f"p-{c.lower()}", "title": c, "text": f"{c} is a country whose capital is {cap}. "
                         f"It has a population of {(i + 2) * 1000003} people.", "source": "test"})
        passages.append({"id": f"p-{cap.lower().replace(' ', '-')}", "title": cap,
                         "text": f"{cap} is the capital city of {c}. It was founded in {1100 + 37 * i}.",
                         "source": "test"})
        im = Image.new("RGB", (96, 64), col)
        d = ImageDraw.Draw(im)
        d.rectangle([10 + 8 * i, 10, 40 + 8 * i, 50], fill=(255 - col[0], 255 - col[1], 255 - col[2]))
        im.save(kb / "images" / f"{c.lower()}.png")
        images.append({"id": f"flag:{c.lower()}", "path": f"images/{c.lower()}.png", "title": c,
                       "caption": f"Flag of {c}"})
        triples.append({"subject": c, "relation": "capital", "object": cap})
    for j in range(40 - len(passages)):
        passages.append({"id": f"filler-{j}", "title": f"Topic {j}",
                         "text": f"Filler passage number {j} about astronomy, cooking and rivers {j * 7}.",
                         "source": "test"})
    for name, rows in (("passages", passages), ("images", images), ("triples", triples)):
        (kb / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return kb


PROSE = {  # a KB with passages and image titles only (no triples): every fact must be mined from the text
    "Zorg Tower": "Zorg Tower is a lattice tower located in Freedonia. It was completed in 1889. It has a height of "
                  "312 metres.",
    "Blip Bridge": "Blip Bridge is a suspension bridge located in Sylvania. It was opened in 1937. It has a height "
                   "of 227 metres.",
    "Mirth Castle": "Mirth Castle is a medieval castle located in Freedonia. It was built in 1102.",
    "Quill Dome": "Quill Dome is a baroque cathedral located in Latveria. It was completed in 1710. It has a height "
                  "of 111 metres.",
    "Oaken Gate": "Oaken Gate is a stone monument located in Sylvania. It was erected in 1791.",
    "Pell Spire": "Pell Spire is a gothic tower located in Latveria. It was built in 1421. It has a height of 95 "
                  "metres.",
    "Freedonia": "Freedonia is a country in Europa. Its capital is Fredville. It has a population of 2.5 million.",
    "Sylvania": "Sylvania is a country in Europa. Its capital is Sylport. It has a population of 7.1 million.",
    "Latveria": "Latveria is a country in Asiana. Its capital is Doomstadt. It has a population of 0.9 million.",
    "Fredville": "Fredville is the capital city of Freedonia. It was founded in 1204.",
    "Sylport": "Sylport is the capital city of Sylvania. It was founded in 1350.",
    "Doomstadt": "Doomstadt is the capital city of Latveria. It was founded in 1501.",
    "Europa": "Europa is a continent of many small countries.",
    "Asiana": "Asiana is a continent of steppes and mountains.",
}
MONUMENTS = ["Zorg Tower", "Blip Bridge", "Mirth Castle", "Quill Dome", "Oaken Gate", "Pell Spire"]


@pytest.fixture
def prose_kb(tmp_path):
    """Monuments in images, countries and cities in text only; no triples.jsonl."""
    from PIL import Image, ImageDraw

    kb = tmp_path / "prose-kb"
    (kb / "images").mkdir(parents=True)
    passages = [{"id": f"w-{i}", "title": t, "text": x, "source": "test"} for i, (t, x) in enumerate(PROSE.items())]
    passages += [{"id": f"filler-{j}", "title": f"Topic {j}", "text": f"Filler passage {j} about rivers and bread.",
                  "source": "test"} for j in range(20)]
    images = []
    for i, t in enumerate(MONUMENTS):
        im = Image.new("RGB", (96, 64), ((40 * i) % 255, (90 * i + 30) % 255, (150 + 17 * i) % 255))
        ImageDraw.Draw(im).ellipse([5 + 9 * i, 5, 40 + 9 * i, 55], fill=(255 - 40 * i % 255, 20 * i, 200))
        name = t.lower().replace(" ", "-")
        im.save(kb / "images" / f"{name}.png")
        images.append({"id": f"mon:{name}", "path": f"images/{name}.png", "title": t, "caption": ""})
    for name, rows in (("passages", passages), ("images", images)):
        (kb / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return kb


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A 2-layer random Llama GGUF with the packaged SmolLM2 tokenizer and chat template."""
    from tiny_models import make_tiny_gguf

    from mmhops_lite.registry import resolve

    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A 2-layer random Llama Hugging Face folder with the packaged SmolLM2 tokenizer."""
    from tiny_models import make_tiny_hf, save_gguf_tokenizer

    from mmhops_lite.registry import resolve

    root = tmp_path_factory.mktemp("tinyhf")
    tok = save_gguf_tokenizer(root / "tok", resolve("smollm2-135m-instruct"))
    return make_tiny_hf(root / "llama", tok, "llama")
