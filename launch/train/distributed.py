"""The process group of a training run: this rank's place in it, and gradient averaging in backward hooks."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))


def init_distributed() -> Dist:
    """torchrun's environment -> the device and (with several ranks) the process group: NCCL on GPUs, gloo on
    CPU. CUDA_VISIBLE_DEVICES, set by `memtier launch`, carries the plan's device order."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # a collective whose peer never answers fails after this long instead of waiting forever
        timeout_s = float(os.environ.get("MEMTIER_COLLECTIVE_TIMEOUT_S", "0") or 0)
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s > 0 else None
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world, device=device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


class GradientAverager:
    """Data parallelism for an optimizer that reads gradients in backward hooks (memtier's offloaded AdamW).

    DDP averages gradients after they were accumulated into `.grad`, i.e. after post-accumulate-grad hooks
    have seen the rank's own gradient. Here each parameter's incoming gradient is averaged over the ranks in a
    tensor hook, which runs before the gradient is accumulated, so every later hook sees the average. Ranks
    issue the all-reduces in the same (autograd) order; gloo's and NCCL's all-reduce give every rank the same
    bits, so the ranks' updates stay identical. Parameters start from rank 0's.
    """

    def __init__(self, model: torch.nn.Module, world: int) -> None:
        self.world = world
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
        self.handles = [p.register_hook(self._average) for p in model.parameters() if p.requires_grad]

    def _average(self, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()  # a hook must not modify its input in place
        dist.all_reduce(out)
        return out.div_(self.world)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
