"""Library entry points the CLI calls: one function per command, no printing."""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .errors import InputError
from .index import KnowledgeBase, MultimodalIndex, remove, repair, sync
from .paths import cache_dir
from .registry import manifests, resolve, verify

DEFAULT_TEXT, DEFAULT_IMAGE = "all-minilm-l6-v2", "efficientnet-lite0"


def text_encoder(cfg: Config):
    """The configured text encoder (built lazily by the encoders package)."""
    from .encoders import get_text_encoder

    name = cfg.encoders.text_model
    return get_text_encoder(backend=cfg.encoders.backend,
                            model_path=None if name == DEFAULT_TEXT else resolve(name, "text_encoder"))


def image_encoder(cfg: Config):
    """The configured image encoder."""
    from .encoders import get_image_encoder

    name = cfg.encoders.image_model
    return get_image_encoder(backend=cfg.encoders.backend,
                             model_path=None if name == DEFAULT_IMAGE else resolve(name, "image_encoder"))


def build_index(kb_dir: str | Path, out: str | Path, cfg: Config, *, prune: bool = True, progress: bool = True):
    """Build (or resume, or sync) the index at `out` from a KB folder."""
    kb = KnowledgeBase(kb_dir)
    return sync(out, kb, text_encoder(cfg) if kb.passages else None, image_encoder(cfg) if kb.images else None,
                cfg.index, prune=prune, progress=progress)


def open_index(path: str | Path, cfg: Config, verify_checksums: bool = True) -> MultimodalIndex:
    """Open and verify an index with the configured encoders."""
    return MultimodalIndex(path, text_encoder(cfg), image_encoder(cfg), cfg.index, cfg.search, verify=verify_checksums)


def search(path: str | Path, cfg: Config, text: str | None = None, image: str | Path | None = None, k: int = 5):
    """Search an index by text (hybrid) or by image; returns the hits."""
    if (text is None) == (image is None):
        raise InputError("give exactly one of --text or --image", fix='e.g. --text "Eiffel Tower architect"')
    if image is not None and not Path(image).is_file():
        raise InputError(f"query image {image} does not exist", path=image, fix="check the path")
    with open_index(path, cfg) as idx:
        return idx.search_text(text, k) if text is not None else idx.search_image(Path(image), k)


def remove_ids(path: str | Path, ids: list[str], cfg: Config) -> dict:
    """Remove records by id."""
    return remove(path, ids, cfg.index)


def repair_index(path: str | Path, cfg: Config) -> dict:
    """Rebuild graphs and manifest from the store."""
    return repair(path, cfg.index)


def index_info(path: str | Path, cfg: Config) -> dict:
    """Manifest of a verified index (encoders are not loaded)."""
    with MultimodalIndex(path, None, None, cfg.index, cfg.search) as idx:
        return idx.info()


def demo_paths() -> tuple[Path, Path]:
    """Where the demo KB and its index live under MMHOPS_HOME."""
    root = cache_dir("demo")
    return root / "kb", root / "index"


def ensure_demo_index(cfg: Config, progress: bool = True) -> Path:
    """Build the demo KB and its index on first use (both steps resume if interrupted)."""
    from .data.demo_kb import build_demo_kb

    kb, idx = demo_paths()
    if not (kb / "manifest.json").is_file():
        build_demo_kb(kb, progress=progress)
    if not (idx / "manifest.json").is_file():
        build_index(kb, idx, cfg, progress=progress)
    return idx


def list_models() -> list[dict]:
    """Every registry manifest with its install status (no checksums)."""
    return [m.to_dict() for m in manifests().values()]


def verify_models(names: list[str] | None = None) -> list:
    """Verify presence and checksums of the named (or all) registry models."""
    specs = manifests()
    unknown = [n for n in names or [] if n not in specs]
    if unknown:
        raise InputError(f"unknown model(s): {', '.join(unknown)}", fix=f"known: {', '.join(specs)}")
    return [verify(specs[n]) for n in (names or specs)]
