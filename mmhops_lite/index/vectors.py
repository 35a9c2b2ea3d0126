"""hnswlib wrapper: checks dimensions before add, sets ef again on every load, saves atomically."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from .. import faults
from ..errors import IndexCorrupt, InputError
from ..paths import free_cores
from ..safeio import failed, fsync_dir, temp_name
from .graphfile import check_graph


class VectorIndex:
    """One hnswlib graph (cosine space) whose integer labels are the SQLite store's labels."""

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 200, ef_search: int = 128):
        import hnswlib

        self.dim, self.M, self.efc, self.ef = dim, M, ef_construction, ef_search
        self._hnsw = hnswlib.Index(space="cosine", dim=dim)
        self._hnsw.init_index(max_elements=16, M=M, ef_construction=ef_construction, allow_replace_deleted=False)
        self._hnsw.set_ef(ef_search)
        self._hnsw.set_num_threads(free_cores())
        self.deleted: set[int] = set()

    @classmethod
    def load(cls, path: Path, dim: int, ef_search: int, M: int = 32, ef_construction: int = 200,
             elements: int | None = None) -> "VectorIndex":
        """Load a saved graph; a truncated, foreign or crafted file raises IndexCorrupt before hnswlib reads it."""
        import hnswlib

        check_graph(path, dim, M, elements)
        self = cls.__new__(cls)
        self.dim, self.M, self.efc, self.ef = dim, M, ef_construction, ef_search
        self._hnsw = hnswlib.Index(space="cosine", dim=dim)
        try:
            self._hnsw.load_index(str(path))
        except (RuntimeError, MemoryError, ValueError) as exc:
            raise IndexCorrupt(f"{path} cannot be loaded by hnswlib ({exc})", path=path,
                               fix=f"run: mmhops-lite index repair {path.parent}") from exc
        # hnswlib does not persist ef: without this, queries silently use ef=10.
        self._hnsw.set_ef(ef_search)
        self._hnsw.set_num_threads(free_cores())
        self.deleted = set()
        return self

    def __len__(self) -> int:
        return self._hnsw.get_current_count() - len(self.deleted)

    def labels(self) -> set[int]:
        """Labels present in the graph (including ones marked deleted by this process)."""
        return set(int(x) for x in self._hnsw.get_ids_list())

    def add(self, labels: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors (N, dim) under the given labels, growing the graph as needed."""
        vecs = np.asarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise InputError(f"vectors of shape {vecs.shape} do not fit an index of dimension {self.dim}",
                             fix="use the encoder the index was built with (see: mmhops-lite index info)")
        if not len(labels):
            return
        need = self._hnsw.get_current_count() + len(labels)
        if need > self._hnsw.get_max_elements():
            self._hnsw.resize_index(max(need, int(self._hnsw.get_max_elements() * 1.5)))
        # Sized now, not once at creation: a long build outlives whatever else was running when the graph was made.
        self._hnsw.set_num_threads(free_cores())
        self._hnsw.add_items(vecs, np.asarray(labels, dtype=np.int64))

    def mark_deleted(self, labels) -> None:
        for lab in labels:
            try:
                self._hnsw.mark_deleted(int(lab))
                self.deleted.add(int(lab))
            except RuntimeError:  # already deleted, or never added: nothing to hide
                pass

    def query(self, vec: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(label, cosine similarity) best first."""
        k = min(k, len(self))
        if k <= 0:
            return []
        vec = np.asarray(vec, dtype=np.float32).reshape(1, -1)
        if vec.shape[1] != self.dim:
            raise InputError(f"a query of dimension {vec.shape[1]} cannot search an index of dimension {self.dim}",
                             fix="use the encoder the index was built with (see: mmhops-lite index info)")
        self._hnsw.set_ef(max(self.ef, k))
        while True:
            try:
                labels, dists = self._hnsw.knn_query(vec, k=k)
                break
            except RuntimeError:
                # Fewer than k live points are reachable (deleted ones still fill the graph): ask for fewer.
                if k == 1:
                    return []
                k = max(1, k // 2)
        return [(int(lab), float(1.0 - d)) for lab, d in zip(labels[0], dists[0])]

    @property
    def elements(self) -> int:
        """Elements stored in the graph file, deleted ones included (what its header counts)."""
        return self._hnsw.get_current_count()

    def save(self, path: Path) -> None:
        """Write to a temporary name, check the whole file, fsync, then rename: a reader never sees half a file.

        hnswlib does not check its output stream, so a full disk leaves a short file behind a successful call;
        the check catches it and the old graph stays in use (WriteFailed names the folder)."""
        tmp = temp_name(path)
        try:
            self._hnsw.save_index(str(tmp))
            faults.cut_short(tmp, path)
            try:
                check_graph(tmp, self.dim, self.M, self.elements)
            except IndexCorrupt as exc:
                raise OSError(errno.EIO, f"the written graph is incomplete, is the disk full? ({exc})") from exc
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            faults.point(f"graph:{path.name}:checked")
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise failed(path, exc, "index") from exc
