"""Training settings: LoRA, SFT and GRPO, each a frozen dataclass whose fields carry their command-line flag, help
and allowed values. This is the one place their defaults live: `mmhops-lite train` builds its options from these
fields (through `api.train_options`), and the library takes the same dataclasses."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from ..errors import InputError, require


def _o(default, help: str, flag: str | None = None, choices: tuple = ()):
    """A field with its flag (None: library-only), help and allowed values."""
    return field(default=default, metadata={"flag": flag, "help": help, "choices": choices})


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (defaults suit 135M-0.5B policies on a CPU)."""

    r: int = _o(16, "LoRA rank.", "--rank")
    alpha: int = _o(32, "LoRA alpha.", "--alpha")
    dropout: float = _o(0.0, "LoRA dropout.")
    targets: str = _o("all-linear", "LoRA target modules: all-linear or a comma list, e.g. q_proj,v_proj.", "--targets")

    def peft_config(self):
        peft = require("peft", "train")
        targets = self.targets if self.targets == "all-linear" else [t.strip() for t in self.targets.split(",")]
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                               task_type="CAUSAL_LM", bias="none")


DTYPES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "Where SFT and GRPO updates run: auto (CUDA when torch sees a GPU, else the CPU), cpu or cuda."
DTYPE_HELP = "SFT and GRPO update precision: auto (bf16 autocast where the CPU has AMX bf16 tiles), bf16 or fp32."


@dataclass(frozen=True)
class SFTConfig:
    """SFT (warm start on gold trajectories) settings."""

    epochs: int = _o(1, "Passes over the gold trajectories.", "--sft-epochs")
    lr: float = _o(2e-4, "SFT learning rate.", "--lr")
    batch_size: int = _o(4, "Episodes per optimiser step (gradient accumulation, one sequence at a time).")
    max_examples: int = _o(240, "Gold trajectories for the warm start.", "--sft-examples")
    discover_share: float = _o(0.25, "Share of templated questions taught by an answer-guided discovered path "
                                     "instead of their template's plan.", "--discover-share")
    rejection_samples: int = _o(4, "Rollouts of the starting policy for each question no trajectory was found "
                                   "for; correct ones become SFT data (0 = off).", "--rejection-samples")
    rejection_questions: int = _o(48, "At most this many such questions are sampled.")
    checkpoint_every: int = _o(10, "SFT steps between checkpoints.")
    seed: int = _o(0, "Seed for data order (and the LoRA's random start).", "--seed")
    update_dtype: str = _o("auto", DTYPE_HELP, "--update-dtype", DTYPES)
    device: str = _o("auto", DEVICE_HELP, "--device", DEVICES)


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO settings (defaults: the small-model CPU recipe the shipped adapter was trained with)."""

    steps: int = _o(40, "GRPO steps (0 = SFT only).", "--steps")
    questions_per_step: int = _o(2, "Questions per GRPO step.", "--questions-per-step")
    group_size: int = _o(4, "Rollouts per question (the GRPO group).", "--group-size")
    lr: float = _o(5e-5, "GRPO learning rate.", "--grpo-lr")
    loss: str = _o("dr_grpo", "grpo (std-normalised, per-sequence mean), dr_grpo (no std, token sum / constant) "
                              "or reinforce.", "--loss", ("grpo", "dr_grpo", "reinforce"))
    kl: float = _o(0.0, "KL coefficient (k3) to the base policy (0 = off: no extra forward pass).", "--kl")
    clip: float = _o(0.2, "PPO clipping of the token log-ratio.")
    temperature: float = _o(1.0, "Rollout sampling temperature.", "--temperature")
    engine: str = _o("llamacpp", "Rollout engine: llamacpp (the current policy as a GGUF, refreshed each step), "
                                 "torch (the live model) or vllm (--trainer trl on a GPU with vLLM installed: trl's "
                                 "colocated vLLM, weights synced each step).", "--engine", ("llamacpp", "torch", "vllm"))
    trainer: str = _o("compact", "GRPO trainer: compact (ours: the CPU recipe, shared prompts run once) or trl "
                                 "(trl's GRPOTrainer on accelerate: GPUs, DeepSpeed/FSDP, several machines; our loop "
                                 "plays the episodes, our rewards score them).", "--trainer", ("compact", "trl"))
    refresh_every: int = _o(1, "Steps between refreshes of the llama.cpp engine's weights.")
    rollout_weights: str = _o("merged", "llamacpp engine: merged (LoRA folded into a Q8_0 copy of the base, "
                                        "fastest) or adapter (GGUF LoRA over the base).", "--rollout-weights",
                              ("merged", "adapter"))
    rollouts: str = _o("batched", "batched (a step's rollouts decoded side by side, shared prompts read once) or "
                                  "sequential (one rollout after another).", "--rollouts", ("batched", "sequential"))
    importance_cap: float = _o(2.0, "Truncated importance weights for the llama.cpp sampler (0 = off).")
    update_dtype: str = _o("auto", DTYPE_HELP, "--update-dtype", DTYPES)
    device: str = _o("auto", DEVICE_HELP, "--device", DEVICES)
    checkpoint_every: int = _o(5, "GRPO steps between checkpoints.")
    seed: int = _o(0, "Seed for data order (and the LoRA's random start).", "--seed")
    micro_batch: int = _o(1, "--trainer trl: episodes per forward/backward pass. 1 on a CPU (a padded batch of long "
                             "episodes costs memory and time: a demo run with 4 per pass was killed at 24 GB); raise "
                             "it on GPUs.", "--micro-batch")

    def __post_init__(self):
        if self.engine == "vllm" and self.trainer != "trl":
            raise InputError("--engine vllm generates through trl's colocated vLLM",
                             fix="add --trainer trl, or use --engine llamacpp or torch")


SECTIONS = {"lora": LoraSpec, "sft": SFTConfig, "grpo": GRPOConfig}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class TrainOption:
    """One `train` flag: its name (the keyword `api.train_policy` takes), type, default, help, allowed values, and
    the (section, field) pairs it sets."""

    name: str
    flag: str
    type: type
    default: object
    help: str
    choices: tuple
    targets: tuple


def train_options() -> list[TrainOption]:
    """Every flagged field of the three settings classes; a flag shared by two sections (--seed, --update-dtype)
    is one option setting both, and must have one default."""
    out: dict[str, TrainOption] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            flag = f.metadata.get("flag")
            if not flag:
                continue
            name = flag.lstrip("-").replace("-", "_")
            if name in out:
                prev = out[name]
                if prev.default != f.default:
                    raise AssertionError(f"{flag}: {prev.targets[0]} and {section}.{f.name} disagree on the default")
                out[name] = TrainOption(name, flag, prev.type, prev.default, prev.help, prev.choices,
                                        prev.targets + ((section, f.name),))
            else:
                assert f.default is not MISSING
                out[name] = TrainOption(name, flag, _TYPES[str(f.type)], f.default, f.metadata["help"],
                                        f.metadata["choices"], ((section, f.name),))
    return list(out.values())


def check_choices(settings) -> None:
    """Refuse a settings object whose fields hold a value outside their allowed choices, naming the flag."""
    for f in fields(settings):
        value, choices = getattr(settings, f.name), f.metadata.get("choices")
        if choices and value not in choices:
            raise InputError(f"{f.metadata.get('flag') or f.name} {value!r} is not an option",
                             fix=f"use one of: {', '.join(choices)}")


def settings_from(options: dict) -> dict:
    """{section: dataclass} from option values by name (missing options keep their defaults); unknown names and
    values outside an option's choices are refused.

    >>> s = settings_from({"grpo_lr": 1e-5, "seed": 3})
    >>> s["grpo"].lr, s["grpo"].seed, s["sft"].seed, s["lora"].r
    (1e-05, 3, 3, 16)
    """
    table = {o.name: o for o in train_options()}
    values: dict = {section: {} for section in SECTIONS}
    for name, value in options.items():
        if name not in table:
            raise InputError(f"unknown training option {name!r}", fix=f"known: {', '.join(sorted(table))}")
        for section, fname in table[name].targets:
            values[section][fname] = value
    built = {section: cls(**values[section]) for section, cls in SECTIONS.items()}
    for settings in built.values():
        check_choices(settings)
    return built


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' for a --device value; cuda asked for where torch sees no GPU is refused, saying so.

    >>> resolve_device("cpu")
    'cpu'
    """
    if device not in DEVICES:
        raise InputError(f"--device {device!r} is not an option", fix=f"use one of: {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    torch = require("torch", "train")
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise InputError("--device cuda: torch sees no CUDA device on this machine (this torch is "
                         f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                         fix="install a CUDA build of torch on a machine with an NVIDIA GPU, or use --device cpu")
    return "cpu"
