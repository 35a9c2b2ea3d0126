"""Encoders: ONNX matches torch on real inputs, shapes and order hold, bad input and stale caches are caught."""
from __future__ import annotations

import glob
import importlib.util
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mmhops_lite.encoders import (
    Encoder,
    ImageEncoder,
    get_image_encoder,
    get_text_encoder,
    imagenet_labels,
    load_image,
    ocr_text,
)
from mmhops_lite.encoders.base import cached_onnx, check_backend, stamp_ok
from mmhops_lite.encoders.image import default_weights, preprocess
from mmhops_lite.errors import ConfigError, InputError, ModelNotFound

SENTENCES = [
    "The Eiffel Tower was designed by the engineering company of Gustave Eiffel.",
    "Gustave Eiffel was born in Dijon, France, in 1832.",
    "A cat is sleeping on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "",
    "Ünïcödé text, emoji 🚀 and 数字 123 mixed together.",
    "word " * 400,  # longer than the 256-token limit: must be truncated, not crash
    "Paris",
]


def _font(size: int):
    for path in ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                 *glob.glob("/usr/share/fonts/**/DejaVuSans*.ttf", recursive=True),
                 *glob.glob("/usr/share/fonts/**/*.ttf", recursive=True)]:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return None


def synthetic_images() -> list:
    """Gradients, shapes and drawn text in several PIL modes and sizes."""
    out = []
    x = np.linspace(0, 255, 320, dtype=np.float32)
    grad = np.stack([np.tile(x, (240, 1)), np.tile(x[::-1], (240, 1)), np.full((240, 320), 90.0)], -1)
    out.append(Image.fromarray(grad.astype(np.uint8), "RGB"))
    im = Image.new("RGB", (300, 200), (20, 120, 200))
    d = ImageDraw.Draw(im)
    d.ellipse([40, 30, 160, 150], fill=(250, 200, 0))
    d.rectangle([180, 60, 280, 180], fill=(200, 30, 30))
    out.append(im)
    im = Image.new("L", (128, 256), 255)
    ImageDraw.Draw(im).text((10, 100), "mmhops", fill=0, font=_font(28))
    out.append(im)
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).polygon([(100, 10), (190, 190), (10, 190)], fill=(0, 150, 0, 255))
    out.append(rgba)
    out.append(Image.new("RGB", (3, 700), (128, 64, 32)))  # extreme aspect ratio
    return out


def real_photos() -> list[tuple[Path, str | None]]:
    """(photo, expected top-3 ImageNet label or None) for the photos this machine happens to have."""
    found = []
    for pkg, rel, label in [("sklearn", "datasets/images/flower.jpg", "daisy"),
                            ("sklearn", "datasets/images/china.jpg", "palace"),
                            ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", None)]:
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            p = Path(next(iter(spec.submodule_search_locations))) / rel
            if p.is_file():
                found.append((p, label))
    lighthouse = Path("/usr/share/tuxpaint/templates/lighthouse.jpg")
    if lighthouse.is_file():
        found.append((lighthouse, "beacon"))
    stamps = sorted(glob.glob("/usr/share/tuxpaint/stamps/animals/**/*.png", recursive=True))[:4]
    found += [(Path(p), None) for p in stamps]  # RGBA photos: exercises compositing on white
    return found


# ---------------------------------------------------------------- session-wide real models

@pytest.fixture(scope="session")
def text_pair():
    """ONNX and torch MiniLM from the default MMHOPS_HOME cache (exported once per machine)."""
    return get_text_encoder("onnx"), get_text_encoder("torch")


@pytest.fixture(scope="session")
def image_pair():
    """ONNX and torch EfficientNet-lite0."""
    return get_image_encoder("onnx"), get_image_encoder("torch")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1)


# ---------------------------------------------------------------- text

def test_text_onnx_matches_torch(text_pair):
    onnx, ref = text_pair
    a, b = onnx.encode(SENTENCES), ref.encode(SENTENCES)
    assert a.shape == b.shape == (len(SENTENCES), 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert _cos(a, b).min() >= 0.999
    assert onnx.id == ref.id == "all-minilm-l6-v2" and onnx.dim == 384
    assert isinstance(onnx, Encoder) and isinstance(ref, Encoder)


def test_text_order_and_batching(text_pair):
    onnx, _ = text_pair
    full = onnx.encode(SENTENCES, batch_size=32)
    np.testing.assert_allclose(onnx.encode(SENTENCES, batch_size=3), full, atol=1e-5)
    np.testing.assert_allclose(onnx.encode(SENTENCES[::-1], batch_size=2)[::-1], full, atol=1e-5)
    single = np.vstack([onnx.encode([s]) for s in SENTENCES])
    np.testing.assert_allclose(single, full, atol=1e-5)
    assert onnx.encode([]).shape == (0, 384)


def test_text_semantics_and_bad_input(text_pair):
    onnx, _ = text_pair
    q, near, far = onnx.encode(["Where was Gustave Eiffel born?", SENTENCES[1], SENTENCES[3]])
    assert q @ near > q @ far + 0.2
    with pytest.raises(InputError, match="position 1"):
        onnx.encode(["fine", b"bytes are not text"])


def test_factory_caches_and_validates(text_pair):
    assert get_text_encoder("onnx") is text_pair[0]
    assert get_text_encoder("onnx", model_path=text_pair[0].folder).id == "all-minilm-l6-v2"
    with pytest.raises(ConfigError, match="onnx"):
        check_backend("tensorflow")
    with pytest.raises(ModelNotFound):
        get_text_encoder("onnx", model_path="/nonexistent/model-folder")


# ---------------------------------------------------------------- images

def test_image_onnx_matches_torch_synthetic(image_pair):
    onnx, ref = image_pair
    imgs = synthetic_images()
    a, b = onnx.encode(imgs), ref.encode(imgs)
    assert a.shape == (len(imgs), 1344) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert _cos(a, b).min() >= 0.999
    assert onnx.id == ref.id == "efficientnet-lite0/squash-mv6-rgb64" and onnx.model_id == "efficientnet-lite0"


def test_image_real_photos(image_pair):
    photos = real_photos()
    if not photos:
        pytest.skip("no real photos on this machine")
    onnx, ref = image_pair
    paths = [p for p, _ in photos]
    assert _cos(onnx.encode(paths), ref.encode(paths)).min() >= 0.999
    for (path, label), (emb, top) in zip(photos, onnx.describe(paths, top_k=3)):
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] > 0
        if label:  # also guards the preprocessing: a wrong mean/std or crop loses these
            assert label in [name for name, _ in top], (path, top)


def test_image_order_inputs_and_describe(image_pair, tmp_path):
    onnx, _ = image_pair
    imgs = synthetic_images()[:3]
    png = tmp_path / "shape.png"
    imgs[1].save(png)
    buf = io.BytesIO()
    imgs[2].save(buf, format="PNG")
    full = onnx.encode(imgs, batch_size=2)
    single = np.vstack([onnx.encode([im]) for im in imgs])
    np.testing.assert_allclose(full, single, atol=1e-5)
    np.testing.assert_allclose(onnx.encode([str(png), buf.getvalue()]), full[1:], atol=1e-5)
    described = onnx.describe(imgs, top_k=5)
    assert len(described) == 3
    np.testing.assert_allclose(np.vstack([e for e, _ in described]), full, atol=1e-6)
    assert all(len(top) == 5 and all(isinstance(n, str) for n, _ in top) for _, top in described)


def test_bad_images_raise_input_error_naming_the_file(image_pair, tmp_path):
    onnx, _ = image_pair
    junk = tmp_path / "not-really.jpg"
    junk.write_bytes(b"this is not a jpeg")
    good = tmp_path / "good.png"
    synthetic_images()[1].save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    for bad in (junk, truncated, tmp_path / "missing.png"):
        with pytest.raises(InputError) as err:
            onnx.encode([good, bad])
        assert str(bad) in str(err.value) and "JPEG/PNG" in str(err.value)
    with pytest.raises(InputError, match="JPEG/PNG"):
        load_image(b"\x89PNG garbage")


def test_image_modes_composite_on_white():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(clear).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert load_image(pal).getpixel((1, 1)) == (255, 255, 255)
    assert load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"
    deep = Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    assert load_image(deep).mode == "RGB"
    assert preprocess(load_image(Image.new("L", (1, 9000), 7))).shape == (3, 224, 224)


def test_labels_file():
    labels = imagenet_labels()
    assert len(labels) == len(set(labels)) == 1000
    assert labels[0] == "tench" and labels[1] == "goldfish" and labels[999] == "toilet tissue"


def test_user_weights_path_gets_own_id_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMHOPS_HOME", str(tmp_path / "home"))
    mine = tmp_path / "my-finetuned-lite0.pth"
    shutil.copyfile(default_weights(), mine)  # a copy, not a symlink: the packaged file resolves as the default
    enc = ImageEncoder("onnx", model_path=mine)
    assert enc.id.startswith("my-finetuned-lite0/") and enc.export_seconds > 0
    assert enc.onnx_path().parent.name.startswith("my-finetuned-lite0-")
    with pytest.raises(ModelNotFound):
        ImageEncoder("onnx", model_path=tmp_path / "absent.pth")


# ---------------------------------------------------------------- the stamped ONNX cache

def test_real_cache_stamps_are_valid(text_pair, image_pair):
    for enc in (text_pair[0], image_pair[0]):
        stamp = json.loads(enc.onnx_path().with_suffix(".stamp.json").read_text())
        assert stamp["onnx"]["size"] == enc.onnx_path().stat().st_size


def test_truncated_image_cache_is_reexported(tmp_path, monkeypatch):
    monkeypatch.setenv("MMHOPS_HOME", str(tmp_path))
    first = ImageEncoder("onnx")
    assert first.export_seconds > 0
    path = first.onnx_path()
    again = ImageEncoder("onnx")
    assert again.export_seconds == 0  # a valid stamp: reused
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 3])
    rebuilt = ImageEncoder("onnx")
    assert rebuilt.export_seconds > 0 and path.stat().st_size == len(full)
    img = synthetic_images()[:1]
    np.testing.assert_allclose(rebuilt.encode(img), first.encode(img), atol=1e-6)


def test_cached_onnx_detects_stale_sources_and_meta(tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "weights.bin"
    src.write_bytes(b"v1")
    calls = []

    def export(out: Path) -> None:
        calls.append(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(torch.nn.Linear(3, 2).eval(), (torch.zeros(1, 3),), str(out), dynamo=False,
                              input_names=["x"], output_names=["y"], opset_version=17)

    onnx = tmp_path / "cache" / "model.onnx"
    cached_onnx(onnx, [src], {"m": 1}, export)
    cached_onnx(onnx, [src], {"m": 1}, export)
    assert len(calls) == 1 and stamp_ok(onnx, [src], {"format": 1, "opset": 17, "m": 1})
    src.write_bytes(b"v2")  # the source weights changed
    cached_onnx(onnx, [src], {"m": 1}, export)
    cached_onnx(onnx, [src], {"m": 2}, export)  # export settings changed
    assert len(calls) == 3
    assert not list(onnx.parent.glob("*.tmp*"))  # temp files never linger

    def broken(out: Path) -> None:
        out.write_bytes(b"half")
        raise RuntimeError("export died")

    before = onnx.read_bytes()
    with pytest.raises(RuntimeError):
        cached_onnx(onnx, [src], {"m": 3}, broken)
    assert onnx.read_bytes() == before and not list(onnx.parent.glob("*.tmp*"))


# ---------------------------------------------------------------- OCR

def test_ocr_reads_a_big_clear_word():
    font = _font(72)
    if font is None:
        pytest.skip("no TrueType font on this machine")
    im = Image.new("RGB", (640, 200), "white")
    ImageDraw.Draw(im).text((60, 50), "HARBOUR", fill="black", font=font)
    assert "HARBOUR" in ocr_text(im).upper()


def test_ocr_blank_and_tiny_images():
    assert ocr_text(Image.new("RGB", (300, 200), "white")) == ""
    for size in [(1, 1), (2, 400), (9, 9), (1500, 3)]:
        assert isinstance(ocr_text(Image.new("RGB", size, (90, 90, 90))), str)


def test_index_views_embedding(image_pair):
    from mmhops_lite.encoders.image import view_boxes

    onnx, _ = image_pair
    imgs = synthetic_images()[:3]
    idx_vecs, q_vecs = onnx.encode_for_index(imgs), onnx.encode(imgs)
    np.testing.assert_allclose(np.linalg.norm(idx_vecs, axis=1), 1.0, atol=1e-5)
    assert len(view_boxes(300, 200)) == 6
    # The mean of the views stays close to the whole-image embedding it includes, and closest to its own image.
    sims = idx_vecs @ q_vecs.T
    assert (np.argmax(sims, axis=1) == np.arange(3)).all() and sims.diagonal().min() > 0.8


def test_encoder_providers_follow_the_installed_onnxruntime(monkeypatch):
    from mmhops_lite.encoders.base import providers
    from mmhops_lite.errors import ConfigError

    class CpuOnly:
        @staticmethod
        def get_available_providers():
            return ["CPUExecutionProvider"]

    class WithCuda:
        @staticmethod
        def get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.delenv("MMHOPS_ENCODERS_DEVICE", raising=False)
    assert providers(CpuOnly) == ["CPUExecutionProvider"]
    assert providers(WithCuda) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv("MMHOPS_ENCODERS_DEVICE", "cpu")
    assert providers(WithCuda) == ["CPUExecutionProvider"]
    monkeypatch.setenv("MMHOPS_ENCODERS_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="no CUDA provider"):
        providers(CpuOnly)
    monkeypatch.setenv("MMHOPS_ENCODERS_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        providers(CpuOnly)
