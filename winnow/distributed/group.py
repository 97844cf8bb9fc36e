"""One tensor-parallel group: its rank, size and the collectives the model and runner call."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from winnow.limits import TP_STARTUP_TIMEOUT_S, TP_STEP_TIMEOUT_S


@dataclass
class TensorParallel:
    """This process's place in the group. `group` None: the default (world) group.

    gloo (CPU) reduces no 16-bit floats, so collectives over it run in float32 and copy back.
    """

    rank: int
    size: int
    backend: str
    group: dist.ProcessGroup | None = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def _wire(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "gloo" and x.dtype in (torch.bfloat16, torch.float16):
            return x.float()
        return x

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (the result is in `x` on every rank)."""
        wire = self._wire(x)
        dist.all_reduce(wire, group=self.group)
        if wire is not x:
            x.copy_(wire)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's `x` [N, k] side by side [N, size * k]; other ranks: None."""
        wire = self._wire(x).contiguous()
        parts = [torch.empty_like(wire) for _ in range(self.size)] if self.is_driver else None
        dist.gather(wire, parts, dst=0, group=self.group)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1).to(x.dtype)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into `x` on every rank."""
        dist.broadcast(x, src=0, group=self.group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (on the CPU group)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group())
        return int(t.item())

    def agree(self, value: int) -> bool:
        """Whether every rank passed the same `value` (on the CPU group)."""
        return self.min_int(value) == -self.min_int(-value)


_CPU_GROUP: dist.ProcessGroup | None = None


def init_group(
    rank: int, size: int, master_addr: str, master_port: int, device: torch.device
) -> tuple[TensorParallel, dist.ProcessGroup]:
    """Join the group (blocks until every rank has joined): NCCL on CUDA, gloo on CPU. Returns
    the tensor-parallel group and a gloo group for the step input (a host-side broadcast),
    whose collectives time out after TP_STEP_TIMEOUT_S so that a lost rank is an error, not a
    hang."""
    global _CPU_GROUP
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=TP_STARTUP_TIMEOUT_S),
    )
    step_timeout = datetime.timedelta(seconds=TP_STEP_TIMEOUT_S)
    cpu = dist.new_group(backend="gloo", timeout=step_timeout)
    _CPU_GROUP = cpu
    # the model's collectives: that gloo group on a CPU, the default (NCCL) group on CUDA
    return TensorParallel(rank, size, backend, cpu if backend == "gloo" else None), cpu


def cpu_group() -> dist.ProcessGroup | None:
    return _CPU_GROUP


def leave_group() -> None:
    """Tear the process group down (idempotent)."""
    global _CPU_GROUP
    _CPU_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()
