"""One write operation in its own process, for the fault suite to kill (tests/test_faults.py).

    python fault_worker.py build KB INDEX      # sync with prune
    python fault_worker.py add KB INDEX        # sync without prune
    python fault_worker.py remove INDEX ID...  # remove ids
    python fault_worker.py repair INDEX        # publish fresh graphs from the store
    python fault_worker.py train RUN STEPS     # a LoRA-shaped training loop: checkpoint + log every step
    python fault_worker.py read INDEX SECONDS UNIVERSE_JSON   # a reader querying in a loop (prints a JSON report)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from fakes import HashTextEncoder, TinyImageEncoder  # noqa: E402

from mmhops_lite.config import IndexConfig  # noqa: E402

CFG = IndexConfig(batch_size=2)


def train(run: Path, steps: int) -> None:
    """The shape of the SFT/GRPO loops: resume from the checkpoint, trim the log, then step, log, checkpoint."""
    import torch

    from mmhops_lite.train.checkpoint import load_checkpoint, save_checkpoint, trim_log

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01)
    run.mkdir(parents=True, exist_ok=True)
    log = run / "log.jsonl"
    state = load_checkpoint(run / "checkpoint", net, opt) or {"step": 0}
    trim_log(log, state["step"])
    x = torch.linspace(-1, 1, 16 * 8).reshape(16, 8)
    while state["step"] < steps:
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["step"] += 1
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state["step"], "loss": round(float(loss), 6)}) + "\n")
        save_checkpoint(run / "checkpoint", net, opt, state, {"kind": "fault-suite"})


def read(index: Path, seconds: float, universe: set) -> dict:
    """Open and query in a loop; every failure is counted with its type, every hit checked against the universe."""
    from mmhops_lite.errors import MmhopsError
    from mmhops_lite.index import MultimodalIndex

    rep = {"opens": 0, "queries": 0, "errors": [], "unknown_hits": 0}
    end = time.monotonic() + seconds
    words = ["alpha", "river", "capital", "item", "Freedonia", "number 7"]
    while time.monotonic() < end:
        try:
            with MultimodalIndex(index, HashTextEncoder(), None) as idx:
                rep["opens"] += 1
                for w in words:
                    for h in idx.search_text(w, 5):
                        rep["queries"] += 1
                        if h.passage.id not in universe:
                            rep["unknown_hits"] += 1
        except MmhopsError as exc:
            rep["errors"].append(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - anything else is a failure the suite reports
            rep["errors"].append(f"UNEXPECTED {type(exc).__name__}: {exc}")
    return rep


def main(argv: list[str]) -> None:
    from mmhops_lite.index import KnowledgeBase, remove, repair, sync

    op = argv[0]
    if op in ("build", "add"):
        sync(argv[2], KnowledgeBase(argv[1]), HashTextEncoder(), TinyImageEncoder(), CFG, prune=op == "build",
             progress=False)
    elif op == "remove":
        remove(argv[1], argv[2:], CFG)
    elif op == "repair":
        repair(argv[1], CFG)
    elif op == "train":
        train(Path(argv[1]), int(argv[2]))
    elif op == "read":
        print(json.dumps(read(Path(argv[1]), float(argv[2]), set(json.loads(Path(argv[3]).read_text())))))
    else:
        raise SystemExit(f"unknown operation {op}")


if __name__ == "__main__":
    main(sys.argv[1:])
