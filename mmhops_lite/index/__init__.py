"""On-disk multimodal index: hnswlib graphs + SQLite store (FTS5) + manifest."""
from .build import remove, repair, sync
from .index import MultimodalIndex, writer_lock
from .kb import KnowledgeBase

__all__ = ["MultimodalIndex", "KnowledgeBase", "sync", "remove", "repair", "writer_lock"]
