"""SFT with LoRA on a tiny model built from a config: masks, LoRA-only updates, exact resume, GGUF adapter."""
import json

import pytest
from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite.config import Config
from mmhops_lite.data.synth import synthesize
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync
from mmhops_lite.train.driver import train
from mmhops_lite.train.episodes import tokenize_episode
from mmhops_lite.train.policy import load_for_training
from mmhops_lite.train.settings import LoraSpec, SFTConfig
from mmhops_lite.train.sft import masked_loss


@pytest.fixture(scope="module")
def world(tiny_kb_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    sync(root / "idx", KnowledgeBase(tiny_kb_module), HashTextEncoder(), TinyImageEncoder(), progress=False)
    synthesize(tiny_kb_module, root / "q", dev_fraction=0.0, seed=0, max_dev_per_template=None)
    return root


@pytest.fixture(scope="module")
def tiny_kb_module(tmp_path_factory):
    import conftest

    return conftest.tiny_kb.__wrapped__(tmp_path_factory.mktemp("kb")) if hasattr(conftest.tiny_kb, "__wrapped__") \
        else _make_kb(tmp_path_factory.mktemp("kb"))


def _make_kb(tmp):
    import inspect

    import conftest

    return inspect.unwrap(conftest.tiny_kb)(tmp)


CFG = Config.resolve({"encoders.ocr": False, "model.threads": 1}, env={})


def run(world, out, tiny_hf, epochs):
    with MultimodalIndex(world / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        return train(world / "q" / "train.jsonl", idx, CFG, out, model=str(tiny_hf), lora=LoraSpec(r=4, alpha=8),
                     sft=SFTConfig(epochs=epochs, lr=5e-3, batch_size=2, max_examples=4, checkpoint_every=1),
                     grpo=None, gguf_adapter=False)


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "sft-log.jsonl").read_text().splitlines()]


def test_information_positions_get_zero_gradient(tiny_hf):
    net, tok, _, _ = load_for_training(str(tiny_hf), LoraSpec(r=4, alpha=8), threads=1)
    ep = tokenize_episode(tok, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
                          [("<text_search>x</text_search>", True),
                           ("\n<information>\n[1] X: <answer>y</answer>\n</information>\n", False),
                           ("<answer>y</answer>", True)])
    import torch

    # Reference: cross-entropy over full-length logits with every non-policy label set to -100.
    captured = {}

    def keep(mod, inp, out):
        out.retain_grad()
        captured["logits"] = out

    handle = net.get_output_embeddings().register_forward_hook(keep)
    labels = torch.tensor([[t if m else -100 for t, m in zip(ep.input_ids, ep.loss_mask)]])
    ref = net(input_ids=torch.tensor([ep.input_ids]), labels=labels).loss
    ref.backward()
    handle.remove()
    g = captured["logits"].grad[0]
    for t in range(1, len(ep.input_ids)):  # logits at t-1 predict token t
        row_zero = bool((g[t - 1] == 0).all())
        assert row_zero == (ep.loss_mask[t] == 0), t
    params = [p for p in net.parameters() if p.requires_grad]
    ref_grads = [p.grad.clone() for p in params]
    net.zero_grad()

    # The SFT loss feeds the LM head only the rows that predict a policy token, and is that same loss.
    rows = []
    handle = net.get_output_embeddings().register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    loss = masked_loss(net, ep)
    loss.backward()
    handle.remove()
    assert rows == [sum(ep.loss_mask[1:])]
    assert abs(loss.item() - ref.item()) < 1e-5
    for p, r in zip(params, ref_grads):
        assert torch.allclose(p.grad, r, atol=1e-6, rtol=1e-4)
    # Only LoRA weights can learn.
    assert all("lora_" in n for n, p in net.named_parameters() if p.requires_grad)


def test_sft_changes_only_lora_and_resumes_exactly(world, tiny_hf, tmp_path):
    from safetensors.torch import load_file

    full = tmp_path / "full"
    res = run(world, full, tiny_hf, epochs=2)
    assert res["sft_steps"] == 4 and (full / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((full / "adapter" / "mmhops-train.json").read_text())["lora"]["r"] == 4
    weights = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at 0: it moved
    # A run killed after its 2nd step and started again goes on exactly as the uninterrupted run.
    part = tmp_path / "part"
    run(world, part, tiny_hf, epochs=1)
    assert len(losses(part)) == 2
    run(world, part, tiny_hf, epochs=2)
    assert losses(part) == pytest.approx(losses(full), abs=1e-4)


def grpo_run(world, out, tiny_hf, steps, monkeypatch):
    # A random tiny model never answers, so every real reward is 0 and no group would train: score rollouts by
    # what they wrote instead (a stable function of the sampled text), to exercise the update path; the real
    # rewards are tested on their own.
    import zlib

    from mmhops_lite.train import grpo_run as rl
    from mmhops_lite.train.settings import GRPOConfig

    monkeypatch.setattr(rl, "total_reward", lambda tr, q, w: {
        "total": float(zlib.crc32(tr.transcript.encode()) % 5), "outcome": 0.0, "format": 0.0, "action": 0.0,
        "correct": 0.0})
    cfg = Config.resolve({"encoders.ocr": False, "model.threads": 1, "loop.max_new_tokens": 12, "loop.max_turns": 2},
                         env={})
    with MultimodalIndex(world / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        return train(world / "q" / "train.jsonl", idx, cfg, out, model=str(tiny_hf), lora=LoraSpec(r=4, alpha=8),
                     sft=None, grpo=GRPOConfig(steps=steps, questions_per_step=1, group_size=3, lr=1e-2,
                                               engine="torch", checkpoint_every=1), gguf_adapter=False)


def test_grpo_steps_train_lora_and_resume_exactly(world, tiny_hf, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    full = tmp_path / "g-full"
    res = grpo_run(world, full, tiny_hf, 3, monkeypatch)
    rows = [json.loads(x) for x in (full / "grpo-log.jsonl").read_text().splitlines()]
    assert res["grpo_steps"] == 3 and len(rows) == 3
    assert {"reward", "reward_outcome", "accuracy", "searches", "entropy", "completion_tokens",
            "zero_variance_groups"} <= set(rows[0])
    assert sum(r["trained_rollouts"] for r in rows) > 0 and (full / "curves.png").is_file()
    weights = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)
    part = tmp_path / "g-part"
    grpo_run(world, part, tiny_hf, 2, monkeypatch)
    grpo_run(world, part, tiny_hf, 3, monkeypatch)  # the killed run, started again, takes the same third step
    rows_part = [json.loads(x) for x in (part / "grpo-log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows_part] == pytest.approx([r["loss"] for r in rows], abs=1e-5)
    assert [r["reward"] for r in rows_part] == [r["reward"] for r in rows]


def test_adapter_converts_to_gguf_and_llamacpp_loads_it(world, tiny_hf, tiny_gguf, tmp_path):
    from mmhops_lite import grammar
    from mmhops_lite.backends.base import get_generator
    from mmhops_lite.convert import adapter_to_gguf

    out = tmp_path / "a"
    run(world, out, tiny_hf, epochs=1)
    gguf = adapter_to_gguf(out / "adapter", tiny_hf, out / "adapter.gguf")
    assert gguf.read_bytes()[:4] == b"GGUF"
    prompt = grammar.render_chatml(grammar.messages("Which city?", []))
    # The train run folder itself is accepted as --adapter: the backend picks the GGUF file.
    with_lora = get_generator("llamacpp", str(tiny_gguf), n_ctx=512, threads=1, adapter=str(out))
    plain = get_generator("llamacpp", str(tiny_gguf), n_ctx=512, threads=1)
    assert with_lora.id.endswith("+adapter.gguf")
    import numpy as np

    last = []
    for g in (with_lora, plain):
        toks = g.tokenize(prompt)
        g.llm.reset()
        g.llm.eval(toks)
        last.append(np.ctypeslib.as_array(g.llm._ctx.get_logits(), shape=(g.llm.n_vocab(),)).copy())

    assert np.isfinite(last[0]).all() and not np.allclose(last[0], last[1])


def test_llamacpp_sampler_logprobs_match_torch(tiny_gguf):
    """The rollout engine's recorded log-probs are the torch policy's, token for token (importance weights ~1), and
    reach the trainer per policy turn as it tokenizes the turn's text."""
    import torch

    from mmhops_lite import grammar
    from mmhops_lite.backends.llamacpp import LlamaCppGenerator
    from mmhops_lite.backends.torch_backend import TorchGenerator
    from mmhops_lite.loop import Episode
    from mmhops_lite.train.grpo_run import sampler_turns

    gen, ref = LlamaCppGenerator(tiny_gguf, n_ctx=512, threads=1), TorchGenerator(tiny_gguf, n_ctx=512, threads=1)
    gen.record_logprobs = True
    prompt = gen.render(grammar.messages("Which city is the capital?", []))
    out = gen.generate(prompt, [], max_tokens=10, temperature=1.0, seed=5)
    assert out.completion_tokens > 0 and 0 < len(out.tokens) <= out.completion_tokens
    assert len(out.logprobs) == len(out.tokens)
    ids = ref.tokenize(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(ref.model(input_ids=torch.tensor([ids + list(out.tokens)])).logits[0].float(), -1)
    want = [float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(out.tokens)]
    assert max(abs(a - b) for a, b in zip(out.logprobs, want)) < 0.05
    ep = Episode(prompt, [(out.text, True), ("<information>x</information>", False)], draws=[(out.tokens, out.logprobs)])
    turn = sampler_turns(ref.tokenizer, ep)[0]
    assert 0 < len(turn) and turn == list(out.logprobs[:len(turn)])
    # Greedy calls record nothing (no sampler to correct for).
    assert gen.generate(prompt, [], max_tokens=3, temperature=0.0).tokens == ()


def test_importance_weights_scale_each_policy_token(tiny_hf):
    from mmhops_lite.train.grpo_loss import episode_loss, token_logprobs
    from mmhops_lite.train.settings import GRPOConfig

    net, tok, _, _ = load_for_training(str(tiny_hf), LoraSpec(r=4, alpha=8), threads=1, seed=0)
    ep = tokenize_episode(tok, "<|im_start|>user\nQ<|im_end|>\n",
                          [("<think>a</think><text_search>x</text_search>", True), ("<information>y</information>", False),
                           ("<answer>z</answer>", True)])
    cfg = GRPOConfig(loss="grpo", importance_cap=2.0, update_dtype="fp32")
    base, st0 = episode_loss(net, ep, 1.0, cfg)
    logp, _ = token_logprobs(net, ep)
    same = [None] + [float(v) for v in logp.detach()]
    lower = [None] + [float(v) - 5.0 for v in logp.detach()]  # the sampler found these tokens far less likely
    eq, st1 = episode_loss(net, ep, 1.0, cfg, same)
    capped, st2 = episode_loss(net, ep, 1.0, cfg, lower)
    base, eq, capped = float(base.detach()), float(eq.detach()), float(capped.detach())
    assert eq == pytest.approx(base, rel=1e-5) and st1["importance"] == pytest.approx(1.0, abs=1e-5)
    assert capped == pytest.approx(2.0 * base, rel=1e-4)
    assert st2["importance"] == pytest.approx(2.0) and st2["importance_capped"] == pytest.approx(1.0)
    assert st0["importance"] == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_in_process_gguf_lora_equals_the_converter(family, tmp_path):
    """The rollout engine's millisecond adapter writer gives llama.cpp's converter's tensors, bit for bit
    (with random B matrices, so Llama's q/k row permutation is exercised)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from tiny_models import make_tiny_hf, save_gguf_tokenizer

    from mmhops_lite.convert import adapter_to_gguf, lora_to_gguf
    from mmhops_lite.registry import resolve
    from mmhops_lite.train.policy import load_for_training, save_adapter

    tok = save_gguf_tokenizer(tmp_path / "tok", resolve("smollm2-135m-instruct"))
    base = make_tiny_hf(tmp_path / family, tok, family, seed=5)
    net, _, folder, _ = load_for_training(str(base), LoraSpec(r=4, alpha=8), threads=1)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ref = adapter_to_gguf(save_adapter(net, tmp_path / "peft", {}), folder, tmp_path / "ref.gguf")
    got = lora_to_gguf(net, folder, tmp_path / "got.gguf")
    want = {t.name: np.array(t.data) for t in GGUFReader(str(ref)).tensors}
    mine = {t.name: np.array(t.data) for t in GGUFReader(str(got)).tensors}
    assert set(mine) == set(want) and len(want) == 2 * 7 * 2
    for name in want:
        assert mine[name].shape == want[name].shape and np.array_equal(mine[name], want[name]), name
    fields = GGUFReader(str(got)).fields
    assert fields["adapter.lora.alpha"].contents() == 8.0 and fields["general.type"].contents() == "adapter"


def test_fast_update_equals_the_full_logits_reference(tiny_hf):
    """The update's fast path (LM head on policy rows only, a group's shared prompt forwarded once) gives the
    reference losses and LoRA gradients of per-rollout full-logit forwards; bf16 autocast stays close."""
    import torch

    from mmhops_lite.train.grpo_loss import (
        group_backward,
        policy_logprobs,
        policy_targets,
        shared_start,
        token_logprobs,
    )
    from mmhops_lite.train.settings import GRPOConfig

    net, tok, _, _ = load_for_training(str(tiny_hf), LoraSpec(r=4, alpha=8), threads=1, seed=0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompt = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhich river?<|im_end|>\n<|im_start|>assistant\n"
    eps = [tokenize_episode(tok, prompt, [(f"<think>{w}</think><text_search>{w}</text_search>", True),
                                          (f"\n<information>\n[1] {w} flows.\n</information>\n", False),
                                          (f"<answer>{w}</answer>", True)]) for w in ("Rhine", "Nile", "Po")]
    advs = [1.0, -0.5, -0.5]
    params = [p for p in net.parameters() if p.requires_grad]
    cfg = GRPOConfig(loss="grpo", update_dtype="fp32")

    def grads(loss):
        net.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    ref_losses = []
    for ep, a in zip(eps, advs):  # reference: every position's logits, masked afterwards
        logp, _ = token_logprobs(net, ep)
        m = torch.tensor(ep.loss_mask[1:], dtype=torch.float32)
        ref_losses.append(-(torch.exp(logp - logp.detach()) * a * m).sum() / m.sum())
        fast_logp, _ = policy_logprobs(net, ep)
        assert torch.allclose(fast_logp, logp[[t - 1 for t in policy_targets(ep)]], atol=1e-5)
    want = grads(sum(ref_losses) * 0.5)
    assert shared_start(eps) > 10  # the prompt really is shared

    def fast_grads(c):
        net.zero_grad(set_to_none=True)
        res = group_backward(net, [(ep, a, None) for ep, a in zip(eps, advs)], c, scale=0.5)
        return res, torch.cat([p.grad.flatten() for p in params])

    fast, got = fast_grads(cfg)
    for (loss, st), ref, ep in zip(fast, ref_losses, eps):
        assert float(loss) == pytest.approx(float(ref.detach()), abs=1e-5) and st["tokens"] == sum(ep.loss_mask)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4) and want.abs().max() > 0
    _, g16 = fast_grads(GRPOConfig(loss="grpo", update_dtype="bf16"))
    assert float(torch.nn.functional.cosine_similarity(g16, want, dim=0)) > 0.98


def test_merged_rollout_gguf_is_the_torch_policy_and_refreshes_in_place(tiny_gguf, tmp_path):
    """The merged rollout GGUF (base + LoRA folded into Q8_0) gives the peft model's logits, keeps the base's
    tokenizer and template, and a later write (LoRA switched off) brings back the base's logits."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    from mmhops_lite import grammar
    from mmhops_lite.backends.llamacpp import LlamaCppGenerator
    from mmhops_lite.train.merged_gguf import MergedGGUF

    net, tok, folder, base_gguf = load_for_training(str(tiny_gguf), LoraSpec(r=4, alpha=8), threads=1)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    merged = MergedGGUF(base_gguf, folder, tmp_path / "policy.gguf")
    path = merged.write(net)
    prompt = grammar.render_chatml(grammar.messages("Which river flows through the city in image 1?", []))

    def llama_logits(p):
        g = LlamaCppGenerator(p, n_ctx=512, threads=1)
        toks = g.tokenize(prompt)
        g.llm.eval(toks)
        out = np.ctypeslib.as_array(g.llm._ctx.get_logits(), shape=(g.llm.n_vocab(),)).copy()
        return toks, out

    toks, got = llama_logits(path)
    with torch.no_grad():
        want = net(input_ids=torch.tensor([toks])).logits[0, -1].float().numpy()
        with net.disable_adapter():
            plain = net(input_ids=torch.tensor([toks])).logits[0, -1].float().numpy()
    assert np.abs(want - plain).max() > 0.5  # the LoRA really moves the logits
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max() and got.argmax() == want.argmax()
    base_fields, our_fields = GGUFReader(str(base_gguf)).fields, GGUFReader(str(path)).fields
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id"):
        assert our_fields[key].contents() == base_fields[key].contents()
    size = path.stat().st_size
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.zero_()
    merged.write(net)  # in place: same layout, new matrices
    _, again = llama_logits(path)
    assert path.stat().st_size == size
    assert np.abs(again - plain).max() < 0.1 * np.abs(plain).max() and np.abs(again - got).max() > 0.5


@pytest.mark.slow
def test_data_parallel_training_equals_one_process(world, tiny_hf, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun, gloo, CPU): SFT and GRPO split each step's examples and questions
    across the processes and sum their LoRA gradients, so the run equals the one-process run."""
    from launch import one_and_two_processes
    from safetensors.torch import load_file

    one, two = one_and_two_processes("dist_worker.py", [world, tiny_hf], tmp_path, 29517)

    def rows(run, name):
        return [json.loads(x) for x in (run / name).read_text().splitlines()]

    for name in ("sft-log.jsonl", "grpo-log.jsonl"):
        a, b = rows(one, name), rows(two, name)
        assert len(a) == len(b) > 0
        assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], abs=1e-5)
    ga, gb = rows(one, "grpo-log.jsonl"), rows(two, "grpo-log.jsonl")
    assert [x["reward"] for x in ga] == [x["reward"] for x in gb] and all(x["processes"] == 2 for x in gb)
    assert sum(x["trained_rollouts"] for x in gb) > 0
    wa = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) < 1e-4, k
