"""Optimizer-state offload of the shards a tp / pp / FSDP2 rank trains (`plan.optimizer.offload` beside
`launch.train.parallel`).

memtier's offloaded AdamW (`offload.optimizer`) updates plain tensors: it is given `ShardProxies`, one plain
parameter over the storage of each trained parameter's local shard (a DTensor's `_local_tensor`: FSDP2's
dp shard, a tp shard, or a whole replicated tensor; a pipeline rank's own parameters as they are). The
update writes the shard in place, so FSDP2 gathers and tp computes from the new values. The gradients reach
the proxies after the engine has averaged (FSDP2 reduce-scatters in backward; ZeRO-0 averages after the last
micro-batch) and clipped them by the global norm over every rank (`parallel.clip_gradients`): the offloaded
optimizer then finds them set by hand at `step()` (its documented path for gradients no hook saw), and its own
clipping, which sees one rank's shards only, is off.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from launch.train.parallel import _local


class ShardProxies(nn.Module):
    """Plain parameters sharing storage with the local shards of `params` (what a rank trains)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.sources = list(params)
        # detach(): a new tensor over the same storage; nn.Parameter keeps that storage
        self.proxies = nn.ParameterList([nn.Parameter(_local(p).detach()) for p in params])

    def deliver_gradients(self) -> None:
        """Each proxy's gradient: the local shard of its parameter's (averaged, clipped) gradient."""
        for p, q in zip(self.sources, self.proxies, strict=True):
            q.grad = None if p.grad is None else _local(p.grad).detach()

    def clear_gradients(self) -> None:
        for p, q in zip(self.sources, self.proxies, strict=True):
            p.grad = None
            q.grad = None


class ShardedOffload:
    """The offloaded optimizer over `ShardProxies`, stepped like a torch optimizer by `ParallelEngine`."""

    clips_gradients = False  # the engine clips by the global norm over every rank first

    def __init__(self, proxies: ShardProxies, inner: Any) -> None:
        self.proxies = proxies
        self.inner = inner  # offload.optimizer.OffloadedAdamW over proxies.proxies

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def step(self) -> None:
        self.proxies.deliver_gradients()
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.proxies.clear_gradients()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def __getattr__(self, name: str) -> Any:
        # the offloaded optimizer's reports (subgroups, subgroup_tiers, schedule_log, ...)
        if name in ("inner", "proxies"):
            raise AttributeError(name)
        return getattr(self.inner, name)
