"""One process of a data-parallel training run on the tiny world (started by `accelerate launch` or directly
by tests/test_train.py::test_data_parallel_training_equals_one_process)."""
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite.config import Config
from mmhops_lite.index import MultimodalIndex
from mmhops_lite.train import grpo_run as rl
from mmhops_lite.train.driver import train
from mmhops_lite.train.settings import GRPOConfig, LoraSpec, SFTConfig


def main(world: Path, model: Path, out: Path) -> None:
    # The random tiny model never answers: score rollouts by their text, as test_train's GRPO tests do.
    rl.total_reward = lambda tr, q, w: {"total": float(zlib.crc32(tr.transcript.encode()) % 5), "outcome": 0.0,
                                        "format": 0.0, "action": 0.0, "correct": 0.0}
    cfg = Config.resolve({"encoders.ocr": False, "model.threads": 1, "loop.max_new_tokens": 12, "loop.max_turns": 2},
                         env={})
    with MultimodalIndex(world / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        train(world / "q" / "train.jsonl", idx, cfg, out, model=str(model), lora=LoraSpec(r=4, alpha=8),
              sft=SFTConfig(epochs=1, lr=5e-3, batch_size=4, max_examples=8, checkpoint_every=1),
              grpo=GRPOConfig(steps=2, questions_per_step=2, group_size=3, lr=1e-2, engine="torch",
                              update_dtype="fp32", checkpoint_every=1), gguf_adapter=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
