"""Layer-wise updates: step each parameter inside backward as soon as its gradient is complete, then free it.

GaLore's per-layer weight update (Zhao et al. 2024, sec. 4.3, the reason a 7B model fits in 24 GB): the
optimizer step for a parameter runs in its post-accumulate-grad hook, and ``p.grad`` is released right
after, so at most a few gradients are alive at any time instead of all of them.

Under data parallelism the gradient must be averaged over ranks before the update. DDP's reducer cannot
be used for that (it reduces in buckets after the hook has fired, and it owns the gradient buffers), so
:class:`LayerwiseStepper` does DDP's job itself: it broadcasts the parameters once, all-reduces each
gradient in that parameter's hook, and steps the parameter when its reduction has finished. Use it instead
of wrapping the model in ``DistributedDataParallel``.

Limitations, as for GaLore's layer-wise mode: no global gradient clipping (each update happens before the
other gradients exist), and every parameter must receive a gradient on every rank in every backward
(as with DDP's default ``find_unused_parameters=False``), because ranks must issue the same collectives
in the same order.

A model wrapped in ``DistributedDataParallel`` or sharded by FSDP (``fully_shard``, or FSDP1) is refused when
it is passed as ``model=``: their reductions run after the parameter hooks have already stepped, so each rank
would update with its own local gradient.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import torch
import torch.distributed as dist

from optim.errors import OptimizerConfigError


class _SteppableByParam(Protocol):
    param_groups: list[dict[str, Any]]

    def step_param(self, param: torch.Tensor) -> None: ...


class LayerwiseStepper:
    """Run ``optimizer.step_param(p)`` in each parameter's post-accumulate-grad hook and free ``p.grad``.

    Args:
        optimizer: an optimizer with ``step_param`` (every optimizer in ``optim``). Do not call its
            ``step()`` while the stepper is installed (it would find no gradients and do nothing).
        process_group: the data-parallel group; gradients are averaged over it before each update.
        reduce_gradients: average gradients over ``process_group``; default: when torch.distributed is
            initialised and the group has more than one rank.
        accumulation_steps: backward passes per optimizer step; gradients accumulate in ``p.grad`` for the
            first ``accumulation_steps - 1`` passes and are only freed on the last one.
        max_pending: how many reduced-but-not-yet-applied gradients may be in flight while backward goes on
            (0 waits for each reduction in its own hook).
        broadcast_from: when reducing, the rank whose parameters every rank starts from (None: skip).
        model: the module the optimizer's parameters belong to; refused (OptimizerConfigError) if it is or
            holds a ``DistributedDataParallel`` or FSDP-sharded module (see `check_not_data_parallel`).
    """

    def __init__(
        self,
        optimizer: _SteppableByParam,
        *,
        process_group: dist.ProcessGroup | None = None,
        reduce_gradients: bool | None = None,
        accumulation_steps: int = 1,
        max_pending: int = 2,
        broadcast_from: int | None = 0,
        model: torch.nn.Module | None = None,
    ) -> None:
        if model is not None:
            check_not_data_parallel(model)
        if not callable(getattr(optimizer, "step_param", None)):
            raise OptimizerConfigError(
                "optimizer", f"{type(optimizer).__name__} has no step_param(param) method"
            )
        if (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1
        ):
            raise OptimizerConfigError(
                "accumulation_steps", f"must be an int >= 1, got {accumulation_steps!r}"
            )
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 0:
            raise OptimizerConfigError("max_pending", f"must be an int >= 0, got {max_pending!r}")
        self._optimizer = optimizer
        self._group = process_group
        if reduce_gradients is None:
            reduce_gradients = (
                dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
            )
        self._reduce = bool(reduce_gradients)
        self._world_size = dist.get_world_size(process_group) if self._reduce else 1
        self._accumulation_steps = accumulation_steps
        self._max_pending = max_pending
        self._micro_steps: dict[int, int] = {}
        self._pending: deque[tuple[torch.Tensor, Any]] = deque()
        self._flush_queued = False

        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if self._reduce and broadcast_from is not None:
            # Same starting point on every rank, as DDP's constructor guarantees.
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=broadcast_from, group=process_group)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    @property
    def reduces_gradients(self) -> bool:
        """Whether gradients are averaged over the process group before each update."""
        return self._reduce

    def remove(self) -> None:
        """Uninstall the hooks (pending reductions are applied first)."""
        self._flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerwiseStepper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        # Runs on the autograd thread after p.grad holds this backward's complete gradient (every node
        # that used p has run, so changing p in place cannot corrupt a saved tensor).
        key = id(p)
        count = self._micro_steps.get(key, 0) + 1
        if count < self._accumulation_steps:
            self._micro_steps[key] = count
            return
        self._micro_steps[key] = 0
        if not self._reduce:
            self._optimizer.step_param(p)
            p.grad = None
            return
        if not self._flush_queued:
            # The engine runs queued callbacks after the whole backward pass has finished, so the
            # reductions still pending then are waited for and applied before backward() returns.
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._flush_queued = True
        assert p.grad is not None  # the hook fires only once the gradient exists
        # Every rank reaches this hook for the same parameters in the same order (same graph), so the
        # all-reduces match up across ranks. Autograd does not touch p.grad again in this backward, so
        # the asynchronous reduction may read it until its wait() below.
        work = dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
        self._pending.append((p, work))
        while len(self._pending) > self._max_pending:
            self._apply_oldest()

    def _apply_oldest(self) -> None:
        p, work = self._pending.popleft()
        # wait() orders the update after the reduction has written the summed gradient into p.grad.
        work.wait()
        assert p.grad is not None
        p.grad.div_(self._world_size)
        self._optimizer.step_param(p)
        p.grad = None

    def _flush(self) -> None:
        while self._pending:
            self._apply_oldest()
        self._flush_queued = False


def _data_parallel_wrapper(model: torch.nn.Module) -> str | None:
    """The name of the data-parallel wrapper `model` is or holds (DDP, FSDP2's fully_shard, FSDP1), or None."""
    from torch.nn.parallel import DistributedDataParallel

    sharded: tuple[type, ...] = ()
    try:  # FSDP2 (fully_shard turns each sharded module into an FSDPModule) and FSDP1
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        sharded = (FSDPModule, FullyShardedDataParallel)
    except ImportError:  # a torch built without distributed
        pass
    for name, module in model.named_modules():
        where = f" (at {name!r})" if name else ""
        if isinstance(module, DistributedDataParallel):
            return f"DistributedDataParallel{where}"
        if sharded and isinstance(module, sharded):
            return f"FSDP ({type(module).__name__}){where}"
    return None


def check_not_data_parallel(model: torch.nn.Module) -> None:
    """OptimizerConfigError if `model` is wrapped in DDP or sharded by FSDP: a layer-wise step runs in each
    parameter's post-accumulate-grad hook, before DDP's bucketed all-reduce (or FSDP's reduce-scatter) has
    averaged the gradient, so every rank would update with its own local gradient (silently wrong)."""
    wrapper = _data_parallel_wrapper(model)
    if wrapper is not None:
        raise OptimizerConfigError(
            "model",
            f"the model is wrapped in {wrapper}: layer-wise updates step each parameter before that wrapper "
            "averages its gradient, so every rank would apply its own local gradient. Pass the unwrapped "
            "module and let LayerwiseStepper average gradients itself (process_group=..., it broadcasts the "
            "starting parameters as DDP does), or turn layer-wise updates off to keep DDP/FSDP",
        )


def broadcast_parameters(
    module: torch.nn.Module, *, src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP's constructor does)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src, group=group)
