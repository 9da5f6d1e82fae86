"""One process or many (`torchrun`): rank, world size, the sums that keep ranks in step, and the device.

gloo carries the small CPU-side sums (token counts, losses, the stop flag), NCCL the CUDA tensors. A single
process needs none of it: every method is then a no-op.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InvalidOptionError, option


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """The rank and world size torchrun set (a single process without it); joins the process group."""
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world)

    @property
    def main(self) -> bool:
        """The process that writes files, logs and shows progress."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over every rank, in place."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one: one rank's Ctrl-C stops all at the same step."""
        return bool(self.sum_(torch.tensor([float(flag)])).item()) if self.world > 1 else flag

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = Distributed()


def pick_device(name: str) -> torch.device:
    """auto: CUDA when there is one. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidOptionError(f"{option('device', name)}: no CUDA device is available "
                                 f"(use {option('device', 'cpu')})")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def is_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()
