"""Checkpoints that resume exactly, without pickle: LoRA weights and optimiser state in safetensors, the rest JSON."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import IndexCorrupt, require


def save_checkpoint(folder: Path, net, opt, state: dict, meta: dict) -> None:
    """Write adapter weights, optimiser moments and state to a temp folder, then swap it in."""
    torch = require("torch", "train")
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [p for _, p in net.named_parameters() if p.requires_grad]
    save_file({n: p.detach().contiguous() for n, p in zip(names, params)}, str(tmp / "weights.safetensors"))
    moments, steps = {}, {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key, val in st.items():
            if torch.is_tensor(val) and val.ndim > 0:
                moments[f"{i}.{key}"] = val.contiguous()
            elif key == "step":
                steps[str(i)] = float(val)
    if moments:
        save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"state": state, "meta": meta, "param_names": names,
                                                "opt_steps": steps, "lr": [g["lr"] for g in opt.param_groups]},
                                               default=str, indent=1))
    old = folder.parent / f".{folder.name}.old{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, net, opt) -> dict | None:
    """Restore a checkpoint into net and opt; returns its state, or None if there is none."""
    torch = require("torch", "train")
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "state.json").is_file():
        return None
    try:
        info = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "weights.safetensors"))
    except (OSError, json.JSONDecodeError, Exception) as exc:  # safetensors raises its own error types
        raise IndexCorrupt(f"checkpoint {folder} is unreadable: {exc}", path=folder,
                           fix=f"delete {folder} to start over, or restore it") from exc
    named = dict((n, p) for n, p in net.named_parameters() if p.requires_grad)
    if sorted(named) != sorted(info["param_names"]):
        raise IndexCorrupt(f"checkpoint {folder} was made for other LoRA settings", path=folder,
                           fix="use the same --rank/--targets as the run that wrote it, or a new output folder")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(weights[n])
    params = [named[n] for n in info["param_names"]]
    mpath = folder / "optimizer.safetensors"
    if mpath.is_file():
        moments = load_file(str(mpath))
        for key, val in moments.items():
            i, name = key.split(".", 1)
            opt.state[params[int(i)]][name] = val.clone()
        for i, s in info.get("opt_steps", {}).items():
            opt.state[params[int(i)]]["step"] = torch.tensor(s)
    return info["state"]


def trim_log(log: Path, step: int) -> None:
    """On resume, drop log rows past the checkpoint's step: the run redoes those steps and logs them again.

    >>> import tempfile, json
    >>> p = Path(tempfile.mkdtemp()) / "log.jsonl"
    >>> _ = p.write_text("".join(json.dumps({"step": s}) + "\\n" for s in (1, 2, 3)))
    >>> trim_log(p, 2); [json.loads(x)["step"] for x in p.read_text().splitlines()]
    [1, 2]
    """
    if not log.is_file():
        return
    rows = log.read_text(encoding="utf-8").splitlines()
    keep = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(keep) != len(rows):
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, log)
