"""Data parallelism for `train` across processes (`accelerate launch`, `torchrun`): each process rolls out (or,
for SFT, reads) its share of a step's questions, LoRA gradients are summed across processes before one identical
optimizer step everywhere, and only the first process writes logs, checkpoints and the adapter.

With one process (the default, and every test but one) every call below is a no-op. Only the LoRA gradients
travel (a few MB per step, over gloo), so this needs no DDP wrapper around the model. Every process computes on
the CPU unless `--device cuda` (then each process updates on its GPU; `--trainer trl` hands the process group to
accelerate, NCCL on GPUs).
"""
from __future__ import annotations

import datetime
import os

from ..errors import require


class Dist:
    """rank / world of this process, and the few collectives the trainer needs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        self._dist = None
        if self.world > 1:
            torch = require("torch", "train")
            dist = torch.distributed
            if not dist.is_initialized():
                # gloo: the trainer computes on the CPU, so its gradients are CPU tensors even on a GPU machine.
                # SFT's gold trajectories and a slow GRPO step on a laptop take longer than the default 30 min.
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
            self._dist = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's share of a step's items (every world-th, from its rank).

        >>> d = Dist(); d.rank, d.world = 1, 3
        >>> d.share(list(range(8)))
        [1, 4, 7]
        """
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self._dist:
            self._dist.barrier()

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every process."""
        if not self._dist:
            return [obj]
        out = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def sum_grads(self, params) -> None:
        """Sum the gradients of `params` over processes (a missing gradient counts as zero)."""
        if not self._dist:
            return
        torch = require("torch", "train")
        via_cpu = self._dist.get_backend() == "gloo"  # gloo reduces CPU tensors only
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if via_cpu and p.grad.device.type != "cpu":
                g = p.grad.cpu()
                self._dist.all_reduce(g)
                p.grad.copy_(g)
            else:
                self._dist.all_reduce(p.grad)

    def threads(self, free: int) -> int:
        """Threads for this process when the world shares one machine's free cores."""
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        return max(1, free // max(1, per_node))
