"""MMhops-style evaluation: run a question file through the loop in one mode, score, and summarise."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

from .config import Config
from .loop import answer, perceive
from .safeio import atomic_write
from .scoring import score
from .types import Question

MODES = ("agent", "pipeline", "direct")


def evaluate(questions: Sequence[Question], generator, index, image_encoder, cfg: Config, mode: str = "agent",
             on_result: Callable[[dict], None] | None = None, ocr: bool | None = None) -> dict:
    """Answer every question in `mode`; returns per-question records and the summary table."""
    records = []
    cache: dict = {}
    use_ocr = cfg.encoders.ocr if ocr is None else ocr
    for q in questions:
        t0 = time.perf_counter()
        perc = perceive(q.images, image_encoder, ocr=use_ocr) if q.images else []
        tr = answer(q.problem, generator, index, cfg, perc, mode=mode, search_cache=cache)
        searches = sum(h.action in ("image_search", "text_search") for h in tr.hops)
        rec = {"id": q.id, "split": q.split, "problem_type": q.problem_type, "prediction": tr.answer,
               "answer": q.answer, "correct": score(tr.answer, q.answer_eval, q.problem_type),
               "turns": len(tr.hops), "searches": searches,
               "forced": any(h.forced for h in tr.hops), "seconds": round(time.perf_counter() - t0, 3),
               "template": q.extra.get("template"), "actions": [h.action for h in tr.hops],
               # the trace itself, so a failure can be read without running the question again
               "hops": [{"action": h.action, "argument": h.argument, "think": h.think,
                         "results": [{k: r[k] for k in ("id", "title", "score") if k in r} for r in h.results]}
                        for h in tr.hops]}
        records.append(rec)
        if on_result:
            on_result(rec)
    return {"mode": mode, "model": getattr(generator, "id", "?"), "summary": summarize(records), "records": records}


def summarize(records: list[dict]) -> dict:
    """Accuracy overall, per split and per type; mean turns, searches and seconds per question."""
    groups = defaultdict(list)
    for r in records:
        groups["all"].append(r)
        groups[r["split"]].append(r)
        groups[r["problem_type"]].append(r)
    out = {}
    for name, rs in groups.items():
        n = len(rs)
        out[name] = {"n": n, "accuracy": round(sum(r["correct"] for r in rs) / n, 4),
                     "turns": round(sum(r["turns"] for r in rs) / n, 2),
                     "searches": round(sum(r["searches"] for r in rs) / n, 2),
                     "seconds": round(sum(r["seconds"] for r in rs) / n, 2),
                     "answered": round(sum(r["prediction"] is not None for r in rs) / n, 4),
                     # answers the loop asked for when the turns ran out (loop.final_answer)
                     "forced": round(sum(bool(r.get("forced")) for r in rs) / n, 4)}
    return out


def write_outputs(result: dict, out_dir: str | Path) -> dict:
    """Write summary JSON, per-question records, and predictions the official evaluator reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['mode']}-{_safe(result['model'])}"
    paths = {"summary": out / f"{stem}.summary.json", "records": out / f"{stem}.records.jsonl",
             "predictions": out / f"{stem}.predictions.jsonl"}
    _atomic(paths["summary"], json.dumps({k: v for k, v in result.items() if k != "records"}, indent=2))
    _atomic(paths["records"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result["records"]))
    _atomic(paths["predictions"], "".join(json.dumps({"id": r["id"], "prediction": r["prediction"] or ""},
                                                     ensure_ascii=False) + "\n" for r in result["records"]))
    return {k: str(v) for k, v in paths.items()}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def _atomic(path: Path, text: str) -> None:
    atomic_write(path, text)
