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
