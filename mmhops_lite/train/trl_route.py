"""`train --trainer trl`: trl's GRPOTrainer runs the update, our loop plays the episodes.

trl brings what the compact trainer does not: accelerate (one GPU, several, several machines; DeepSpeed or FSDP),
bf16 on GPUs and colocated vLLM generation. What stays ours, shared with the compact trainer:
- the episodes: a `rollout_func` plays each of trl's prompts as a whole `ask` episode through `loop.answer_many`
  and the index (llama.cpp, the live torch model, or trl's vLLM as the policy runtime);
- the mask: `tokenize_episode` splits each episode into prompt tokens and completion tokens, and the completion's
  `env_mask` is 0 on everything the loop wrote (<information> blocks, corrections), so trl's loss never reads them;
- the rewards: `rewards.trl_reward_functions`, one function per part of the reward table with its weight.

Each trl prompt is a question id and its text ("<id>\\t<problem>"): trl's sampler repeats it `group_size` times, the
rollout_func looks the question (images, gold answers) up by id. Checkpoints are trl's (out/trl-checkpoints), and
a run started again resumes from the last one; the step log is written in the compact trainer's format
(grpo-log.jsonl: reward by part, accuracy, searches, tokens, seconds), so curves and `train` progress read either.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from ..config import Config
from ..errors import InputError, require
from ..loop import answer, answer_many, perceive
from ..rewards import SCORED_FIELD, Weights, part_names, scored, total_reward, trl_reward_functions
from .checkpoint import trim_log
from .episodes import tokenize_episode
from .grpo_loss import native_bf16
from .grpo_run import episode_summary, step_record
from .settings import GRPOConfig

CHECKPOINTS = "trl-checkpoints"
LOSSES = {"grpo": ("grpo", "group"), "dr_grpo": ("dr_grpo", "none")}  # ours -> trl (loss_type, scale_rewards)
MAX_TOKENS = 1024  # dr_grpo's constant normaliser, as in the compact trainer (grpo_loss.group_backward)


def prompt_of(q) -> str:
    """The trl prompt of a question: its id, a tab, its text (the rollout_func finds the question by the id).

    >>> from types import SimpleNamespace as NS
    >>> prompt_of(NS(id="q7", problem="Who?"))
    'q7\\tWho?'
    """
    return f"{q.id}\t{q.problem}"


def episode_ids(tok, ep) -> dict:
    """One played episode as trl's rollout_func returns it: prompt ids, completion ids (every turn, the policy's and
    the loop's) and `env_mask`, 1 on the policy's tokens and 0 on the loop's. The split and the mask are
    `tokenize_episode`'s, which the compact trainer trains on: one definition for both routes."""
    te = tokenize_episode(tok, ep.prompt, ep.segments)
    completion, mask = te.input_ids[te.prompt_len:], te.loss_mask[te.prompt_len:]
    if not completion:  # an empty first turn: trl needs a token to read; it is the end and is not learned
        completion, mask = [tok.eos_token_id], [0]
    return {"prompt_ids": te.input_ids[:te.prompt_len], "completion_ids": completion, "env_mask": mask}


class LoopRollouts:
    """trl's `rollout_func`: each prompt (already repeated group_size times by trl) becomes one episode of our loop
    over the index. `generator_for(trainer)` gives the policy runtime for the trainer's current weights; the
    episodes of the last call (question, trace, reward parts) stay in `last` for the step log and for tests."""

    def __init__(self, questions: Sequence, index, cfg: Config, g: GRPOConfig, tok, weights: Weights,
                 generator_for: Callable):
        self.by_id = {q.id: q for q in questions}
        self.index, self.g, self.tok, self.weights = index, g, tok, weights
        self.cfg = replace(cfg, loop=replace(cfg.loop, temperature=g.temperature))
        self.generator_for = generator_for
        self.perceptions: dict = {}
        self.cache: dict = {}
        self.last: list = []
        self.summaries: list = []
        self.seconds = 0.0

    def question(self, prompt) -> object:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        qid = text.split("\t", 1)[0]
        if qid not in self.by_id:
            raise InputError(f"trl handed the rollout a prompt that names no training question: {text[:80]!r}",
                             fix="build the trainer's dataset with train.trl_route.prompt_of")
        return self.by_id[qid]

    def __call__(self, prompts: list, trainer) -> dict:
        t0 = time.perf_counter()
        step = trainer.state.global_step
        qs = [self.question(p) for p in prompts]
        for q in qs:
            if q.id not in self.perceptions:
                self.perceptions[q.id] = perceive(q.images, self.index.image_encoder,
                                                  ocr=self.cfg.encoders.ocr) if q.images else []
        # seeded by the episode's place in the step's global batch: the same episodes on any number of processes
        first = trainer.accelerator.process_index * len(qs)
        seeds = [self.g.seed * 100003 + step * 101 + (first + i) * 11 for i in range(len(qs))]
        gen = self.generator_for(trainer)
        eps: list = []
        if self.g.rollouts == "batched":
            traces = answer_many([q.problem for q in qs], gen, self.index, self.cfg,
                                 [self.perceptions[q.id] for q in qs], seeds, search_cache=self.cache,
                                 episode_out=eps)
        else:
            traces = []
            for q, seed in zip(qs, seeds):
                if hasattr(gen, "reset"):
                    gen.reset()
                traces.append(answer(q.problem, gen, self.index, self.cfg, self.perceptions[q.id], seed=seed,
                                     search_cache=self.cache, episode_out=eps))
        rows = [episode_ids(self.tok, ep) for ep in eps]
        self.last = [(q, tr, total_reward(tr, q, self.weights)) for q, tr in zip(qs, traces)]
        self.summaries = [{**episode_summary(tr, r), "split": q.split} for q, tr, r in self.last]
        if trainer.accelerator.num_processes > 1:  # every process plays its share; the log counts them all
            from accelerate.utils import gather_object

            self.summaries = gather_object(self.summaries)
        self.seconds = time.perf_counter() - t0
        return {"prompt_ids": [r["prompt_ids"] for r in rows], "completion_ids": [r["completion_ids"] for r in rows],
                "logprobs": None, "env_mask": [r["env_mask"] for r in rows],
                SCORED_FIELD: [scored(tr, q, self.weights) for q, tr in zip(qs, traces)]}


class VLLMGenerator:
    """Our Generator protocol over a vLLM `LLM` (trl's colocated engine, `trainer.vllm_generation.llm`): the loop's
    turns become `llm.generate` calls with the loop's stop strings; several episodes' turns go in one call."""

    id = "vllm"

    def __init__(self, llm, tokenizer, n_ctx: int):
        self.llm, self.tokenizer, self.n_ctx = llm, tokenizer, n_ctx

    def render(self, messages) -> str:
        from ..grammar import render_chatml

        if not self.tokenizer.chat_template:
            return render_chatml(messages)
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompt, stop, max_tokens=256, temperature=0.0, seed=None):
        return self.generate_many([prompt], stop, max_tokens, temperature, [seed])[0]

    def generate_many(self, prompts, stop, max_tokens=256, temperature=0.0, seeds=None, slots=None):
        from vllm import SamplingParams  # only on machines that run trl's vLLM

        from ..backends.base import Generation

        seeds = list(seeds or [None] * len(prompts))
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=list(stop), seed=s)
                  for s in seeds]
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]}
                                  for p in prompts], sampling_params=params, use_tqdm=False)
        dt = time.perf_counter() - t0
        res = []
        for o in outs:
            c = o.outputs[0]
            finish = {"stop": "stop", "length": "length"}.get(c.finish_reason, "stop")
            if finish == "stop" and c.stop_reason is None:
                finish = "eos"
            n_prompt = len(o.prompt_token_ids)
            res.append(Generation(c.text, n_prompt, n_prompt, len(c.token_ids), dt / len(outs), finish))
        return res


class _StepLog:
    """A trl callback writing each optimizer step to grpo-log.jsonl in the compact trainer's fields (plus trl's
    own), and handing it to `on_step`."""

    def __init__(self, out: Path, g: GRPOConfig, rollouts: LoopRollouts, engine: str, on_step, main: bool):
        self.log, self.g, self.rollouts, self.engine, self.on_step, self.main = (out / "grpo-log.jsonl", g, rollouts,
                                                                                 engine, on_step, main)
        self.t0 = time.perf_counter()

    def record(self, step: int, logs: dict) -> dict:
        """The compact trainer's log line (`grpo_run.step_record`) over the step's episodes, with trl's own numbers
        where trl computed them: rewards (by part), loss, entropy, KL, gradient norm."""
        flat = self.rollouts.summaries
        size = self.g.group_size
        groups = [flat[i:i + size] for i in range(0, len(flat), size)]
        varied = [len({round(f["total"], 9) for f in x}) > 1 for x in groups]
        part = {"flat": flat, "stats": [], "zero": varied.count(False), "groups": len(groups),
                "trained": sum(len(x) for x, v in zip(groups, varied) if v), "loss": float(logs.get("loss", 0.0))}
        now = time.perf_counter()
        roll = self.rollouts.seconds
        rec = step_record([part], step - 1, self.g, self.engine, (0.0, roll, now - self.t0 - roll), 1)
        self.t0 = now

        def trl_value(key, nd):
            return round(float(logs[key]), nd) if key in logs else None

        rec.update({"trainer": "trl", "reward": trl_value("reward", 4),
                    **{f"reward_{k}": trl_value(f"rewards/{k}/mean", 4) for k in (part_names(flat[0]) if flat else ())},
                    "entropy": trl_value("entropy", 4), "kl": trl_value("kl", 5), "grad_norm": trl_value("grad_norm", 5),
                    "update_tokens": rec["episode_tokens"]})  # trl runs every episode, prompt and all
        return rec

    def callback(self):
        transformers = require("transformers", "train")
        outer = self

        class Callback(transformers.TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if not logs or "reward" not in logs or not outer.main:
                    return
                rec = outer.record(state.global_step, logs)
                with open(outer.log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if outer.on_step:
                    outer.on_step(rec)

        return Callback()


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete trl checkpoint under out/trl-checkpoints, or None."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def trl_args(g: GRPOConfig, out: Path, device: str, world: int = 1):
    """trl's GRPOConfig for our settings: one optimizer step = questions_per_step groups of group_size episodes,
    all generated at once, then run micro_batch episodes per forward/backward pass (gradients accumulated), the loss and advantage scaling of `--loss`, constant learning rate, our clip, KL
    coefficient, seed and checkpoint interval."""
    trl = require("trl", "train")
    if g.loss not in LOSSES:
        raise InputError(f"--loss {g.loss} has no trl counterpart", fix="use --loss grpo or dr_grpo with --trainer "
                         "trl (reinforce is the compact trainer's)")
    episodes = g.questions_per_step * g.group_size
    if g.questions_per_step % world:
        raise InputError(f"--questions-per-step {g.questions_per_step} does not split over {world} processes",
                         fix=f"use a multiple of {world}")
    if g.micro_batch < 1 or (episodes // world) % g.micro_batch:
        raise InputError(f"--micro-batch {g.micro_batch} does not divide the {episodes // world} episodes each "
                         "process plays per step", fix="use 1 or a divisor of questions-per-step x group-size / "
                                                       "processes")
    loss_type, scale = LOSSES[g.loss]
    bf16 = g.update_dtype == "bf16" or (g.update_dtype == "auto" and (
        require("torch", "train").cuda.is_bf16_supported() if device == "cuda" else native_bf16()))
    return trl.GRPOConfig(
        output_dir=str(Path(out) / CHECKPOINTS), max_steps=g.steps, learning_rate=g.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=g.micro_batch,
        gradient_accumulation_steps=episodes // world // g.micro_batch, num_generations=g.group_size,
        loss_type=loss_type, scale_rewards=scale, beta=g.kl, epsilon=g.clip, num_iterations=1,
        max_completion_length=MAX_TOKENS, temperature=g.temperature, remove_unused_columns=False,
        gradient_checkpointing=False, bf16=bf16, use_cpu=device == "cpu", seed=g.seed, data_seed=g.seed,
        logging_steps=1, save_strategy="steps", save_steps=g.checkpoint_every, save_total_limit=2,
        report_to="none", disable_tqdm=True, log_completions=False,
        use_vllm=g.engine == "vllm", vllm_mode="colocate")


def run_trl_grpo(net, tok, questions: Sequence, index, cfg: Config, g: GRPOConfig, out: Path, engine,
                 weights: Weights = Weights(), device: str = "cpu", on_step: Callable[[dict], None] | None = None,
                 generator_for: Callable | None = None) -> dict:
    """Run trl's GRPOTrainer on `net` (the peft model: our LoRA spec, SFT warm start included) to g.steps,
    resuming from the last checkpoint under out/trl-checkpoints. `engine` is the compact trainer's rollout
    Engine (llama.cpp or live torch), refreshed when the weights changed; with --engine vllm trl's colocated vLLM
    generates. `generator_for(trainer)` overrides both (tests script the policy). Returns {"step": steps done}."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in trl 1.x
    trl = require("trl", "train")
    datasets = require("datasets", "train")

    def from_engine(trainer):
        if g.engine == "vllm":
            return VLLMGenerator(trainer.vllm_generation.llm, tok, cfg.model.n_ctx)
        step = trainer.state.global_step
        if engine.gen is None or step - engine.version >= g.refresh_every:
            was = net.training
            net.eval()
            engine.refresh(step)
            net.train(was)
        return engine.gen

    rollouts = LoopRollouts(questions, index, cfg, g, tok, weights, generator_for or from_engine)
    funcs, reward_weights = trl_reward_functions(weights)
    args = trl_args(g, out, device, int(os.environ.get("WORLD_SIZE", "1")))
    args.reward_weights = reward_weights
    data = datasets.Dataset.from_list([{"prompt": prompt_of(q)} for q in questions])
    trainer = trl.GRPOTrainer(model=net, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok,
                              rollout_func=rollouts)
    main = trainer.accelerator.is_main_process
    resume = last_checkpoint(out)
    if main:
        trim_log(out / "grpo-log.jsonl", int(resume.name.split("-")[-1]) if resume else 0)
    trainer.remove_callback(require("transformers", "train").PrinterCallback)  # our log and progress instead
    trainer.add_callback(_StepLog(out, g, rollouts, "vllm" if g.engine == "vllm" else engine.kind, on_step,
                                  main).callback())
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return {"step": trainer.state.global_step, "trainer": trainer, "rollouts": rollouts}
