import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads real models or runs long; run with -m slow")


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
