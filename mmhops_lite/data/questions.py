"""Question files in the MMhops schema (JSON lines; image paths relative to the file)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from ..grammar import check_question
from ..index.kb import read_jsonl
from ..safeio import atomic_write
from ..types import Question

SPLITS = ("Bridge", "Compare")
TYPES = ("String", "Numerical", "Time")


def load_questions(path: str | Path, check_images: bool = True) -> list[Question]:
    """Read and validate a question file; image paths come back absolute."""
    path = Path(path)
    out, seen = [], set()
    for n, obj in read_jsonl(path, ("id", "problem")):
        where = f"{path}:{n}"
        if obj["id"] in seen:
            raise InputError(f"{where} repeats id '{obj['id']}'", path=path, fix="give every question a unique id")
        seen.add(obj["id"])
        split, ptype = obj.get("split", "Bridge"), obj.get("problem_type", "String")
        if split not in SPLITS or ptype not in TYPES:
            raise InputError(f"{where} has split={split!r} problem_type={ptype!r}", path=path,
                             fix=f"split is one of {SPLITS}; problem_type one of {TYPES}")
        answer_eval = obj.get("answer_eval") or ([obj["answer"]] if obj.get("answer") else [])
        if ptype == "Numerical" and (len(answer_eval) < 2 or not all(_is_num(x) for x in answer_eval[:2])):
            raise InputError(f"{where}: a Numerical question needs answer_eval [low, high]", path=path,
                             fix='e.g. "answer_eval": [2000000, 2200000]')
        check_question(obj["problem"], f"{where} 'problem'")
        raw = obj.get("images", []) or []
        if not isinstance(raw, list) or not all(isinstance(x, str) and x.strip() for x in raw):
            raise InputError(f"{where}: 'images' must be a list of image paths, not {json.dumps(raw)[:60]}",
                             path=path, fix='e.g. "images": ["img/a.jpg"] (a list, even for one image)')
        images = []
        for rel in raw:
            p = Path(rel) if os.path.isabs(rel) else path.parent / rel
            if check_images and not p.is_file():
                raise InputError(f"{where}: image {p} does not exist", path=p,
                                 fix="image paths are relative to the question file")
            images.append(str(p))
        extra = {k: v for k, v in obj.items() if k not in
                 ("id", "problem", "images", "answer", "answer_eval", "split", "problem_type")}
        out.append(Question(obj["id"], obj["problem"], tuple(images), str(obj.get("answer", "")),
                            tuple(answer_eval), split, ptype, extra))
    if not out:
        raise InputError(f"{path} holds no questions", path=path, fix="one JSON object per line")
    return out


def _is_num(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def write_questions(path: str | Path, questions: Iterable[dict]) -> int:
    """Write question dicts atomically; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(q, ensure_ascii=False) + "\n" for q in questions]
    atomic_write(path, "".join(rows))
    return len(rows)
