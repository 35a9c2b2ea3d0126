"""Checkpoints that resume exactly, without pickle: LoRA weights and optimiser state in safetensors, the rest JSON.

A checkpoint is written whole into a hidden sibling folder (every file fsynced, its sha256 in state.json), then
swapped in with one atomic rename (renameat2 exchange on Linux). A kill at any moment leaves a complete
checkpoint: the new one, or the previous one under the visible name or a hidden one; `load_checkpoint` takes the
newest that verifies. A disk that fills up during a save leaves the previous checkpoint in use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import faults
from ..errors import CorruptFile, require
from ..paths import sha256
from ..safeio import atomic_write, failed, fsync_dir, remove_tree, swap_dirs, temp_name


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(folder: Path, net, opt, state: dict, meta: dict) -> None:
    """Write adapter weights, optimiser moments and state to a hidden folder, verify, then swap it in."""
    with faults.section("checkpoint"):
        _save(Path(folder), net, opt, state, meta)


def _save(folder: Path, net, opt, state: dict, meta: dict) -> None:
    torch = require("torch", "train")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a save that was killed
        remove_tree(stale)
    tmp = temp_name(folder)
    tmp.mkdir()
    try:
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        params = [p for _, p in net.named_parameters() if p.requires_grad]
        faults.no_space(folder)
        save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, params)}, str(tmp / "weights.safetensors"))
        faults.point("weights")
        moments, steps = {}, {}
        for i, p in enumerate(params):
            st = opt.state.get(p, {})
            for key, val in st.items():
                if torch.is_tensor(val) and val.ndim > 0:
                    moments[f"{i}.{key}"] = val.cpu().contiguous()
                elif key == "step":
                    steps[str(i)] = float(val)
        if moments:
            save_file(moments, str(tmp / "optimizer.safetensors"))
            faults.point("optimizer")
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            files[f.name] = {"sha256": sha256(f), "size": f.stat().st_size}
            faults.point("fsync")
        atomic_write(tmp / "state.json", json.dumps(
            {"state": state, "meta": meta, "param_names": names, "opt_steps": steps,
             "lr": [g["lr"] for g in opt.param_groups], "files": files}, default=str, indent=1))
        fsync_dir(tmp)
        faults.point("written")
    except Exception as exc:  # safetensors raises its own error types for a full disk
        remove_tree(tmp)
        if isinstance(exc, OSError):
            raise failed(folder / "state.json", exc, "checkpoint") from exc
        if "No space" in str(exc) or "os error 28" in str(exc):
            raise failed(folder / "state.json", OSError(28, "No space left on device"), "checkpoint") from exc
        raise
    old = swap_dirs(tmp, folder)
    faults.point("swapped")
    remove_tree(old)
    faults.point("cleaned")


def _verified(folder: Path) -> dict | None:
    """state.json of a checkpoint folder whose files all match their checksums, else None."""
    try:
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = info.get("files")
        if not isinstance(files, dict) or "weights.safetensors" not in files:
            return None
        for name, entry in files.items():
            p = folder / name
            if "/" in name or p.is_symlink() or not p.is_file() or p.stat().st_size != entry["size"] \
                    or sha256(p) != entry["sha256"]:
                return None
        return info
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def latest_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint: the folder itself, or one a killed save left under a hidden name."""
    folder = Path(folder)
    found = []
    for cand in [folder, *folder.parent.glob(f".{folder.name}.tmp-*")]:
        info = _verified(cand) if cand.is_dir() else None
        if info is not None:
            found.append((int(info.get("state", {}).get("step", 0)), cand == folder, cand, info))
    if not found:
        return None
    _, _, path, info = max(found, key=lambda t: (t[0], t[1]))
    return path, info


def load_checkpoint(folder: Path, net, opt) -> dict | None:
    """Restore the newest complete checkpoint into net and opt; returns its state, or None if there is none."""
    torch = require("torch", "train")
    from safetensors.torch import load_file

    folder = Path(folder)
    got = latest_checkpoint(folder)
    if got is None:
        if (folder / "state.json").exists() or (folder / "weights.safetensors").exists():
            raise CorruptFile(f"checkpoint {folder} is incomplete or altered (its files do not match state.json)",
                              path=folder, fix=f"delete {folder} to start this stage over, or restore it")
        return None
    path, info = got
    if path != folder:  # a save was killed after writing its copy in full: make that copy the checkpoint
        remove_tree(swap_dirs(path, folder))
        path = folder
    named = dict((n, p) for n, p in net.named_parameters() if p.requires_grad)
    if sorted(named) != sorted(info["param_names"]):
        raise CorruptFile(f"checkpoint {path} was made for other LoRA settings", path=path,
                          fix="use the same --rank/--targets as the run that wrote it, or a new output folder")
    try:
        weights = load_file(str(path / "weights.safetensors"))
        params = [named[n] for n in info["param_names"]]
        moments = load_file(str(path / "optimizer.safetensors")) if (path / "optimizer.safetensors").is_file() else {}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(weights[n])
        for key, val in moments.items():
            i, name = key.split(".", 1)
            opt.state[params[int(i)]][name] = val.to(params[int(i)].device).clone()
        for i, s in info.get("opt_steps", {}).items():
            opt.state[params[int(i)]]["step"] = torch.tensor(s)
    except Exception as exc:  # safetensors and torch raise their own error types
        raise CorruptFile(f"checkpoint {path} cannot be restored: {exc}", path=path,
                          fix=f"delete {folder} to start this stage over, or restore it") from exc
    return info["state"]


def trim_log(log: Path, step: int) -> None:
    """On resume, drop log rows past the checkpoint's step (the run redoes those steps and logs them again) and
    a last line a kill cut in half.

    >>> import tempfile, json
    >>> p = Path(tempfile.mkdtemp()) / "log.jsonl"
    >>> _ = p.write_text("".join(json.dumps({"step": s}) + "\\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    >>> trim_log(p, 2); [json.loads(x)["step"] for x in p.read_text().splitlines()]
    [1, 2]
    """
    if not log.is_file():
        return
    rows = log.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for r in rows:
        try:
            row = json.loads(r)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(r)
    if len(keep) != len(rows):
        atomic_write(log, "".join(r + "\n" for r in keep), what="log")
