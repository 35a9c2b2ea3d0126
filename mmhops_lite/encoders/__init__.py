"""Text and image encoders behind one Encoder protocol (ONNX by default, torch as the reference), and OCR."""
from __future__ import annotations

from .base import Encoder, clear_cache, get_image_encoder, get_text_encoder, l2_normalize
from .image import ImageEncoder, imagenet_labels, load_image
from .ocr import ocr_lines, ocr_text
from .text import TextEncoder

__all__ = [
    "Encoder", "ImageEncoder", "TextEncoder", "clear_cache", "get_image_encoder", "get_text_encoder",
    "imagenet_labels", "l2_normalize", "load_image", "ocr_lines", "ocr_text",
]
