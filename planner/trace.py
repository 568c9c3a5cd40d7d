"""Trace any `nn.Module` on the meta device: per-module parameters and activation bytes, nothing allocated.

The model is built (or moved) on the meta device and its inputs are meta tensors of the real shapes. Meta
tensors carry shapes, dtypes and strides but no storage, so a 70B-parameter model traces in seconds in a
few MB. The forward itself runs under torch's FakeTensorMode with the parameters and inputs posing as
tensors of `device` (CPU by default): still nothing is allocated, but each op takes the path it takes on
that device — on the bare meta device scaled_dot_product_attention falls back to the unfused math
kernel and would save the s x s attention probabilities that the fused kernels never keep. Every module's forward is bracketed by hooks; autograd's saved-tensor hooks
(torch.autograd.graph.saved_tensors_hooks) see each tensor the backward will need, and each is charged,
once per storage, to the innermost module running when it was saved. That is the activation memory of
the memory model (planner.memory) for layers it has no formula for.

This is the one place torch enters planner (DESIGN.md: "Torch enters planner only where a real
`nn.Module` is traced"); it is imported lazily so the cost models stay plain Python.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planner.errors import SpecError
from planner.model import ModelSpec, from_hf_config

if TYPE_CHECKING:
    import torch
    from torch import nn


class TraceError(SpecError):
    """The module could not be traced on the meta device (names the field and what failed)."""


@dataclass(frozen=True, kw_only=True)
class ModuleStats:
    name: str  # qualified name in the model ("" is the root)
    kind: str  # class name
    params: int  # parameters of this module and its children (a shared one once)
    param_bytes: int
    saved_bytes: int  # bytes saved for backward by ops run inside this module (children included)
    output_bytes: int  # bytes of the tensors its forward returned (the last call)
    calls: int = 1


@dataclass(frozen=True, kw_only=True)
class Trace:
    modules: tuple[ModuleStats, ...]  # in the order their forward was first entered; the root first
    params: int
    param_bytes: int
    saved_bytes: int  # all activations the backward needs, each storage once
    saved_by_dtype: Mapping[str, int] = field(default_factory=dict)

    def module(self, name: str) -> ModuleStats:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def children_of(self, name: str) -> tuple[ModuleStats, ...]:
        prefix = f"{name}." if name else ""
        depth = prefix.count(".")
        return tuple(
            m for m in self.modules if m.name.startswith(prefix) and m.name and m.name.count(".") == depth
        )


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _check_on_meta(model: nn.Module, flat_inputs: Sequence[Any]) -> None:
    """TraceError unless the model's parameters and the tensor inputs are all on the meta device."""
    import torch

    off_meta = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    if off_meta:
        raise TraceError(
            f"parameter {off_meta[0]!r} is on {next(model.parameters()).device}, not meta: build the model "
            'under `with torch.device("meta"):` or call `.to("meta")` so nothing is allocated',
            field="model",
        )
    for i, a in enumerate(flat_inputs):
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            raise TraceError(f"input {i} is on {a.device}, not meta", field="inputs")


class _Recorder:
    """The forward hooks and the saved-tensor hook of one trace, and what they saw.

    Module forwards nest: `stack` is the modules running now, innermost last; every tensor autograd saves
    is charged, once per storage, to each of them (a module's bytes include its children's).
    """

    def __init__(self, model: nn.Module, params: set[Any]) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.params = params  # storages of the parameters: model states, not activations
        self.order: list[nn.Module] = []  # in the order their forward was first entered
        self.stack: list[nn.Module] = []
        self.saved_in: dict[
            nn.Module, dict[Any, int]
        ] = {}  # storage -> bytes, per module (children included)
        self.outputs: dict[nn.Module, int] = {}
        self.calls: dict[nn.Module, int] = {}
        self.everything: dict[Any, tuple[int, str]] = {}  # storage -> (bytes, dtype), each once

    def pre(self, mod: nn.Module, _args: Any) -> None:
        if mod not in self.calls:
            self.order.append(mod)
            self.calls[mod] = 0
        self.calls[mod] += 1
        self.stack.append(mod)

    def post(self, mod: nn.Module, _args: Any, out: Any) -> None:
        import torch

        # NOTE: a module whose forward raises leaves the stack unbalanced; the trace then fails anyway.
        self.stack.pop()
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.outputs[mod] = sum(_nbytes(t) for t in outs)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        from torch.multiprocessing.reductions import StorageWeakRef

        key = StorageWeakRef(t.untyped_storage())
        if key not in self.params:  # parameters are model states, not activations
            size = _nbytes(t)
            self.everything.setdefault(key, (size, str(t.dtype).removeprefix("torch.")))
            for mod in self.stack:  # the innermost module and every module around it
                self.saved_in.setdefault(mod, {})[key] = size
        return t

    def trace(self, model: nn.Module) -> Trace:
        stats = [
            ModuleStats(
                name=self.names[mod],
                kind=type(mod).__name__,
                params=sum(p.numel() for p in mod.parameters()),
                param_bytes=sum(p.numel() * p.element_size() for p in mod.parameters()),
                saved_bytes=sum(self.saved_in.get(mod, {}).values()),
                output_bytes=self.outputs.get(mod, 0),
                calls=self.calls[mod],
            )
            for mod in self.order
        ]
        by_dtype: dict[str, int] = {}
        for size, dtype in self.everything.values():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + size
        all_params = list(model.parameters())  # shared (tied) parameters once
        return Trace(
            modules=tuple(stats),
            params=sum(p.numel() for p in all_params),
            param_bytes=sum(p.numel() * p.element_size() for p in all_params),
            saved_bytes=sum(size for size, _ in self.everything.values()),
            saved_by_dtype=by_dtype,
        )


def trace_module(
    model: nn.Module,
    inputs: Sequence[Any] | Mapping[str, Any],
    *,
    loss: Callable[[Any], torch.Tensor] | None = None,
    device: str = "cpu",
) -> Trace:
    """Run `model` forward on meta `inputs` and count parameters and saved activations per module.

    `model` must be on the meta device (build it under `with torch.device("meta"):`); `inputs` are
    positional arguments or keyword arguments of its forward, meta tensors of the real shapes. `loss`,
    when given, maps the output to the scalar that backward would start from, so the loss's own saved
    tensors (often the largest: the logits) are counted too.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    from torch.multiprocessing.reductions import StorageWeakRef

    _check_on_meta(model, list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)

    def fake(t: torch.Tensor) -> torch.Tensor:
        with fake_mode:
            f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        return f.requires_grad_(t.requires_grad)

    # tied parameters stay tied: one fake tensor per distinct parameter
    states: dict[str, torch.Tensor] = {}
    by_id: dict[int, torch.Tensor] = {}
    for n, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        states[n] = by_id.setdefault(id(t), fake(t))
    rec = _Recorder(model, {StorageWeakRef(t.untyped_storage()) for t in by_id.values()})
    args = torch.utils._pytree.tree_map_only(
        torch.Tensor, fake, dict(inputs) if isinstance(inputs, Mapping) else tuple(inputs)
    )
    handles = []
    for mod in rec.names:
        handles.append(mod.register_forward_pre_hook(rec.pre))
        handles.append(mod.register_forward_hook(rec.post))
    try:
        with fake_mode, torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            if isinstance(args, dict):
                out = functional_call(model, states, (), args, tie_weights=False, strict=True)
            else:
                out = functional_call(model, states, args, tie_weights=False, strict=True)
            if loss is not None:
                rec.stack.append(model)  # the loss is charged to the root
                try:
                    loss(out)
                finally:
                    rec.stack.pop()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        hint = ""
        if "BF16" in str(exc) and any(p.dim() == 3 for p in model.parameters()):
            # transformers' grouped experts (torch grouped_mm) have a meta kernel for bf16 only
            hint = "; a mixture of experts traces in bf16 (--dtype bf16), its grouped matmul has no fp32 meta kernel"
        raise TraceError(f"forward on the meta device failed: {exc}{hint}", field="model") from exc
    finally:
        for h in handles:
            h.remove()
    return rec.trace(model)


def model_spec_of(model: nn.Module, *, name: str | None = None) -> ModelSpec:
    """The ModelSpec of a transformers causal LM (read from its config: the families of
    `planner.model.SUPPORTED_MODEL_TYPES`), checked against the module's own parameter count, which on the
    meta device costs nothing."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TraceError(
            f"{type(model).__name__} has no transformers config: describe it as a ModelSpec by hand, or "
            "use trace_module for its per-module parameters and activations",
            field="model",
        )
    spec = from_hf_config(config.to_dict(), name=name or getattr(config, "name_or_path", "") or "traced")
    # (a PEFT model: the base model's parameters; the adapters are the workload's, `lora_fields_of`)
    counted = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    if spec.params != counted:
        raise TraceError(
            f"the spec read from {type(model).__name__}'s config counts {spec.params} parameters, the "
            f"module has {counted}: its architecture has parts the ModelSpec does not describe",
            field="model",
        )
    return spec


def lora_fields_of(model: nn.Module) -> dict[str, Any]:
    """The Workload fields of a PEFT LoRA model (`lora_rank`, `lora_targets` from its active adapter's
    `LoraConfig`), or {} for a model without adapters; meta-device models cost nothing."""
    # a PeftModel (looked up on the class: it hands unknown attributes on to the model it wraps)
    if not callable(getattr(type(model), "get_base_model", None)):
        return {}
    configs = getattr(model, "peft_config", None)  # {adapter name: config}
    if not isinstance(configs, dict) or not configs:
        return {}
    active = getattr(model, "active_adapter", None)
    cfg = configs.get(active) if isinstance(active, str) else None
    cfg = cfg or next(iter(configs.values()))
    rank, targets = getattr(cfg, "r", None), getattr(cfg, "target_modules", None)
    if not isinstance(rank, int) or not targets or isinstance(targets, str):
        raise TraceError(
            f"the PEFT adapter is {type(cfg).__name__} (r={rank!r}, target_modules={targets!r}); only LoRA with "
            "a list of target module names is planned",
            field="model.peft_config",
        )
    return {"lora_rank": rank, "lora_targets": tuple(sorted(targets))}
