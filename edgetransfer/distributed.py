"""Multi-process fine-tuning under ``torchrun``: PyTorch's own engine (gloo on CPU, nccl on CUDA).

Inert in a single process: every helper is a no-op there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .errors import EdgeTransferError

__all__ = ["Context", "setup", "SINGLE"]

TIMEOUT_ENV = "EDGETRANSFER_DIST_TIMEOUT"  # seconds a collective may wait for a lost rank


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, items: list) -> list:
        """This rank's share: every ``world``-th item from ``rank``."""
        return items[self.rank :: self.world] if self.active else items

    def unshard(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """Gather every rank's :meth:`shard` result back into the original order."""
        if not self.active:
            return part
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, part.cpu())
        whole = torch.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
        for rank, piece in enumerate(parts):
            whole[rank :: self.world] = piece
        return whole

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


SINGLE = Context()


def setup(device: str) -> Context:
    """Join the process group ``torchrun`` describes in the environment (once), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    context = Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(context.local_rank)
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
        try:
            torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except Exception as exc:
            raise EdgeTransferError(f"cannot join the distributed job (rank {context.rank} of {world}): {str(exc).splitlines()[0]}") from exc
    return context
