"""One Config of dataclass sections; precedence: defaults < mmhops.toml < MMHOPS_* env < flags."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError


def _f(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class IndexConfig:
    """How the on-disk hnswlib index is built and searched."""

    M: int = _f(32, "hnswlib graph degree: higher = better recall, more memory")
    ef_construction: int = _f(200, "hnswlib build-time beam width")
    ef_search: int = _f(128, "hnswlib query-time beam width (set again on every load)")
    batch_size: int = _f(64, "items encoded and committed per batch during a build (the resume granularity)")
    encode_batch: int = _f(8, "passages per text-encoder call during a build (small, length-matched batches "
                               "run fastest on a CPU)")
    sort_by_length: bool = _f(True, "encode passages shortest first during a build, so no batch pads short "
                                    "passages to a long one's length (3.7x the passages/s of file order)")


@dataclass(frozen=True)
class SearchConfig:
    """How searches rank and fuse results."""

    top_k: int = _f(5, "hits returned per search")
    candidates: int = _f(50, "candidates taken from each ranker before fusion")
    rrf_k: int = _f(60, "reciprocal-rank-fusion constant for dense + BM25 text search")
    hybrid: bool = _f(True, "fuse dense (hnswlib) and BM25 (SQLite FTS5) rankings for text search")


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoders embed text and images, and on which runtime."""

    backend: str = _f("onnx", "encoder runtime: onnx (default, faster) or torch")
    text_model: str = _f("all-minilm-l6-v2", "text encoder: registry name or local folder")
    image_model: str = _f("efficientnet-lite0", "image encoder: registry name or local .pth file")
    ocr: bool = _f(True, "read text in query images with RapidOCR")


@dataclass(frozen=True)
class ModelConfig:
    """The policy model that decides to search or answer."""

    policy: str = _f("smollm2-135m-instruct", "policy: registry name, .gguf file or Hugging Face folder")
    adapter: str = _f("auto", "LoRA adapter: `auto` (the adapter shipped in models/ for the policy, if any), `none`, "
                              "a `train` output folder, a PEFT folder or a .gguf adapter")
    backend: str = _f("llamacpp", "generator backend: llamacpp, torch or onnx (an exported ONNX folder)")
    n_ctx: int = _f(4096, "context window in tokens")
    threads: int = _f(0, "CPU threads; 0 = the cores not busy with other processes")
    merge: bool = _f(True, "llama.cpp: fold a GGUF adapter into one cached Q8_0 policy file (faster prompts) "
                           "instead of applying it at run time")


@dataclass(frozen=True)
class LoopConfig:
    """The multi-hop search/answer loop."""

    max_turns: int = _f(5, "turns the policy may spend on searches and its answer")
    final_answer: bool = _f(True, "when the turns run out unanswered, the loop writes <answer> and the policy "
                                  "completes it from what it has read (one more turn; the hop is marked forced)")
    top_k: int = _f(3, "hits shown to the policy per text search")
    image_top_k: int = _f(1, "entities shown per image search (small policies get distracted by runners-up)")
    info_tokens: int = _f(400, "token budget of one <information> block")
    temperature: float = _f(0.0, "sampling temperature (0 = greedy)")
    max_new_tokens: int = _f(128, "tokens the policy may write in one turn")


@dataclass(frozen=True)
class PathsConfig:
    """Where data lives."""

    index: str = _f("", "index folder; empty = the demo index under MMHOPS_HOME (built on first use)")


SECTIONS = {"index": IndexConfig, "search": SearchConfig, "encoders": EncoderConfig,
            "model": ModelConfig, "loop": LoopConfig, "paths": PathsConfig}


@dataclass(frozen=True)
class Config:
    """Every setting of mmhops-lite, one frozen section per concern."""

    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    @classmethod
    def resolve(cls, flags: Mapping[str, Any] | None = None, toml_path: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> "Config":
        """Merge defaults < mmhops.toml < MMHOPS_<SECTION>_<FIELD> env < flags ("section.field": value)."""
        env = os.environ if env is None else env
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        path = Path(toml_path) if toml_path else Path(env.get("MMHOPS_CONFIG", "mmhops.toml"))
        if toml_path and not path.is_file():
            raise ConfigError(f"config file {path} does not exist", path=path, fix="check the --config path")
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}", path=path,
                                  fix="fix the syntax, e.g. [loop]\\nmax_turns = 4") from exc
            for sec, table in data.items():
                if sec not in SECTIONS or not isinstance(table, dict):
                    raise ConfigError(f"unknown section [{sec}] in {path}", path=path,
                                      fix=f"use one of: {', '.join(SECTIONS)}")
                for k, v in table.items():
                    _set(values, sec, k, v, f"{path} [{sec}]")
        for key, raw in env.items():
            if not key.startswith("MMHOPS_") or key in ("MMHOPS_HOME", "MMHOPS_CONFIG"):
                continue
            rest = key[len("MMHOPS_"):].lower()
            sec = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
            if sec is None:
                continue
            _set(values, sec, rest[len(sec) + 1:], raw, f"environment variable {key}")
        for dotted, v in (flags or {}).items():
            if v is None:
                continue
            sec, _, k = dotted.partition(".")
            _set(values, sec, k, v, f"flag {dotted}")
        return cls(**{s: SECTIONS[s](**values[s]) for s in SECTIONS})

    def to_dict(self) -> dict:
        """Nested plain dict, e.g. for `config show`."""
        return dataclasses.asdict(self)


def _set(values: dict, sec: str, key: str, raw: Any, origin: str) -> None:
    """Validate and coerce one setting to its field's type."""
    if sec not in SECTIONS:
        raise ConfigError(f"unknown section '{sec}' in {origin}", fix=f"use one of: {', '.join(SECTIONS)}")
    fmap = {f.name.lower(): f for f in fields(SECTIONS[sec])}
    f = fmap.get(key.lower())
    if f is None:
        raise ConfigError(f"unknown setting '{sec}.{key}' in {origin}",
                          fix=f"known settings of [{sec}]: {', '.join(fmap)}")
    typ = type(f.default)
    try:
        if typ is bool and isinstance(raw, str):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            val: Any = raw.lower() in ("1", "true", "yes", "on")
        elif typ is bool:
            val = bool(raw)
        else:
            val = typ(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{sec}.{key} = {raw!r} from {origin} is not a valid {typ.__name__}",
                          fix=f"{f.metadata['help']}") from exc
    values[sec][f.name] = val


def describe() -> list[tuple[str, str, Any]]:
    """(section.field, help, default) for every setting, for `config show --help`."""
    return [(f"{s}.{f.name}", f.metadata["help"], f.default) for s, c in SECTIONS.items() for f in fields(c)]
