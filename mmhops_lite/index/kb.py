"""Read and validate a knowledge-base folder (passages.jsonl, images.jsonl, triples.jsonl)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from ..safeio import inside
from ..types import ImageRecord, Passage, Triple

REQUIRED = {
    "passages.jsonl": ("id", "title", "text"),
    "images.jsonl": ("id", "path", "title"),
    "triples.jsonl": ("subject", "relation", "object"),
}


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) from a JSON-lines file; any bad line raises InputError naming file:line."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", path=path,
                         fix="check the path and its permissions") from exc
    with fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{n} is not valid UTF-8 (byte {exc.start})", path=path,
                                 fix="re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{n} is not valid JSON ({exc.msg})", path=path,
                                 fix="write one JSON object per line") from exc
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n} is not a JSON object", path=path, fix="write one JSON object per line")
            missing = [k for k in required if not isinstance(obj.get(k), str) or not obj[k].strip()]
            if missing:
                raise InputError(f"{path}:{n} lacks the field(s) {', '.join(missing)}", path=path,
                                 fix=f"every line needs non-empty string fields: {', '.join(required)}")
            yield n, obj


def content_hash(*parts: str) -> str:
    """Short hash of a record's content: a changed record is re-encoded, an unchanged one is not."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB; more is refused before decoding


def check_pixels(im, label: str) -> None:
    """Refuse an opened (not yet decoded) image above MAX_PIXELS: a decompression bomb never gets decoded."""
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise InputError(f"image {label} is {w}x{h} ({w * h / 1e6:.0f} megapixels), over the "
                         f"{MAX_PIXELS // 1_000_000}-megapixel limit", path=label,
                         fix="downscale it first, e.g. to 4000 px on its longer side")


def open_image(src, label: str):
    """PIL's lazy open (header only), refusing images over MAX_PIXELS before a pixel is decoded."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image {label} is over the {MAX_PIXELS // 1_000_000}-megapixel limit ({exc})", path=label,
                         fix="downscale it first, e.g. to 4000 px on its longer side") from exc
    check_pixels(im, label)
    return im


def check_image(path: Path, where: str) -> None:
    """Open and verify an image (header and size; the pixels are not decoded), or raise InputError naming it."""
    from PIL import UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"image {path} (from {where}) does not exist", path=path,
                         fix="fix the 'path' field (relative to the KB folder) or add the file")
    try:
        with open_image(path, f"{path} (from {where})") as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image {path} (from {where}) is not a readable image: {exc}", path=path,
                         fix="replace it with a valid JPEG or PNG, or remove its line") from exc


class KnowledgeBase:
    """A validated KB folder; all checks run before any encoding starts."""

    def __init__(self, root: str | Path, check_images: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"knowledge-base folder {self.root} does not exist", path=self.root,
                             fix="pass a folder holding passages.jsonl and/or images.jsonl "
                                 "(mmhops-lite kb demo -o DIR makes one)")
        files = {name: self.root / name for name in REQUIRED}
        if not files["passages.jsonl"].is_file() and not files["images.jsonl"].is_file():
            raise InputError(f"{self.root} holds neither passages.jsonl nor images.jsonl", path=self.root,
                             fix="see the KB folder format in the README")
        self.passages: list[Passage] = []
        self.images: list[ImageRecord] = []
        self.triples: list[Triple] = []
        if files["passages.jsonl"].is_file():
            self.passages = self._unique(files["passages.jsonl"], Passage)
        if files["images.jsonl"].is_file():
            self.images = self._unique(files["images.jsonl"], ImageRecord)
            for im in self.images:
                p = inside(self.root, im.path, "image", f"{files['images.jsonl']} id={im.id}")
                if check_images:
                    check_image(p, f"{files['images.jsonl']} id={im.id}")
        if files["triples.jsonl"].is_file():
            self.triples = [Triple.from_dict(o) for _, o in read_jsonl(files["triples.jsonl"], REQUIRED["triples.jsonl"])]

    def _unique(self, path: Path, cls):
        seen: dict[str, int] = {}
        out = []
        for n, obj in read_jsonl(path, REQUIRED[path.name]):
            if obj["id"] in seen:
                raise InputError(f"{path}:{n} repeats id '{obj['id']}' (first on line {seen[obj['id']]})",
                                 path=path, fix="give every line a unique id")
            seen[obj["id"]] = n
            out.append(cls.from_dict(obj))
        return out

    def image_path(self, im: ImageRecord) -> Path:
        """Path of a KB image: paths in images.jsonl are relative to the KB folder and may not leave it."""
        return inside(self.root, im.path, "image", f"{self.root / 'images.jsonl'} id={im.id}")
