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


def build_index(kb_dir: str | Path, out: str | Path, cfg: Config, *, prune: bool = True, progress: bool = True,
                reencode: bool = False):
    """Build (or resume, or sync) the index at `out` from a KB folder."""
    kb = KnowledgeBase(kb_dir)
    return sync(out, kb, text_encoder(cfg) if kb.passages else None, image_encoder(cfg) if kb.images else None,
                cfg.index, prune=prune, progress=progress, reencode=reencode)


def open_index(path: str | Path, cfg: Config, verify_checksums: bool = True, shared: bool = False) -> MultimodalIndex:
    """Open and verify an index with the configured encoders (`shared`: searched from several threads, one at a
    time)."""
    return MultimodalIndex(path, text_encoder(cfg), image_encoder(cfg), cfg.index, cfg.search, verify=verify_checksums,
                           shared=shared)


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
    import json

    from .data.demo_kb import KB_VERSION, build_demo_kb

    kb, idx = demo_paths()
    kb_man = kb / "manifest.json"
    version = json.loads(kb_man.read_text(encoding="utf-8")).get("format_version") if kb_man.is_file() else None
    rebuilt = version != KB_VERSION
    if rebuilt:  # first use, or a KB built by an older release (fewer domains): the index sync reuses the rest
        build_demo_kb(kb, progress=progress)
    man = idx / "manifest.json"
    stale = False
    if man.is_file():  # the demo follows encoder upgrades by itself: re-encode what changed, reuse the rest
        built = json.loads(man.read_text(encoding="utf-8")).get("encoders", {})
        stale = built.get("images", {}).get("id") != image_encoder(cfg).id or \
            built.get("passages", {}).get("id") != text_encoder(cfg).id
    if stale or rebuilt or not man.is_file():
        build_index(kb, idx, cfg, progress=progress, reencode=stale)
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


def generator(cfg: Config, model: str | None = None, backend: str | None = None):
    """The configured policy generator (llama.cpp by default)."""
    from .backends.base import get_generator
    from .bundle import bundle_generator, is_bundle
    from .registry import choose_adapter

    policy = model or cfg.model.policy
    if is_bundle(policy):  # an export bundle carries its own policy (and adapter): checked, then loaded
        return bundle_generator(policy, n_ctx=cfg.model.n_ctx, threads=cfg.model.threads)
    adapter = choose_adapter(policy, cfg.model.adapter)
    backend = backend or cfg.model.backend
    if adapter and backend == "llamacpp" and cfg.model.merge:
        from .backends.base import adapter_for
        from .backends.merged import merged_policy
        from .registry import resolve

        base = resolve(policy, "policy")
        if base.suffix == ".gguf":  # one merged Q8_0 file: ~1.6x faster prompts than base + runtime adapter
            lora = adapter_for(backend, adapter)
            gen = get_generator(backend, str(merged_policy(base, lora)), n_ctx=cfg.model.n_ctx,
                                threads=cfg.model.threads)
            gen.id = f"{base.name}+{lora.name} (merged, q8_0)"
            return gen
    return get_generator(backend, policy, n_ctx=cfg.model.n_ctx, threads=cfg.model.threads, adapter=adapter)


def resolve_index(cfg: Config, index: str | Path | None, progress: bool = True) -> Path:
    """The index to use: the one given, else paths.index from config, else the demo index (built on first use)."""
    if index:
        return Path(index)
    if cfg.paths.index:
        return Path(cfg.paths.index)
    return ensure_demo_index(cfg, progress=progress)


def ask(images: list[str | Path], question: str, cfg: Config, index: str | Path | None = None, *,
        on_event=None, gen=None, progress: bool = True):
    """Full multi-hop retrieval-augmented reasoning over one question; returns the Trace."""
    import time

    from .grammar import check_question
    from .index.kb import check_image

    question = check_question(question)
    for p in images:
        if not Path(p).is_file():
            raise InputError(f"image {p} does not exist", path=p, fix="check the path (JPEG or PNG)")
        check_image(Path(p), "the command line")
    idx_path = resolve_index(cfg, index, progress)
    t0 = time.perf_counter()
    if gen is None:
        gen = generator(cfg)
    t_load = time.perf_counter() - t0
    t_open = time.perf_counter()
    with open_index(idx_path, cfg) as idx:
        t_open = time.perf_counter() - t_open
        tr = ask_with(images, question, cfg, idx, gen, on_event=on_event)
    from dataclasses import replace

    return replace(tr, timings={**tr.timings, "model_load_s": round(t_load + tr.timings.get("model_load_s", 0), 3),
                                "index_open_s": round(t_open, 3)})


def ask_with(images: list[str | Path], question: str, cfg: Config, idx, gen, *, on_event=None):
    """`ask` with an open index and a loaded generator (a server keeps both across questions); the question and
    images are checked by the caller. Returns the Trace."""
    import time
    from dataclasses import replace

    from .loop import answer, perceive

    t0 = time.perf_counter()
    if hasattr(gen, "prime"):  # the system prompt's KV cache, from disk after the first run (a no-op once primed)
        from .grammar import system_prefix

        gen.prime(system_prefix(gen.render))
    t_prime = time.perf_counter() - t0
    t1 = time.perf_counter()
    perc = perceive(images, idx.image_encoder, ocr=cfg.encoders.ocr)
    t_perc = time.perf_counter() - t1
    if on_event:
        on_event("perception", perc)
    tr = answer(question, gen, idx, cfg, perc, on_event=on_event)
    return replace(tr, images=tuple(str(p) for p in images),
                   timings={**tr.timings, "model_load_s": round(t_prime, 3), "perception_s": round(t_perc, 3)},
                   models={**tr.models, "text_encoder": cfg.encoders.text_model,
                           "image_encoder": cfg.encoders.image_model, "backend": cfg.model.backend})


def serve_service(index: str | Path | None, cfg: Config, *, allow_local_paths: bool = False, ask: bool = True,
                  progress: bool = True):
    """The server's state: the index (given, configured, or the demo one) opened once, and the policy loaded on the
    first /ask (`ask=False`: /ask answers 501). See mmhops_lite.serve."""
    from .serve import Service

    idx = open_index(resolve_index(cfg, index, progress), cfg, shared=True)
    return Service(idx, cfg, allow_local_paths=allow_local_paths, make_generator=(lambda: generator(cfg)) if ask else None)


def serve(index: str | Path | None, cfg: Config, *, host: str = "127.0.0.1", port: int = 8000,
          allow_local_paths: bool = False, ask: bool = True, preload: bool = False, log_level: str = "info") -> None:
    """Run the retrieval + ask server until interrupted (uvicorn; loopback unless `host` says otherwise)."""
    from .errors import MissingDependency
    from .serve import make_app

    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependency("the server needs fastapi and uvicorn", fix="pip install 'mmhops-lite[serve]'") from exc
    service = serve_service(index, cfg, allow_local_paths=allow_local_paths, ask=ask)
    try:
        if preload and ask:
            service.preload()
        uvicorn.run(make_app(service), host=host, port=port, log_level=log_level, limit_concurrency=64,
                    timeout_keep_alive=5)
    finally:
        service.close()


def run_eval(questions_file: str | Path, cfg: Config, mode: str, index: str | Path | None = None,
             out_dir: str | Path | None = None, limit: int | None = None, on_result=None, gen=None) -> dict:
    """Evaluate a question file in one mode; writes summary, records and predictions when out_dir is given."""
    from .data.questions import load_questions
    from .eval import MODES, evaluate, write_outputs

    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'", fix=f"use one of: {', '.join(MODES)}")
    qs = load_questions(questions_file)
    if limit:
        qs = qs[:limit]
    idx_path = resolve_index(cfg, index)
    gen = gen or generator(cfg)
    with open_index(idx_path, cfg) as idx:
        result = evaluate(qs, gen, idx, idx.image_encoder, cfg, mode, on_result=on_result)
    if out_dir:
        result["files"] = write_outputs(result, out_dir)
    return result


def synth_questions(kb_dir: str | Path, out_dir: str | Path, *, dev_fraction: float = 0.3, seed: int = 0,
                    max_per_template: int | None = 150, max_dev_per_template: int | None = 10,
                    holdout: tuple[str, ...] = (), max_ood_per_template: int | None = 25) -> dict:
    """Synthesise train/dev (and out-of-domain) question files from a KB folder."""
    from .data.synth import synthesize

    return synthesize(kb_dir, out_dir, dev_fraction=dev_fraction, seed=seed, max_per_template=max_per_template,
                      max_dev_per_template=max_dev_per_template, holdout=holdout,
                      max_ood_per_template=max_ood_per_template)


DEMO_HOLDOUT = ("astronomy",)  # the demo's out-of-domain image domain: never trained on, asked in held-out wordings


def demo_questions(cfg: Config, progress: bool = True) -> Path:
    """The demo's question folder (train, dev, and ood for the held-out domain), synthesised on first use."""
    folder = demo_paths()[0].parent / "questions"
    if not (folder / "ood.jsonl").is_file():
        ensure_demo_index(cfg, progress=progress)
        synth_questions(demo_paths()[0], folder, holdout=DEMO_HOLDOUT)
    return folder


def demo_question(cfg: Config) -> tuple[Path, str]:
    """A demo image (a perturbed copy of a KB flag, never the indexed file) and a 2-hop question about it."""
    import json
    import random

    from .data.synth import perturb

    kb, _ = demo_paths()
    images = [json.loads(x) for x in (kb / "images.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    pick = next((im for im in images if im["id"] == "flag:france"), images[0])
    out = cache_dir("demo") / "ask" / "demo-flag.jpg"
    if not out.is_file():
        perturb(kb / pick["path"], out, random.Random(0))
    return out, "What is the capital of the country whose flag is shown?"


def demo(cfg: Config, *, progress: bool = True, on_event=None):
    """The main job on the embedded defaults: the demo index (built on first use), then `ask` about a demo image
    with a 2-hop question. `on_event("question", (image, question))` comes first, then ask's own events."""
    idx = ensure_demo_index(cfg, progress=progress)
    image, question = demo_question(cfg)
    if on_event:
        on_event("question", (image, question))
    return ask([image], question, cfg, idx, on_event=on_event, progress=progress)


def train_options() -> list:
    """The `train` options (name, flag, type, default, help, choices), derived from the training settings
    dataclasses (mmhops_lite/train/settings.py), which hold every default once."""
    from .train.settings import train_options as table

    return table()


def reward_parts() -> dict:
    """The reward table: part name -> (default weight, what it pays), then the options -> (0, what they do)."""
    from .rewards import OPTIONS, REWARDS

    return {**{n: (p.weight, p.help) for n, p in REWARDS.items()}, **{o: (0, h) for o, h in OPTIONS.items()}}


def train_policy(questions_file: str | Path | None, cfg: Config, out: str | Path, index: str | Path | None = None, *,
                 model: str | None = None, sft=True, lora=None, grpo=None, reward="", on_event=None,
                 from_adapter: str | Path | None = None, **options) -> dict:
    """Train a LoRA adapter over an index (see mmhops_lite.train.driver.train); resumable from `out`.

    `options` are `train_options()` by name (e.g. steps=40, grpo_lr=5e-5, seed=1); `lora`/`grpo` (settings
    objects) and `sft` (True, False/None, or an SFTConfig) override them whole. `reward` is a `--reward` spec or a
    `rewards.Weights`; `from_adapter` starts from a trained LoRA (a run folder or PEFT folder). Without a question file, the demo train split (synthesised on first use)."""
    from .rewards import Weights
    from .train.driver import train
    from .train.settings import SFTConfig, settings_from

    settings = settings_from(options)
    weights = reward if isinstance(reward, Weights) else Weights.parse(reward or "")
    if questions_file is None:
        questions_file = demo_questions(cfg) / "train.jsonl"
    sft_cfg = sft if isinstance(sft, SFTConfig) else (settings["sft"] if sft else None)
    idx_path = resolve_index(cfg, index)
    with open_index(idx_path, cfg) as idx:
        return train(questions_file, idx, cfg, out, model=model, lora=lora or settings["lora"], sft=sft_cfg,
                     grpo=grpo or settings["grpo"], weights=weights, on_event=on_event, from_adapter=from_adapter)


def export_formats() -> dict:
    """Export format name -> (bundle kind, quantizations with their parity gates, default quantization, help)."""
    from export.formats import FORMATS

    return {name: {"kind": f.kind, "gates": dict(f.gates), "default_quant": f.default_quant, "help": f.help}
            for name, f in FORMATS.items()}


def _parity_sources(questions: str | Path | None, index: str | Path | None) -> tuple[Path, Path | None]:
    """The questions and index whose real loop prompts a parity gate uses: those given, else the demo dev split
    over the demo index (when it is built); without an index the gate falls back to synthetic prompts."""
    kb, demo_index = demo_paths()
    qfile = Path(questions) if questions else kb.parent / "questions" / "dev.jsonl"
    ipath = index or (demo_index if questions is None else None)
    return qfile, (Path(ipath) if ipath is not None and Path(ipath).is_dir() else None)


def export_policy(fmt: str, out: str | Path, cfg: Config, *, model: str | None = None, adapter: str | None = "auto",
                  quant: str | None = None, prompts: int = 50, questions: str | Path | None = None,
                  index: str | Path | None = None, force: bool = False, progress=None) -> dict:
    """Export the policy (base `model` or the configured one, with `adapter`: a path, `auto` for the shipped one,
    or `none`) as a verified bundle in format `fmt` (see export_formats()); returns the bundle manifest."""
    from contextlib import nullcontext

    from export.formats import choose
    from export.writer import export_bundle

    from .registry import choose_adapter

    choose(fmt, quant)  # an unknown format or quantization is refused before any model or index is opened
    base = model or cfg.model.policy
    chosen = choose_adapter(base, adapter)
    qfile, ipath = _parity_sources(questions, index)
    with (open_index(ipath, cfg) if ipath else nullcontext()) as idx:
        return export_bundle(fmt, base, str(chosen) if chosen else None, Path(out), quant, prompts=prompts,
                             questions=qfile, force=force, index=idx, progress=progress)


def verify_bundle(bundle: str | Path, cfg: Config, *, parity: bool = False, prompts: int = 50,
                  questions: str | Path | None = None, index: str | Path | None = None) -> dict:
    """Check a bundle's files against its manifest (CorruptFile names the first bad one); with `parity`, measure
    its greedy agreement with torch again on the same kind of prompts the export used."""
    from contextlib import nullcontext

    from export.writer import verify_bundle as verify

    qfile, ipath = _parity_sources(questions, index)
    with (open_index(ipath, cfg) if ipath and parity else nullcontext()) as idx:
        return verify(Path(bundle), parity, prompts, qfile, idx)


def build_demo_kb(out: str | Path, progress: bool = True) -> dict:
    """Write the demo KB as plain files (passages.jsonl, images.jsonl, triples.jsonl, images/); returns its manifest."""
    from .data.demo_kb import build_demo_kb as build

    return build(out, progress=progress)


def import_kb(out: str | Path, passages: str | Path | None = None, images: str | Path | None = None, *,
              image_root: str | Path | None = None, skip_bad: bool = False, progress=None) -> dict:
    """Write a KB folder from MMhops-KB / Search-R1 shaped JSON lines (streamed, resumable); returns the report.
    See mmhops_lite.data.kb_import."""
    from .data.kb_import import import_kb as run

    return run(out, passages, images, image_root=image_root, skip_bad=skip_bad, progress=progress)


def shipped_adapters() -> list[tuple[str, Path]]:
    """(policy name, folder) of every LoRA adapter shipped in models/adapters/."""
    from .registry import MODELS_DIR

    return [(f.name, f) for f in sorted((MODELS_DIR / "adapters").glob("*/"))]
