"""`train --trainer trl`: trl's GRPOTrainer over our loop, on a tiny model built from a config, on the CPU.

The policy that plays the episodes is scripted (seeded: some episodes search then answer right, some answer
wrong, some break the format), so rewards differ inside every group and trl's update has something to learn;
the model trl trains and differentiates is the tiny Llama."""
import json

import pytest
from fakes import HashTextEncoder, SeededPolicy, TinyImageEncoder

from mmhops_lite.config import Config
from mmhops_lite.data.questions import load_questions
from mmhops_lite.data.synth import synthesize
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync
from mmhops_lite.rewards import REWARDS, Weights, total_reward
from mmhops_lite.train.settings import GRPOConfig, LoraSpec

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import inspect

    import conftest

    kb = inspect.unwrap(conftest.tiny_kb)(tmp_path_factory.mktemp("kb"))
    root = tmp_path_factory.mktemp("trlworld")
    sync(root / "idx", KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    synthesize(kb, root / "q", dev_fraction=0.0, seed=0, max_dev_per_template=None)
    # Synthesised wordings repeat across images: mark each question so the scripted policy can tell them apart.
    path = root / "q" / "train.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    path.write_text("".join(json.dumps({**r, "problem": f"{r['problem']} (case {r['id']})"}) + "\n" for r in rows))
    return root


CFG = Config.resolve({"encoders.ocr": False, "model.threads": 1, "loop.max_new_tokens": 24, "loop.max_turns": 3},
                     env={})


def run_trl(world, out, tiny_hf, steps, monkeypatch, record=None):
    """driver.train with --trainer trl, the rollout engine replaced by the seeded policy."""
    from mmhops_lite.train import grpo_run
    from mmhops_lite.train.driver import train

    policy = SeededPolicy(load_questions(world / "q" / "train.jsonl"))

    def refresh(self, step):
        self.gen, self.version = policy, step
    monkeypatch.setattr(grpo_run.Engine, "refresh", refresh)
    g = GRPOConfig(steps=steps, questions_per_step=2, group_size=3, lr=5e-3, engine="torch", trainer="trl",
                   checkpoint_every=1, rollouts="sequential", device="cpu", update_dtype="fp32")
    with MultimodalIndex(world / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        return train(world / "q" / "train.jsonl", idx, CFG, out, model=str(tiny_hf), lora=LoraSpec(r=4, alpha=8),
                     sft=None, grpo=g, gguf_adapter=False)


def test_trl_route_masks_loop_tokens_and_logs_our_rewards(world, tiny_hf, tmp_path, monkeypatch):
    import trl

    from mmhops_lite.train import trl_route

    episodes, rewards, grads = [], [], []
    real_call = trl_route.LoopRollouts.__call__

    def call(self, prompts, trainer):
        out = real_call(self, prompts, trainer)
        episodes.append(list(self.last))
        return out
    monkeypatch.setattr(trl_route.LoopRollouts, "__call__", call)

    real_rewards = trl.GRPOTrainer._calculate_rewards

    def calc(self, *a, **k):
        r = real_rewards(self, *a, **k)
        rewards.append(r.detach().clone())
        return r
    monkeypatch.setattr(trl.GRPOTrainer, "_calculate_rewards", calc)

    real_loss = trl.GRPOTrainer.compute_loss

    def loss(self, model, inputs, *a, **k):
        # trl runs a fused LM head (no logits tensor to hook): take the decoder's final hidden states instead, which
        # feed nothing but the head, so the row predicting token t has zero gradient iff t's log-prob is not learned.
        seen = []
        lm = self.accelerator.unwrap_model(model).get_base_model()
        norm = lm.get_decoder().norm

        def keep(mod, inp, output):
            if output.requires_grad:
                output.retain_grad()
                seen.append(output)
        handle = norm.register_forward_hook(keep)
        try:
            value = real_loss(self, model, inputs, *a, **k)
        finally:
            handle.remove()
        grads.append((inputs, seen, value))
        return value
    monkeypatch.setattr(trl.GRPOTrainer, "compute_loss", loss)

    out = tmp_path / "trl"
    res = run_trl(world, out, tiny_hf, 2, monkeypatch)
    assert res["grpo_steps"] == 2

    # trl generated once per step, 2 questions x 3 episodes, and scored them with our reward table exactly.
    assert len(episodes) == 2 and all(len(step) == 6 for step in episodes)
    assert len(rewards) == 2
    names = list(REWARDS)
    for step, r in zip(episodes, rewards):
        assert r.shape == (6, len(names))
        for i, (q, tr, parts) in enumerate(step):
            ours = total_reward(tr, q, Weights())
            assert [float(r[i, k]) for k in range(len(names))] == pytest.approx([ours[n] for n in names], abs=1e-6)
    totals = [[total_reward(tr, q)["total"] for q, tr, _ in step] for step in episodes]
    assert any(len({round(t, 6) for t in group}) > 1 for step in totals for group in (step[:3], step[3:])), \
        "the scripted policy must give groups whose rewards differ, or nothing is trained"

    # The step log is ours: reward by part equals the mean of our reward functions over the step's episodes.
    rows = [json.loads(x) for x in (out / "grpo-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["trainer"] == "trl" for r in rows)
    for row, step, tot in zip(rows, episodes, totals):
        assert row["reward"] == pytest.approx(sum(tot) / len(tot), abs=1e-4)
        for n in names:
            assert row[f"reward_{n}"] == pytest.approx(sum(p[n] for _, _, p in step) / len(step), abs=1e-4)
        assert row["accuracy"] == pytest.approx(sum(p["correct"] for _, _, p in step) / len(step), abs=1e-4)

    # Every loop-written completion token got exactly zero gradient; policy tokens of a rollout with an advantage
    # got some. The batches held loop-written tokens (an <information> block), so this could fail.
    loop_tokens = learned = 0
    for inputs, seen, _ in grads:
        assert seen, "trl's loss did not run the model with gradients"
        hidden = seen[-1]
        mask = inputs["completion_mask"] * inputs["tool_mask"]
        k = mask.shape[1]
        g = hidden.grad[:, -(k + 1):-1]  # row j predicts completion token j
        assert g.shape[:2] == mask.shape
        zero_rows = (g == 0).all(-1)
        env = (inputs["completion_mask"] == 1) & (inputs["tool_mask"] == 0)
        loop_tokens += int(env.sum())
        assert bool(zero_rows[mask == 0].all())
        for b in range(mask.shape[0]):
            if abs(float(inputs["advantages"][b])) > 1e-6:
                learned += int((~zero_rows[b][mask[b] == 1]).sum())
    assert loop_tokens > 0 and learned > 0

    # The outputs of the compact trainer: the adapter (LoRA only, moved), the curves, a trl checkpoint.
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
    assert (out / "curves.png").is_file() and trl_route.last_checkpoint(out).name == "checkpoint-2"
    meta = json.loads((out / "adapter" / "mmhops-train.json").read_text())
    assert meta["trainer"] == "trl" and meta["device"] == "cpu"


def test_trl_route_resumes_from_its_checkpoint(world, tiny_hf, tmp_path, monkeypatch):
    from mmhops_lite.train import trl_route

    out = tmp_path / "resume"
    run_trl(world, out, tiny_hf, 1, monkeypatch)
    assert trl_route.last_checkpoint(out).name == "checkpoint-1"
    first = [json.loads(x) for x in (out / "grpo-log.jsonl").read_text().splitlines()]
    res = run_trl(world, out, tiny_hf, 2, monkeypatch)  # started again with more steps: goes on from step 1
    rows = [json.loads(x) for x in (out / "grpo-log.jsonl").read_text().splitlines()]
    assert res["grpo_steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    assert rows[0] == first[0]


def test_trl_settings_follow_ours_and_refuse_what_trl_lacks(tmp_path):
    from mmhops_lite.errors import InputError
    from mmhops_lite.train.trl_route import trl_args

    a = trl_args(GRPOConfig(steps=7, questions_per_step=4, group_size=5, lr=3e-5, loss="grpo", kl=0.02, seed=3,
                            update_dtype="fp32"), tmp_path, "cpu")
    assert (a.max_steps, a.per_device_train_batch_size, a.gradient_accumulation_steps, a.num_generations) == (7, 1, 20, 5)
    assert a.generation_batch_size == 20  # a step's episodes are played at once, then trained one by one
    m = trl_args(GRPOConfig(questions_per_step=4, group_size=4, micro_batch=4), tmp_path, "cpu", world=2)
    assert (m.per_device_train_batch_size, m.gradient_accumulation_steps) == (4, 2)
    with pytest.raises(InputError, match="micro-batch 3"):
        trl_args(GRPOConfig(micro_batch=3), tmp_path, "cpu")
    assert (a.loss_type, a.scale_rewards, a.beta, a.learning_rate, a.seed) == ("grpo", "group", 0.02, 3e-5, 3)
    assert a.lr_scheduler_type == "constant" and not a.bf16 and a.use_cpu
    d = trl_args(GRPOConfig(update_dtype="fp32"), tmp_path, "cpu")
    assert (d.loss_type, d.scale_rewards) == ("dr_grpo", "none")
    with pytest.raises(InputError, match="reinforce"):
        trl_args(GRPOConfig(loss="reinforce"), tmp_path, "cpu")
    with pytest.raises(InputError, match="3 processes"):
        trl_args(GRPOConfig(questions_per_step=2), tmp_path, "cpu", world=3)


def test_cuda_is_refused_plainly_where_there_is_none():
    import torch

    from mmhops_lite.errors import InputError
    from mmhops_lite.train.settings import resolve_device

    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
        return
    assert resolve_device("auto") == "cpu"
    with pytest.raises(InputError, match="no CUDA device"):
        resolve_device("cuda")


def test_vllm_generator_speaks_our_protocol_over_llm_generate(monkeypatch):
    """The vLLM adapter against the shape of vLLM's LLM.generate (vLLM itself needs a GPU: not installed here)."""
    import sys
    import types
    from types import SimpleNamespace as NS

    from mmhops_lite.train.trl_route import VLLMGenerator

    calls = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))

    class LLM:
        def generate(self, prompts, sampling_params, use_tqdm=False):
            calls.append((prompts, [p.kw for p in sampling_params]))
            return [NS(prompt_token_ids=p["prompt_token_ids"],
                       outputs=[NS(text="<text_search>x", token_ids=[1, 2, 3], finish_reason="stop",
                                   stop_reason="</text_search>")]) for p in prompts]

    class Tok:
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    gen = VLLMGenerator(LLM(), Tok(), 4096)
    out = gen.generate_many(["ab", "cde"], ["</text_search>"], 32, 1.0, [5, 6])
    assert [o.text for o in out] == ["<text_search>x"] * 2 and [o.prompt_tokens for o in out] == [2, 3]
    assert calls[0][0] == [{"prompt_token_ids": [97, 98]}, {"prompt_token_ids": [99, 100, 101]}]
    assert [kw["seed"] for kw in calls[0][1]] == [5, 6] and calls[0][1][0]["stop"] == ["</text_search>"]
    assert out[0].finish == "stop" and gen.render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>")


@pytest.mark.slow
def test_trl_route_on_two_processes_equals_one(world, tiny_hf, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo, CPU) with --trainer trl: each process plays its
    share of a step's groups, trl averages the gradients, and the run matches the one-process run (same episodes,
    same rewards, same weights up to float summation order)."""
    from launch import one_and_two_processes
    from safetensors.torch import load_file

    one, two = one_and_two_processes("trl_dist_worker.py", [world, tiny_hf], tmp_path, 29519)

    def rows(run):
        return [json.loads(x) for x in (run / "grpo-log.jsonl").read_text().splitlines()]

    a, b = rows(one), rows(two)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2]
    for key in ("reward", "reward_outcome", "reward_format", "reward_action", "accuracy", "searches"):
        assert [x[key] for x in a] == pytest.approx([x[key] for x in b], abs=1e-4), key
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], abs=1e-4)
    wa = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert set(wa) == set(wb) and any(float(v.abs().sum()) > 0 for k, v in wb.items() if "lora_B" in k)
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) < 1e-4, k


def test_trl_route_plays_episodes_with_the_live_torch_engine(world, tiny_hf, tmp_path):
    """No stand-in: the rollout engine is the model trl is training (torch, batched decoding), refreshed per step."""
    from mmhops_lite.train.driver import train

    g = GRPOConfig(steps=1, questions_per_step=1, group_size=2, engine="torch", trainer="trl", device="cpu",
                   update_dtype="fp32", temperature=1.0)
    cfg = Config.resolve({"encoders.ocr": False, "model.threads": 1, "loop.max_new_tokens": 8, "loop.max_turns": 2},
                         env={})
    with MultimodalIndex(world / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        res = train(world / "q" / "train.jsonl", idx, cfg, tmp_path / "live", model=str(tiny_hf),
                    lora=LoraSpec(r=4, alpha=8), sft=None, grpo=g, gguf_adapter=False)
    rows = [json.loads(x) for x in (tmp_path / "live" / "grpo-log.jsonl").read_text().splitlines()]
    assert res["grpo_steps"] == 1 and len(rows) == 1 and rows[0]["engine"] == "torch"
    assert rows[0]["completion_tokens"] > 0 and rows[0]["episode_tokens"] > 0  # the random model wrote something
    assert (tmp_path / "live" / "adapter" / "adapter_model.safetensors").is_file()
