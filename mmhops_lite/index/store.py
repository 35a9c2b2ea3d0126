"""SQLite store of an index: records, their vectors (so a build resumes without re-encoding), FTS5 and meta."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import faults
from ..errors import IndexCorrupt
from ..types import ImageRecord, Passage, Triple

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    label INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, title TEXT NOT NULL,
    text TEXT NOT NULL, source TEXT NOT NULL DEFAULT '', hash TEXT NOT NULL, vec BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS passages_title ON passages(title COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS images (
    label INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, path TEXT NOT NULL,
    title TEXT NOT NULL, caption TEXT NOT NULL DEFAULT '', hash TEXT NOT NULL, vec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS triples (subject TEXT NOT NULL, relation TEXT NOT NULL, object TEXT NOT NULL,
    UNIQUE(subject, relation, object));
CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(title, text, content='passages', content_rowid='label');
CREATE TRIGGER IF NOT EXISTS passages_ai AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts(rowid, title, text) VALUES (new.label, new.title, new.text); END;
CREATE TRIGGER IF NOT EXISTS passages_ad AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts(passages_fts, rowid, title, text) VALUES ('delete', old.label, old.title, old.text); END;
"""

KINDS = ("passages", "images")
_WORD = re.compile(r"\w+", re.UNICODE)


class Store:
    """Thin wrapper over the index's SQLite file (WAL, one transaction per batch)."""

    def __init__(self, path: Path, readonly: bool = False, shared: bool = False):
        """`shared`: the connection may be used from several threads (the caller serialises the calls)."""
        self.path = path
        if Path(path).is_symlink():
            raise IndexCorrupt(f"{path} is a symbolic link; an index keeps its own store", path=path,
                               fix="rebuild the index in a new folder: mmhops-lite index build KB_DIR -o DIR")
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=not shared)
            else:
                self.db = sqlite3.connect(path)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
            self.db.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as exc:
            raise IndexCorrupt(f"{path} is not a readable index store ({exc})", path=path,
                               fix=f"rebuild it: mmhops-lite index build KB_DIR -o {path.parent}") from exc

    def close(self) -> None:
        self.db.close()

    # meta -------------------------------------------------------------------------------------------
    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # writes -----------------------------------------------------------------------------------------
    def hashes(self, kind: str) -> dict[str, str]:
        """id -> content hash of every stored record of a kind."""
        return dict(self.db.execute(f"SELECT id, hash FROM {kind}"))

    def put_passages(self, rows: Iterable[tuple[Passage, str]], vecs: np.ndarray) -> None:
        """Insert or replace passages with their vectors (a replaced passage gets a new label)."""
        for (p, h), v in zip(rows, vecs):
            self.db.execute("DELETE FROM passages WHERE id=?", (p.id,))
            self.db.execute("INSERT INTO passages(id, title, text, source, hash, vec) VALUES (?,?,?,?,?,?)",
                            (p.id, p.title, p.text, p.source, h, np.asarray(v, np.float32).tobytes()))

    def put_images(self, rows: Iterable[tuple[ImageRecord, str]], vecs: np.ndarray) -> None:
        """Insert or replace images with their vectors."""
        for (im, h), v in zip(rows, vecs):
            self.db.execute("DELETE FROM images WHERE id=?", (im.id,))
            self.db.execute("INSERT INTO images(id, path, title, caption, hash, vec) VALUES (?,?,?,?,?,?)",
                            (im.id, im.path, im.title, im.caption, h, np.asarray(v, np.float32).tobytes()))

    def put_triples(self, triples: Iterable[Triple]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO triples(subject, relation, object) VALUES (?,?,?)",
                            [(t.subject, t.relation, t.object) for t in triples])

    def delete(self, kind: str, ids: Iterable[str]) -> int:
        """Delete records by id; returns how many existed."""
        n = 0
        for i in ids:
            n += self.db.execute(f"DELETE FROM {kind} WHERE id=?", (i,)).rowcount
        return n

    def commit(self) -> None:
        faults.no_space(self.path)
        self.db.commit()

    # reads ------------------------------------------------------------------------------------------
    def count(self, kind: str) -> int:
        return self.db.execute(f"SELECT count(*) FROM {kind}").fetchone()[0]

    def vectors(self, kind: str, dim: int, labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels, vectors) of a kind, all or only the given labels."""
        if labels is None:
            rows = self.db.execute(f"SELECT label, vec FROM {kind} ORDER BY label").fetchall()
        else:
            rows = []
            for chunk in range(0, len(labels), 500):
                part = labels[chunk:chunk + 500]
                q = f"SELECT label, vec FROM {kind} WHERE label IN ({','.join('?' * len(part))})"
                rows += self.db.execute(q, part).fetchall()
        labs = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim) \
            if rows else np.zeros((0, dim), np.float32)
        return labs, vecs

    def labels(self, kind: str) -> set[int]:
        return {r[0] for r in self.db.execute(f"SELECT label FROM {kind}")}

    def passages_by_label(self, labels: list[int]) -> dict[int, Passage]:
        out = {}
        for chunk in range(0, len(labels), 500):
            part = labels[chunk:chunk + 500]
            q = f"SELECT label, id, title, text, source FROM passages WHERE label IN ({','.join('?' * len(part))})"
            for lab, i, t, x, s in self.db.execute(q, part):
                out[lab] = Passage(i, t, x, s)
        return out

    def images_by_label(self, labels: list[int]) -> dict[int, ImageRecord]:
        out = {}
        q = f"SELECT label, id, path, title, caption FROM images WHERE label IN ({','.join('?' * len(labels))})"
        for lab, i, p, t, c in self.db.execute(q, labels):
            out[lab] = ImageRecord(i, p, t, c)
        return out

    def passage_for_title(self, title: str) -> Passage | None:
        """The passage whose title names an entity (case-insensitive), if any."""
        row = self.db.execute("SELECT id, title, text, source FROM passages WHERE title=? COLLATE NOCASE LIMIT 1",
                              (title,)).fetchone()
        return Passage(*row) if row else None

    def labels_for_titles(self, titles: list[str]) -> list[tuple[int, str]]:
        """(label, title) of passages whose title is one of `titles` (case-insensitive)."""
        titles = list(dict.fromkeys(t for t in titles if len(t) >= 3))[:200]
        if not titles:
            return []
        q = f"SELECT label, title FROM passages WHERE title COLLATE NOCASE IN ({','.join('?' * len(titles))})"
        return [(r[0], r[1]) for r in self.db.execute(q, titles)]

    def passage(self, pid: str) -> Passage | None:
        row = self.db.execute("SELECT id, title, text, source FROM passages WHERE id=?", (pid,)).fetchone()
        return Passage(*row) if row else None

    def triples_about(self, entity: str) -> list[Triple]:
        rows = self.db.execute("SELECT subject, relation, object FROM triples WHERE subject=? COLLATE NOCASE "
                               "OR object=? COLLATE NOCASE", (entity, entity))
        return [Triple(*r) for r in rows]

    def bm25(self, query: str, limit: int) -> list[tuple[int, float]]:
        """(label, bm25) best first; the query is reduced to quoted words so user text can't inject FTS syntax."""
        words = [w for w in _WORD.findall(query.lower()) if len(w) > 1][:32]
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        # Titles weigh more: entity names are what multi-hop queries carry.
        rows = self.db.execute("SELECT rowid, bm25(passages_fts, 4.0, 1.0) AS s FROM passages_fts "
                               "WHERE passages_fts MATCH ? ORDER BY s LIMIT ?", (match, limit)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def integrity(self) -> str:
        return self.db.execute("PRAGMA quick_check").fetchone()[0]
