"""One process of a `train --trainer trl` run on the tiny world, the episodes played by the seeded policy (started
by `accelerate launch` or directly by tests/test_trl_route.py::test_trl_route_on_two_processes_equals_one)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import HashTextEncoder, SeededPolicy, TinyImageEncoder

from mmhops_lite.config import Config
from mmhops_lite.data.questions import load_questions
from mmhops_lite.index import MultimodalIndex
from mmhops_lite.train import grpo_run
from mmhops_lite.train.driver import train
from mmhops_lite.train.settings import GRPOConfig, LoraSpec

CFG = {"encoders.ocr": False, "model.threads": 1, "loop.max_new_tokens": 24, "loop.max_turns": 3}


def main(world: Path, model: Path, out: Path) -> None:
    policy = SeededPolicy(load_questions(world / "q" / "train.jsonl"))

    def refresh(self, step):
        self.gen, self.version = policy, step
    grpo_run.Engine.refresh = refresh
    g = GRPOConfig(steps=2, questions_per_step=2, group_size=3, lr=5e-3, engine="torch", trainer="trl",
                   checkpoint_every=1, rollouts="sequential", device="cpu", update_dtype="fp32")
    with MultimodalIndex(world / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        train(world / "q" / "train.jsonl", idx, Config.resolve(CFG, env={}), out, model=str(model),
              lora=LoraSpec(r=4, alpha=8), sft=None, grpo=g, gguf_adapter=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
