"""Per-parameter optimizers: layer-wise updates for any torch optimizer, and low-bit AdamW states.

:class:`PerParameterOptimizer` gives an optimizer without ``step_param`` (``torch.optim.AdamW``, the 8-bit
AdamW of bitsandbytes, the 4-bit AdamW of torchao) the per-parameter step :class:`optim.LayerwiseStepper`
calls in backward: one inner optimizer per parameter, built with that parameter's group settings. This is
how GaLore's reference code runs layer-wise AdamW (Zhao et al. 2024, ``torchrun_main.py``: one optimizer per
parameter, stepped in ``register_post_accumulate_grad_hook``). With ``foreach=False`` (torch's default on
CPU) torch's AdamW updates each parameter with the same arithmetic alone as in a group, so layer-wise and
whole-step updates are bit-identical.

:func:`low_bit_adamw` builds AdamW with 8-bit (bitsandbytes, blockwise quantization, Dettmers et al. 2022)
or 4-bit (torchao) moments, and says clearly when the library does not run here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from optim.errors import OptimizerConfigError

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class PerParameterOptimizer:
    """One inner optimizer per parameter, with ``step_param`` for :class:`optim.LayerwiseStepper`.

    Args:
        param_groups: the groups (dicts with ``params`` and the group's hyper-parameters) to split.
        factory: builds the inner optimizer for one single-parameter group list.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], factory: OptimizerFactory) -> None:
        self.param_groups: list[dict[str, Any]] = [dict(g) for g in param_groups]
        self._inner: dict[int, torch.optim.Optimizer] = {}
        for group in self.param_groups:
            group["params"] = list(group["params"])
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if p.requires_grad:
                    self._inner[id(p)] = factory([{"params": [p], **settings}])

    @classmethod
    def like(cls, optimizer: torch.optim.Optimizer) -> PerParameterOptimizer:
        """Split an existing (not yet stepped) optimizer: the same class and settings, one per parameter."""
        if any(optimizer.state.values()):
            raise OptimizerConfigError("optimizer", "split an optimizer before its first step (it has state)")
        kind: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = type(optimizer)  # type: ignore[assignment]
        return cls(optimizer.param_groups, kind)

    def step_param(self, param: torch.Tensor) -> None:
        """Step one parameter (from its post-accumulate-grad hook)."""
        if param.grad is None:
            return
        try:
            inner = self._inner[id(param)]
        except KeyError:
            raise OptimizerConfigError("param", "the tensor is not a parameter of this optimizer") from None
        inner.step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every parameter that has a gradient (the whole-step path: the same updates)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                self.step_param(p)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for inner in self._inner.values():
            inner.zero_grad(set_to_none=set_to_none)

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        out: dict[torch.Tensor, dict[str, Any]] = {}
        for inner in self._inner.values():
            out.update(inner.state)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [inner.state_dict() for inner in self._inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for inner, sd in zip(self._inner.values(), state_dict["per_parameter"], strict=True):
            inner.load_state_dict(sd)

    def state_bytes(self) -> int:
        """Bytes held by the inner optimizers' state tensors."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )


def low_bit_adamw(params: Iterable[Any], *, bits: int, **settings: Any) -> torch.optim.Optimizer:
    """AdamW with ``bits``-bit moments: bitsandbytes' ``AdamW8bit`` (8; its CPU update chunked) or torchao's
    ``AdamW4bit`` (4).

    Raises :class:`OptimizerConfigError` naming the library when it is not installed or does not run on
    this machine (torchao's low-bit optimizers need CUDA).
    """
    if bits == 8:
        from optim import quantized

        # bitsandbytes' AdamW8bit, its CPU update chunked (optim.quantized.adamw_8bit: the same bits without
        # fp32 copies of the whole tensor); raises naming state_bits when bitsandbytes does not load
        return quantized.adamw_8bit(params, **settings)
    if bits == 4:
        if not torch.cuda.is_available():
            raise OptimizerConfigError(
                "state_bits", "4-bit optimizer states run torchao's AdamW4bit, which needs a CUDA device"
            )
        try:
            from torchao.optim import AdamW4bit
        except Exception as e:
            raise OptimizerConfigError(
                "state_bits", f"4-bit optimizer states need torchao, which does not load here: {e}"
            ) from None
        return AdamW4bit(params, **settings)
    raise OptimizerConfigError("state_bits", f"must be 8 or 4, got {bits!r}")
