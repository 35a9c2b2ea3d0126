"""Checking an hnswlib graph file in Python before hnswlib reads a byte of it.

hnswlib's loader trusts the file: sizes and counts in its header decide how much it allocates and reads, and the
neighbour ids in its link lists are followed at search time without bounds checks (hnswlib #673). A graph from
someone else, or one cut short by a full disk, is therefore parsed here first: every header field against the
layout the manifest implies, every link list's length and neighbour ids against the element count, and the file
size to the byte. Layout (hnswlib 0.8, little-endian): a 96-byte header; `count` level-0 records of
`size_data_per_element` bytes (a 4-byte link count, 2*M neighbour ids, the vector, an 8-byte label); then per
element a 4-byte byte length and that many bytes of upper-level link lists (M + 1 uint32 per level).
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from ..errors import IndexCorrupt

HEADER = struct.Struct("<QQQQQQiIQQQdQ")
MAX_LEVEL = 64


def _bad(path: Path, why: str) -> IndexCorrupt:
    return IndexCorrupt(f"graph file {path} is not a graph this index wrote: {why}", path=path,
                        fix=f"do not use this index; rebuild it (or run: mmhops-lite index repair {path.parent})")


def read_header(path: Path) -> dict:
    """The header fields of a graph file."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise _bad(path, f"{len(raw)} bytes, shorter than a header")
    names = ("offset_level0", "max_elements", "count", "size_per_element", "label_offset", "offset_data",
             "max_level", "enterpoint", "maxM", "maxM0", "M", "mult", "ef_construction")
    return dict(zip(names, HEADER.unpack(raw)))


def check_graph(path: str | Path, dim: int, M: int, elements: int | None = None) -> dict:
    """Parse and bound-check a whole graph file; returns its header, or raises IndexCorrupt naming the field."""
    path = Path(path)
    size = path.stat().st_size
    h = read_header(path)
    n = h["count"]
    links0 = 2 * M * 4 + 4
    want = {"offset_level0": 0, "maxM": M, "maxM0": 2 * M, "M": M, "size_per_element": links0 + dim * 4 + 8,
            "offset_data": links0, "label_offset": links0 + dim * 4}
    for key, val in want.items():
        if h[key] != val:
            raise _bad(path, f"header field {key} is {h[key]}, expected {val} (dimension {dim}, M {M})")
    if not (math.isfinite(h["mult"]) and abs(h["mult"] - 1 / math.log(M)) < 1e-6):
        raise _bad(path, f"header field mult is {h['mult']}")
    if elements is not None and n != elements:
        raise _bad(path, f"it holds {n} elements, the manifest says {elements}")
    if n > h["max_elements"] or h["max_elements"] > max(2 * n, n + 1024):
        raise _bad(path, f"capacity {h['max_elements']} does not fit {n} elements")
    if n and not (0 <= h["max_level"] <= MAX_LEVEL and h["enterpoint"] < n):
        raise _bad(path, f"entry point {h['enterpoint']} / top level {h['max_level']} out of range")
    sde = h["size_per_element"]
    level0_end = HEADER.size + n * sde
    if size < level0_end + 4 * n:
        raise _bad(path, f"{size} bytes, too short for {n} elements (truncated?)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        if n:
            rec = np.lib.stride_tricks.as_strided(mm[HEADER.size:level0_end].view(np.uint32), shape=(n, 2 * M + 1),
                                                  strides=(sde, 4))
            counts = rec[:, 0] & 0xFFFF
            if int(counts.max()) > 2 * M:
                raise _bad(path, "a level-0 link list is longer than 2*M")
            used = np.arange(2 * M)[None, :] < counts[:, None]
            if used.any() and int(rec[:, 1:][used].max()) >= n:
                raise _bad(path, "a level-0 link points past the last element")
            top = _check_upper(path, mm, level0_end, n, M, h["max_level"], size)
            if top != h["max_level"]:
                raise _bad(path, f"the highest level present is {top}, the header says {h['max_level']}")
        elif size != level0_end:
            raise _bad(path, f"{size - level0_end} bytes after the last element")
    finally:
        del mm
    return h


def _check_upper(path: Path, mm, start: int, n: int, M: int, max_level: int, size: int) -> int:
    """Walk the per-element upper-level link lists; returns the highest level seen."""
    per_level = (M + 1) * 4
    if (size - start) % 4:
        raise _bad(path, "the link lists do not end on a 4-byte boundary (truncated?)")
    words = np.frombuffer(mm, dtype="<u4", offset=start)
    seq = words.tolist()  # the walk below is sequential (each length says where the next one is): plain ints
    end = len(seq)
    blocks: list[tuple[int, int, int]] = []  # (element, first word, levels) of every non-empty upper list
    top, pos = 0, 0
    for i in range(n):
        if pos >= end:
            raise _bad(path, f"truncated inside the link lists of element {i}")
        length = seq[pos]
        pos += 1
        if not length:
            continue
        levels, rest = divmod(length, per_level)
        if rest or levels > max_level or pos + length // 4 > end:
            raise _bad(path, f"element {i} has an upper link list of {length} bytes")
        blocks.append((i, pos, levels))
        top = max(top, levels)
        pos += length // 4
    if pos != end:
        raise _bad(path, f"{(end - pos) * 4} bytes after the last link list")
    if blocks:  # every level's list at once: its count <= M and its first `count` ids < n
        b = np.asarray(blocks, dtype=np.int64)
        levels = b[:, 2]
        first = np.cumsum(levels) - levels
        k = np.arange(int(levels.sum())) - np.repeat(first, levels)
        rows = words[(np.repeat(b[:, 1], levels) + k * (M + 1))[:, None] + np.arange(M + 1)[None, :]]
        owner = np.repeat(b[:, 0], levels)
        counts = rows[:, 0] & 0xFFFF
        if int(counts.max()) > M:
            raise _bad(path, f"element {int(owner[int(np.argmax(counts > M))])} has an upper link list longer than M")
        used = np.arange(M)[None, :] < counts[:, None]
        past = (rows[:, 1:] >= n) & used
        if past.any():
            raise _bad(path, f"element {int(owner[int(np.argmax(past.any(axis=1)))])} links past the last element")
    return top
