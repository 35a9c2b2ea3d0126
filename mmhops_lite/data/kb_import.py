"""`mmhops-lite kb import`: turn an MMhops-KB / Search-R1 shaped corpus into a KB folder, streamed and resumable.

Inputs (JSON lines):
- passages: {"id", "contents"} with the title on the first line of `contents` (surrounding quotes dropped) and
  the text after it; our own {"id", "title", "text"} lines are read as they are. Integer ids become strings.
- images: {"id" or "entity_id", "title", "image_path"} (or "path"); a relative image_path is resolved against
  --image-root (default: the images file's folder). Each image is hard-linked (copied across filesystems) into
  the KB's images/ folder, since a KB keeps its images inside itself.

Output: KB/passages.jsonl, KB/images.jsonl, KB/images/..., KB/import.json (sources, counts, skipped lines).

Streaming and resume: each output is written as `<name>.partial` and checkpointed every few thousand lines
(output flushed and fsynced, then `.import-state.json` records the input offset and output size). An
interrupted import, run again with the same inputs, truncates the partial file to its last checkpoint and goes
on from there; a finished file is renamed into place atomically. A changed input file restarts that file.

Malformed lines (bad UTF-8 or JSON, missing fields, repeated ids, missing images) stop the import with an error
naming file:line; with skip_bad they are skipped and listed in import.json instead.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..safeio import atomic_json, fsync_dir

STATE = ".import-state.json"
REPORT = "import.json"
CHECKPOINT_LINES = 5_000
MAX_LISTED = 200  # skipped lines listed in import.json (all are counted)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class _Bad(Exception):
    """One malformed input line."""


def _source_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _split_contents(contents: str) -> tuple[str, str]:
    head, _, rest = contents.strip().partition("\n")
    title = head.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1].strip()
    text = rest.strip() or title
    return title, text


def _str_id(value) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def passage_row(obj: dict) -> dict:
    """One passage line -> our KB row, or _Bad saying what is wrong."""
    pid = _str_id(obj.get("id", obj.get("_id")))
    if pid is None:
        raise _Bad("lacks an 'id' (a non-empty string or an integer)")
    if "contents" in obj:
        if not isinstance(obj["contents"], str) or not obj["contents"].strip():
            raise _Bad("has an empty or non-string 'contents'")
        title, text = _split_contents(obj["contents"])
    elif isinstance(obj.get("title"), str) and isinstance(obj.get("text"), str):
        title, text = obj["title"].strip(), obj["text"].strip() or obj["title"].strip()
    else:
        raise _Bad("lacks 'contents' (title on the first line, then the text) or 'title' and 'text'")
    if not title:
        raise _Bad("has an empty title (the first line of 'contents')")
    return {"id": pid, "title": title, "text": text, "source": "import"}


def image_row(obj: dict, root: Path, out_images: Path, line: int) -> tuple[dict, Path, Path]:
    """One image line -> (our KB row, source file, destination), or _Bad."""
    iid = _str_id(obj.get("id"))
    if iid is None:  # an entity often has several images: its id alone would repeat
        entity = _str_id(obj.get("entity_id"))
        if entity is None:
            raise _Bad("lacks an 'id' or 'entity_id'")
        iid = f"{entity}#{line}"
    title = obj.get("title")
    if not isinstance(title, str) or not title.strip():
        raise _Bad("lacks a non-empty 'title'")
    rel = obj.get("image_path", obj.get("path"))
    if not isinstance(rel, str) or not rel.strip():
        raise _Bad("lacks an 'image_path'")
    src = Path(rel) if Path(rel).is_absolute() else root / rel
    if not src.is_file():
        raise _Bad(f"names image {src}, which does not exist")
    suffix = src.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,5}", src.suffix.lower()) else ""
    name = f"{_SAFE.sub('_', iid)[:80]}-{line}{suffix}"
    return ({"id": iid, "path": f"images/{name}", "title": title.strip(),
             "caption": obj["caption"] if isinstance(obj.get("caption"), str) else ""}, src, out_images / name)


def _place(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst`, or copy it (other filesystem); an existing complete copy is kept."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class _Job:
    """Stream one input file into one output file, checkpointed in the shared state."""

    def __init__(self, out: Path, kind: str, source: Path, state: dict, save_state: Callable[[], None]):
        self.out, self.kind, self.source, self.state, self.save_state = out, kind, source, state, save_state
        self.final, self.partial = out / f"{kind}.jsonl", out / f"{kind}.jsonl.partial"

    def run(self, convert: Callable[[dict, int], dict], skip_bad: bool, progress) -> dict:
        key = _source_key(self.source)
        st = self.state.get(self.kind)
        if st and st["source"] == key and st.get("done") and self.final.is_file():
            return st["report"]
        if not (st and st["source"] == key and self.partial.is_file()):
            st = {"source": key, "offset": 0, "line": 0, "written": 0, "report": {"rows": 0, "skipped": 0,
                                                                                   "skipped_lines": []}}
        self.state[self.kind] = st
        self.save_state()  # marks the folder as this import's before its first line is written
        report, seen = st["report"], {}
        with open(self.partial, "ab") as fh:
            fh.truncate(st["written"])
        if st["written"]:  # resuming: the ids already written are the duplicates to refuse
            with open(self.partial, "rb") as fh:
                for n, raw in enumerate(fh, 1):
                    seen[json.loads(raw)["id"]] = n
        total = key["size"]
        t_last = time.monotonic()
        with open(self.source, "rb") as src, open(self.partial, "ab") as dst:
            src.seek(st["offset"])
            n = st["line"]
            for raw in src:
                n += 1
                try:
                    row = self._row(raw, n, convert, seen)
                except _Bad as exc:
                    if not skip_bad:
                        raise InputError(f"{self.source}:{n} {exc}", path=self.source,
                                         fix="fix or delete that line, or pass --skip-bad to skip such lines "
                                             "(they are listed in import.json); the import resumes where it "
                                             "stopped") from None
                    report["skipped"] += 1
                    if len(report["skipped_lines"]) < MAX_LISTED:
                        report["skipped_lines"].append(f"{n}: {exc}")
                    row = None
                if row is not None:
                    dst.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                    seen[row["id"]] = len(seen) + 1
                    report["rows"] += 1
                if n % CHECKPOINT_LINES == 0:
                    self._checkpoint(st, src, dst, n)
                    if progress and time.monotonic() - t_last > 1.0:
                        t_last = time.monotonic()
                        progress(self.kind, src.tell(), total, report["rows"])
            self._checkpoint(st, src, dst, n)
        if progress:
            progress(self.kind, total, total, report["rows"])
        os.replace(self.partial, self.final)
        fsync_dir(self.out)
        st["done"] = True
        self.save_state()
        return report

    def _row(self, raw: bytes, n: int, convert, seen: dict) -> dict | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(f"is not valid UTF-8 (byte {exc.start})") from None
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _Bad(f"is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise _Bad("is not a JSON object")
        row = convert(obj, n)
        if row["id"] in seen:
            raise _Bad(f"repeats id '{row['id'][:80]}' (output row {seen[row['id']]})")
        return row

    def _checkpoint(self, st: dict, src, dst, n: int) -> None:
        dst.flush()
        os.fsync(dst.fileno())
        st.update(offset=src.tell(), line=n, written=dst.tell())
        self.state[self.kind] = st
        self.save_state()


def import_kb(out: str | Path, passages: str | Path | None = None, images: str | Path | None = None, *,
              image_root: str | Path | None = None, skip_bad: bool = False, progress=None) -> dict:
    """Write (or resume writing) a KB folder at `out` from MMhops-KB-shaped files; returns the import report.

    `progress(kind, bytes_done, bytes_total, rows)` is called about once a second per file."""
    if passages is None and images is None:
        raise InputError("give a passages file, an images file, or both",
                         fix="e.g. mmhops-lite kb import --passages corpus.jsonl --images images.jsonl -o KB")
    out = Path(out)
    sources = {}
    for kind, p in (("passages", passages), ("images", images)):
        if p is None:
            continue
        p = Path(p)
        if not p.is_file():
            raise InputError(f"{kind} file {p} does not exist", path=p, fix="check the path")
        sources[kind] = p
    _check_target(out, sources)
    done = _finished(out, sources)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    except json.JSONDecodeError:
        state = {}  # a torn state file: start the files again (partials are truncated to what it says, i.e. 0)

    def save_state():
        atomic_json(state_path, state, what="import state")

    reports = {}
    if "passages" in sources:
        reports["passages"] = _Job(out, "passages", sources["passages"], state, save_state).run(
            lambda obj, n: passage_row(obj), skip_bad, progress)
    if "images" in sources:
        root = Path(image_root) if image_root else sources["images"].parent
        if not root.is_dir():
            raise InputError(f"image root {root} is not a folder", path=root,
                             fix="pass --image-root, the folder image_path values are relative to")
        (out / "images").mkdir(exist_ok=True)

        def convert(obj, n):
            row, src, dst = image_row(obj, root, out / "images", n)
            try:
                _place(src, dst)
            except OSError as exc:
                raise _Bad(f"names image {src}, which cannot be read ({exc.strerror})") from None
            return row

        reports["images"] = _Job(out, "images", sources["images"], state, save_state).run(convert, skip_bad,
                                                                                           progress)
    report = {"format": "mmhops-kb-import", "version": 1,
              "sources": {k: _source_key(p) for k, p in sources.items()}, "files": reports}
    atomic_json(out / REPORT, report, what="import report")
    state_path.unlink(missing_ok=True)
    fsync_dir(out)
    return report


def _finished(out: Path, sources: dict) -> dict | None:
    """The report of a finished import of these same, unchanged sources (then there is nothing to do)."""
    try:
        rep = json.loads((out / REPORT).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    same = rep.get("sources") == {k: _source_key(p) for k, p in sources.items()}
    return rep if same and all((out / f"{k}.jsonl").is_file() for k in sources) else None


def _check_target(out: Path, sources: dict) -> None:
    """Refuse to write into a folder that is something else (another KB, an index...), never losing its files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a folder", path=out, fix="choose another -o folder")
    ours = {STATE, REPORT, "passages.jsonl", "images.jsonl", "passages.jsonl.partial", "images.jsonl.partial",
            "images"}
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if (out / STATE).is_file() or (out / REPORT).is_file():
        if names - ours:
            raise InputError(f"{out} holds files an import did not write: {', '.join(sorted(names - ours))[:200]}",
                             path=out, fix="import into a new folder")
        return
    raise InputError(f"{out} is not empty and was not written by kb import", path=out,
                     fix="import into a new (or empty) folder; nothing was changed")
