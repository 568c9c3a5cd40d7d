"""Hugging Face `Trainer` integration: a `TrainerCallback` that carries out a Plan.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[MemtierCallback("out/plan.json")])
    trainer.train()

The plan comes from the argument (a `Plan` or a path to plan.json) or, without one, from the environment
variable `MEMTIER_PLAN`. What transformers 5.x allows (transformers/trainer.py, `_inner_training_loop`): the
optimizer is created (`create_optimizer`) and wrapped by accelerate (`AcceleratedOptimizer`) before
`on_train_begin`, which receives the model (`Trainer.model`, a PEFT model as given) and that wrapper. So
`on_train_begin` applies the plan (`offload.apply`: activation swap / recompute per block, the chunked
loss, optimizer offload) and, when the plan offloads the optimizer, puts the `OffloadedAdamW` inside the
accelerate wrapper: `Trainer.optimizer.step()` then steps it, and the scheduler built on the torch AdamW
keeps driving the learning rate (the offloaded optimizer shares its param_groups). `on_train_end` removes
everything and puts the torch optimizer back.

NOTE: with optimizer offload the plan's optimizer clips (`OptimizerPlan.max_grad_norm`): gradients leave the
device as backward makes them, so the Trainer's own clipping would see none; the callback sets
`args.max_grad_norm = 0` for the run and restores it at the end.
"""

from __future__ import annotations

import os
from typing import Any

from offload.apply import OffloadHandle, apply
from planner.errors import SpecError
from planner.plan import Plan

__all__ = ["PLAN_ENV", "MemtierCallback"]

PLAN_ENV = "MEMTIER_PLAN"

try:  # transformers is what this module plugs into; without it the class is still importable (for docs)
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover
    _Base = object  # type: ignore[assignment,misc]


def _load_plan(plan: Plan | str | os.PathLike[str] | None) -> Plan:
    if isinstance(plan, Plan):
        return plan
    path = plan if plan is not None else os.environ.get(PLAN_ENV)
    if not path:
        raise SpecError(f"no plan given and ${PLAN_ENV} is not set", field="plan")
    return Plan.load(os.fspath(path))


class MemtierCallback(_Base):  # type: ignore[misc,valid-type]
    """Apply `plan` to the Trainer's model and optimizer at `on_train_begin`; undo it at `on_train_end`.

    `handle` is the `offload.OffloadHandle` while training runs (its `stats` count the swapped bytes). A run
    that raises skips `on_train_end`: call `remove()` then.
    """

    def __init__(self, plan: Plan | str | os.PathLike[str] | None = None, **apply_kwargs: Any) -> None:
        self.plan = _load_plan(plan)
        self.apply_kwargs = apply_kwargs
        self.handle: OffloadHandle | None = None
        self._wrapper: Any = None  # accelerate's AcceleratedOptimizer whose inner optimizer was swapped
        self._inner: Any = None  # the torch optimizer the Trainer created
        self._max_grad_norm: float | None = None
        self.swap_stats: Any = None  # the handle's stats() when the plan was removed
        self.offloaded_optimizer: Any = None  # the OffloadedAdamW that stepped, when the plan offloads

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        self._check_batch(args)
        # accelerate wraps the torch optimizer; the offload needs the torch AdamW itself
        inner = getattr(optimizer, "optimizer", optimizer)
        offloads = self.plan.optimizer.offload
        if offloads and optimizer is inner:
            raise SpecError(
                f"the Trainer's optimizer is a bare {type(optimizer).__name__}, not accelerate's wrapper: the "
                "offloaded optimizer could not be put in its place",
                field="optimizer",
            )
        self.handle = apply(model, inner if offloads else None, self.plan, **self.apply_kwargs)
        if offloads:
            self.offloaded_optimizer = self.handle.optimizer
            self._wrapper, self._inner = optimizer, inner
            optimizer.optimizer = self.handle.optimizer
            # the plan's optimizer clips (see the module docstring)
            self._max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0

    def _check_batch(self, args: Any) -> None:
        """The plan's activation policies are sized for its micro-batch, and the offloaded optimizer steps after
        its gradient accumulation: the Trainer must run the same (the error prints the arithmetic)."""
        lay = self.plan.layout
        for name, ours, theirs in (
            ("per_device_train_batch_size", lay.micro_batch, args.per_device_train_batch_size),
            ("gradient_accumulation_steps", lay.grad_accum, args.gradient_accumulation_steps),
        ):
            if ours != theirs:
                raise SpecError(f"TrainingArguments.{name}({theirs}) != the plan's {ours}", field=name)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.remove(args)

    def remove(self, args: Any = None) -> None:
        """Undo the plan (idempotent): hooks, loss and offloaded optimizer; the torch optimizer goes back."""
        if self.handle is not None:
            self.swap_stats = self.handle.stats
            self.handle.remove()
            self.handle = None
        if self._wrapper is not None:
            self._wrapper.optimizer = self._inner
            self._wrapper = self._inner = None
        if args is not None and self._max_grad_norm is not None:
            args.max_grad_norm = self._max_grad_norm
            self._max_grad_norm = None
