"""`mmhops-lite train`: the driver that loads data and policy, runs SFT (and GRPO), saves and converts the adapter."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from ..config import Config
from ..convert import adapter_to_gguf
from ..data.questions import load_questions
from ..errors import InputError, require
from ..paths import free_cores
from ..rewards import Weights
from ..safeio import atomic_write
from .distributed import Dist
from .episodes import TokenizedEpisode
from .grpo_run import Engine, plot_curves, run_grpo
from .policy import check_adapter, load_for_training, save_adapter
from .settings import GRPOConfig, LoraSpec, SFTConfig, check_choices, resolve_device
from .sft import GoldReport, build_gold_set, rejection_episodes, run_sft, with_paths


def _save_data(path: Path, data: list[TokenizedEpisode]) -> None:
    atomic_write(path, "".join(json.dumps({"input_ids": e.input_ids, "loss_mask": e.loss_mask,
                                           "prompt_len": e.prompt_len}) + "\n" for e in data))


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False))


def _load_data(path: Path) -> list[TokenizedEpisode]:
    return [TokenizedEpisode(**json.loads(x)) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def train(questions_file: str | Path, index, cfg: Config, out: str | Path, *, model: str | None = None,
          lora: LoraSpec = LoraSpec(), sft: SFTConfig | None = SFTConfig(), grpo: GRPOConfig | None = GRPOConfig(),
          weights: Weights = Weights(), gguf_adapter: bool = True, on_event: Callable[[str, dict], None] | None = None,
          from_adapter: str | Path | None = None) -> dict:
    """Train a LoRA adapter on a question file over an open index; resumable from `out`. `from_adapter` (a PEFT
    adapter folder or a train run folder) starts from that LoRA instead of a fresh one."""
    for settings in (lora, sft, grpo):
        if settings is not None:
            check_choices(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if grpo is not None and grpo.steps > 0 and grpo.trainer == "trl" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        require("accelerate", "train").PartialState()  # accelerate owns the process group (NCCL on GPUs)
    dist = Dist()  # one process unless started by `accelerate launch` / `torchrun`
    emit = (on_event if dist.main else None) or (lambda kind, payload: None)
    if dist.world > 1 and cfg.model.threads == 0:  # the processes share this machine's free cores
        cfg = replace(cfg, model=replace(cfg.model, threads=dist.threads(free_cores())))
    t0 = time.perf_counter()
    model = model or cfg.model.policy
    questions = load_questions(questions_file)
    device = resolve_device((grpo or sft).device if (grpo or sft) else "auto")
    if sft is not None and grpo is not None and sft.device != grpo.device:
        raise InputError(f"SFT on {sft.device} and GRPO on {grpo.device}", fix="give one --device for both")
    start = None
    if from_adapter:
        start = Path(from_adapter)
        start = start / "adapter" if (start / "adapter" / "adapter_config.json").is_file() else start
        check_adapter(start)
        if start.suffix == ".gguf":
            raise InputError(f"{start} is a GGUF adapter: training starts from a PEFT adapter folder",
                             fix="pass the train run folder (or its adapter/ folder)")
    net, tok, base_dir, base_gguf = load_for_training(model, lora, adapter=start, threads=cfg.model.threads,
                                                      seed=sft.seed if sft else 0)
    if device == "cuda":
        net.to(f"cuda:{dist.local_rank}" if dist.world > 1 else "cuda")
    meta = {"base": str(model), "base_hf": str(base_dir), "base_gguf": str(base_gguf) if base_gguf else None,
            "questions": str(Path(questions_file).resolve()), "lora": asdict(lora),
            "sft": asdict(sft) if sft else None, "grpo": asdict(grpo) if grpo else None,
            "reward": weights.to_dict(), "hardware": f"{platform.machine()} {platform.processor()}".strip(),
            "from_adapter": str(start) if start else None, "device": device,
            "trainer": grpo.trainer if grpo is not None and grpo.steps > 0 else None}
    result = {"out": str(out), "meta": meta}
    if sft is not None:
        data_path = out / "sft-data.jsonl"
        if not data_path.is_file() and dist.main:  # built once; a resumed run reuses exactly these examples
            emit("phase", {"name": "gold trajectories", "total": sft.max_examples})
            report = GoldReport()
            data = build_gold_set(questions, tok, index, cfg, sft.max_examples, sft.seed,
                                  progress=lambda n, total: emit("gold", {"n": n, "total": total}), report=report,
                                  discover_share=sft.discover_share)
            if sft.rejection_samples and report.missed and len(data) < sft.max_examples:
                emit("phase", {"name": "rejection sampling", "questions": min(len(report.missed),
                                                                               sft.rejection_questions)})
                data += rejection_episodes(questions, report, tok, index, cfg, model, base_gguf, sft)
            _write_json(out / "gold-report.json", {**report.to_dict(), "paths": report.paths})
            _save_data(data_path, data)
            emit("gold-report", report.to_dict())
        dist.barrier()
        questions = with_paths(questions, out / "gold-report.json")
        data = _load_data(data_path)
        emit("phase", {"name": "sft", "examples": len(data)})
        state = run_sft(net, data, out, sft, meta, on_step=lambda rec: emit("step", rec), dist=dist)
        result["sft_steps"] = state["step"]
        result["sft_examples"] = len(data)
    if grpo is not None and grpo.steps > 0 and grpo.trainer == "trl":
        from .trl_route import run_trl_grpo

        emit("phase", {"name": "grpo", "steps": grpo.steps, "trainer": "trl"})
        engine = Engine("torch" if grpo.engine == "vllm" else grpo.engine, net, tok, out, base_dir, base_gguf, cfg,
                        grpo.rollout_weights, tag=f".rank{dist.rank}" if dist.world > 1 else "")
        state = run_trl_grpo(net, tok, questions, index, cfg, grpo, out, engine, weights, device,
                             on_step=lambda rec: emit("step", rec))
        result["grpo_steps"] = state["step"]
        png = plot_curves(out) if dist.main else None
        result["curves"] = str(png) if png else None
    elif grpo is not None and grpo.steps > 0:
        emit("phase", {"name": "grpo", "steps": grpo.steps})
        state = run_grpo(net, tok, questions, index, cfg, grpo, out, base_dir, base_gguf, meta, weights,
                         on_step=lambda rec: emit("step", rec), on_warning=lambda msg: emit("warning", {"text": msg}),
                         dist=dist)
        result["grpo_steps"] = state["step"]
        png = plot_curves(out) if dist.main else None
        result["curves"] = str(png) if png else None
    if sft is None and (grpo is None or grpo.steps == 0):
        raise InputError("nothing to train", fix="pass --sft and/or --steps N")
    meta["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if dist.world > 1:
        meta["processes"] = dist.world
    if not dist.main:  # the first process writes the adapter
        result.update(adapter=str(out / "adapter"), seconds=meta["wall_seconds"], rank=dist.rank)
        return result
    adapter = save_adapter(net, out / "adapter", meta)
    result["adapter"] = str(adapter)
    if gguf_adapter:
        result["adapter_gguf"] = str(adapter_to_gguf(adapter, base_dir, out / "adapter.gguf"))
    result["seconds"] = meta["wall_seconds"]
    return result
