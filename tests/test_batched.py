"""generate_many: several sequences decoded together (a GRPO group's rollouts), for llama.cpp and torch.

Each backend is checked against a plain full-sequence torch forward: every drawn token's recorded log-probability
must be the policy's, through shared-prefix copies, continued turns, retokenised (forgotten) tails and rows that
leave the batch; greedy batched text must be what one-at-a-time `generate` writes."""
import pytest
import torch

from mmhops_lite import grammar


def _reference_logprobs(model, ids, drawn):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids + list(drawn)])).logits[0].float(), -1)
    return [float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(drawn)]


def _check_rounds(gen, ref_model, tol):
    """Three batched calls: a fresh group (two prompts share a question), continued turns with a retokenised
    tail, then fewer rows. Returns the evaluated-token counts per call."""
    qs = ["Which city is the capital of Sylvania?", "Which city is the capital of Sylvania?", "Who built it?"]
    prompts = [gen.render(grammar.messages(q, [])) for q in qs]
    slots, counts = [0, 1, 2], []
    for rnd in range(3):
        outs = gen.generate_many(prompts, [], 12, 1.0, seeds=[10 * rnd + s for s in slots], slots=slots)
        counts.append([o.evaluated_tokens for o in outs])
        for p, o in zip(prompts, outs):
            assert o.completion_tokens > 0 and len(o.tokens) == len(o.logprobs) == o.completion_tokens
            want = _reference_logprobs(ref_model, gen.tokenize(p), o.tokens)
            assert max(abs(a - b) for a, b in zip(o.logprobs, want)) < tol
        # The next turn: the text as written plus a new block (its first tokens may retokenise differently).
        prompts = [p + o.text + "</answer>\n<information>[1] more</information>" for p, o in zip(prompts, outs)]
        if rnd == 1:
            prompts, slots = prompts[1:], slots[1:]
    return counts, [len(gen.tokenize(p)) for p in prompts]


def test_torch_generate_many_is_the_policy_exactly(tiny_hf):
    from mmhops_lite.backends.torch_backend import TorchGenerator

    gen = TorchGenerator(tiny_hf, n_ctx=512, threads=1)
    counts, _ = _check_rounds(gen, gen.model, 1e-4)
    # The shared prompt is read once; later turns read only their new tokens.
    assert counts[0][1] < counts[0][0] / 2 and counts[0][2] < counts[0][0] / 2
    assert all(c < 40 for c in counts[1] + counts[2])
    prompts = [gen.render(grammar.messages(q, [])) for q in ("Capital of Sylvania?", "Who built it?")]
    gen.reset()
    batched = gen.generate_many(prompts, ["</answer>"], 16, 0.0, seeds=[None, None])
    assert [o.text for o in batched] == [gen.generate(p, ["</answer>"], 16, 0.0).text for p in prompts]
    assert all(o.tokens == () for o in batched)  # greedy records nothing


def test_llamacpp_generate_many_is_the_policy(tiny_gguf):
    pytest.importorskip("llama_cpp")
    from mmhops_lite.backends.llamacpp import LlamaCppGenerator
    from mmhops_lite.backends.torch_backend import TorchGenerator

    gen, ref = LlamaCppGenerator(tiny_gguf, n_ctx=512, threads=1), TorchGenerator(tiny_gguf, n_ctx=512, threads=1)
    gen.record_logprobs = True
    counts, _ = _check_rounds(gen, ref.model, 0.05)
    assert counts[0][1] < counts[0][0] / 2 and counts[0][2] < counts[0][0] / 2  # copied, not recomputed
    assert all(c < 40 for c in counts[1] + counts[2])
    prompts = [gen.render(grammar.messages(q, [])) for q in ("Capital of Sylvania?", "Who built it?")]
    batched = gen.generate_many(prompts, ["</answer>"], 16, 0.0, seeds=[None, None], slots=[3, 0])
    assert [o.text for o in batched] == [gen.generate(p, ["</answer>"], 16, 0.0).text for p in prompts]
    with pytest.raises(ValueError):
        gen.generate_many(prompts, [], 4, 0.0, seeds=[None], slots=[0, 0])
