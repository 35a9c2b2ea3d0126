"""The Generator protocol every policy backend implements, and the name registry with lazy imports."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import ConfigError


@dataclass(frozen=True)
class Generation:
    """One completion: its text and what it cost."""

    text: str
    prompt_tokens: int
    evaluated_tokens: int  # prompt tokens actually run (the rest came from the KV cache)
    completion_tokens: int
    seconds: float
    finish: str = "stop"  # stop | length | eos
    # Set when the generator records its sampling (training): the drawn token ids it evaluated, and the sampler's
    # log-probability of each at the sampling temperature.
    tokens: tuple = ()
    logprobs: tuple = ()


class Generator(Protocol):
    """A policy runtime: renders chat prompts and continues them until a stop sequence."""

    id: str
    n_ctx: int

    def render(self, messages: Sequence[dict]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompt: str, stop: Sequence[str], max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None) -> Generation: ...

    # Optional: generators that decode several sequences at once also offer
    # generate_many(prompts, stop, max_tokens, temperature, seeds, slots) -> list[Generation], where `slots` names
    # the KV-cache sequence each prompt continues (the loop gives each concurrent episode its own slot).


BACKENDS = {
    "llamacpp": ("mmhops_lite.backends.llamacpp", "LlamaCppGenerator"),
    "torch": ("mmhops_lite.backends.torch_backend", "TorchGenerator"),
    "onnx": ("mmhops_lite.backends.onnx_backend", "OnnxGenerator"),
}


def get_generator(backend: str, model: str, **kwargs) -> Generator:
    """Build a generator by backend name ('llamacpp', 'torch') for a registry name or local path."""
    import importlib

    from ..registry import resolve

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}'", fix=f"use one of: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend]
    path = resolve(model, "policy")
    adapter = kwargs.pop("adapter", None)
    if adapter:
        key = "lora_path" if backend == "llamacpp" else "adapter"
        kwargs[key] = adapter_for(backend, adapter)
    return getattr(importlib.import_module(module), cls)(path, **kwargs)


def adapter_for(backend: str, adapter) -> Path:
    """The adapter file a backend loads: a GGUF adapter for llama.cpp, a PEFT folder for torch.

    Accepts a `train` output folder (adapter/ + adapter.gguf), a PEFT folder, or a .gguf adapter.
    """
    from ..errors import ModelNotFound

    p = Path(adapter).expanduser()
    if backend == "llamacpp":
        for cand in (p, p / "adapter.gguf", p.parent / "adapter.gguf"):
            if cand.is_file() and cand.suffix == ".gguf":
                return cand
        raise ModelNotFound(f"no GGUF adapter at {p}", path=p, fix="pass the .gguf written by `mmhops-lite train`, "
                            "or use --backend torch for a PEFT folder")
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise ModelNotFound(f"no PEFT adapter folder at {p}", path=p,
                        fix="pass the adapter/ folder written by `mmhops-lite train`, or use --backend llamacpp "
                            "for a .gguf adapter")


def check_prompt(ids: Sequence[int], n_ctx: int) -> None:
    """Refuse an empty prompt, or one that leaves no room to generate in the context window."""
    from ..errors import InputError

    if not ids:
        raise InputError("the prompt is empty", fix="render the chat messages first (generator.render)")
    if len(ids) + 1 >= n_ctx:
        raise InputError(f"the prompt ({len(ids)} tokens) fills the context window ({n_ctx})",
                         fix="raise model.n_ctx or lower loop.info_tokens / loop.max_turns")


def batch_slots(n: int, seeds, slots) -> tuple[list, list[int]]:
    """generate_many's seeds and KV slots (default: slot i for prompt i, no seed), checked: one distinct slot and
    one seed per prompt."""
    slots = list(range(n)) if slots is None else list(slots)
    seeds = [None] * n if seeds is None else list(seeds)
    if len(slots) != n or len(seeds) != n or len(set(slots)) != n:
        raise ValueError("generate_many needs one distinct slot and one seed per prompt")
    return seeds, slots


def sample_lockstep(logits: list, budget: list[int], stop: Sequence[str], draw, is_eos, text_of, advance):
    """The decoding loop of generate_many: every sequence still going draws a token from its logits, ends on EOS,
    a stop string (cut from its text) or its budget, and the rest advance together (`advance(rows, tokens)` runs
    their last tokens and returns their next logits, in order). Returns tokens, their log-probs, texts and finish
    reasons per sequence.

    >>> import itertools
    >>> counter = itertools.count(1)
    >>> sample_lockstep([0, 0], [5, 2], ["!"], lambda i, row: (next(counter), -0.5), lambda t: t == 9,
    ...                 lambda i, toks: "".join("!" if t == 5 else "a" for t in toks), lambda rows, toks: [0] * len(rows))
    ([[1, 3, 5], [2, 4]], [[-0.5, -0.5, -0.5], [-0.5, -0.5]], ['aa', 'aa'], ['stop', 'length'])
    """
    n = len(budget)
    out: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    text, finish = [""] * n, ["length"] * n
    live = [i for i in range(n) if budget[i] > 0]
    while live:
        going = []
        for i in live:
            tok, lp = draw(i, logits[i])
            if is_eos(tok):
                finish[i] = "eos"
                continue
            out[i].append(tok)
            lps[i].append(lp)
            text[i] = text_of(i, out[i])
            cut = [k for k in (text[i].find(s) for s in stop if s) if k >= 0]
            if cut:
                text[i], finish[i] = text[i][:min(cut)], "stop"
                continue
            if len(out[i]) < budget[i]:
                going.append(i)
        if not going:
            break
        for i, row in zip(going, advance(going, [out[i][-1] for i in going])):
            logits[i] = row
        live = going
    return out, lps, text, finish


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared prefix of two token lists.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
