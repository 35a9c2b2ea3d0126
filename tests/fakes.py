"""Tiny deterministic encoders for fast tests: real enough to rank, free of model weights."""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np


class HashTextEncoder:
    """Bag of hashed words (and word bigrams) -> 128-d unit vector."""

    id = "fake-hash-text"
    dim = 128

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.encoded = 0

    def encode(self, items, batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(items), self.dim), np.float32)
        for i, t in enumerate(items):
            words = re.findall(r"\w+", t.lower())
            for w in words + [a + " " + b for a, b in zip(words, words[1:])]:
                h = int.from_bytes(hashlib.md5(w.encode()).digest()[:4], "little")
                out[i, h % self.dim] += 1.0 if h & 1 << 31 else -1.0
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        self.encoded += len(items)
        if self.delay:
            time.sleep(self.delay)
        return out


class TinyImageEncoder:
    """An image shrunk to 8x8 RGB, centred -> 192-d unit vector."""

    id = "fake-tiny-image"
    dim = 192

    def __init__(self):
        self.encoded = 0

    def encode(self, items, batch_size: int = 32) -> np.ndarray:
        from PIL import Image

        out = []
        for it in items:
            im = it if isinstance(it, Image.Image) else Image.open(Path(it))
            a = np.asarray(im.convert("RGB").resize((8, 8)), np.float32).ravel()
            a = a - a.mean()
            out.append(a / max(np.linalg.norm(a), 1e-9))
        self.encoded += len(items)
        return np.stack(out).astype(np.float32)

    def describe(self, items, top_k: int = 5):
        return [(e, [("flag", 0.9)]) for e in self.encode(items)]


class ScriptedGenerator:
    """Replays scripted policy turns, honouring stop sequences the way real backends do; records prompts."""

    id = "scripted"
    n_ctx = 100_000

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def render(self, messages) -> str:
        from mmhops_lite.grammar import render_chatml

        return render_chatml(messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompt, stop, max_tokens=256, temperature=0.0, seed=None):
        from mmhops_lite.backends.base import Generation

        self.prompts.append(prompt)
        text = self.replies.pop(0) if self.replies else ""
        cut = [text.find(s) for s in stop if s in text]
        if cut:
            text = text[: min(cut)]
        return Generation(text, len(prompt.split()), len(prompt.split()), len(text.split()), 0.0)


class SeededPolicy:
    """A scripted policy whose moves depend on the episode's seed and turn: search first or not, then the gold
    answer, a wrong one, or a malformed turn. Questions are told apart by a "(case <id>)" mark in their text."""

    id, n_ctx = "seeded", 100_000

    def __init__(self, questions):
        self.gold = {f"(case {q.id})": str(q.answer_eval[0]) for q in questions}

    def render(self, messages):
        from mmhops_lite.grammar import render_chatml

        return render_chatml(messages)

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompt, stop, max_tokens=256, temperature=0.0, seed=None):
        import random

        from mmhops_lite.backends.base import Generation

        turn = prompt.count("<information>")
        rng = random.Random((seed or 0) * 31 + turn)
        gold = next((a for p, a in self.gold.items() if p in prompt), "unknown")
        if turn == 0 and rng.random() < 0.6:
            text = "<think>look it up</think><text_search>" + gold
        else:
            text = rng.choice([f"<think>found</think><answer>{gold}", "<answer>Nowhere", "no tags at all"])
        cut = [text.find(s) for s in stop if s in text]
        return Generation(text[: min(cut)] if cut else text, 1, 1, len(text.split()), 0.0)
