"""Text found in an image, read by the packaged RapidOCR (PP-OCRv4 models on onnxruntime)."""
from __future__ import annotations

import threading

import numpy as np

from ..errors import MissingDependency
from ..paths import free_cores
from .image import load_image

MIN_SCORE = 0.5
# PP-OCR's detector downsamples by 32; tiny inputs are padded onto white so it always has something to look at.
MIN_SIDE = 64

_engine = None
_engine_lock = threading.Lock()


def get_ocr_engine():
    """The process-wide RapidOCR engine, created on first use with threads from free_cores()."""
    global _engine
    with _engine_lock:
        if _engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as exc:
                raise MissingDependency(f"RapidOCR is not installed ({exc}).",
                                        fix="pip install rapidocr-onnxruntime==1.4.4  (or run: bash scripts/setup.sh)"
                                        ) from exc
            _engine = RapidOCR(intra_op_num_threads=free_cores(), inter_op_num_threads=1, print_verbose=False)
        return _engine


def _pad_small(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h >= MIN_SIDE and w >= MIN_SIDE:
        return rgb
    canvas = np.full((max(h, MIN_SIDE), max(w, MIN_SIDE), 3), 255, np.uint8)
    canvas[:h, :w] = rgb
    return canvas


def ocr_lines(image, min_score: float = MIN_SCORE) -> list[tuple[str, float]]:
    """(text, confidence) per detected line, top to bottom, keeping those with confidence >= min_score."""
    rgb = np.asarray(load_image(image), dtype=np.uint8)
    bgr = np.ascontiguousarray(_pad_small(rgb)[:, :, ::-1])  # RapidOCR takes raw arrays as OpenCV BGR
    result, _ = get_ocr_engine()(bgr)
    lines = []
    for row in result or []:
        text, score = str(row[1]).strip(), float(row[2])
        if text and score >= min_score:
            lines.append((text, score))
    return lines


def ocr_text(image, min_score: float = MIN_SCORE) -> str:
    """Text lines read from an image (PIL image, path or bytes) joined by newlines; '' when there is none."""
    return "\n".join(text for text, _ in ocr_lines(image, min_score))
