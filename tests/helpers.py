"""Shared test helpers: real HF models built from ModelSpecs (random init, no downloads)."""

from __future__ import annotations

import torch
import transformers

from planner.model import ModelSpec, to_hf_config_dict


def hf_model(spec: ModelSpec, *, seed: int = 0, attn: str | None = None, dropout: float = 0.0):
    d = to_hf_config_dict(spec, dropout=dropout)
    model_type = d.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **d)
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def mem_tracker():
    """torch's MemTracker, also for models with frozen parameters (LoRA): its module hooks register a gradient
    hook on every parameter, which torch refuses on one that does not require grad; here only the trainable
    ones get it (the same bytes counted, the same categories)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenAwareMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:

                        def grad_hook(grad):
                            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(grad_hook),
                            param.register_post_accumulate_grad_hook(lambda p, h=grad_hook: h(p.grad)),
                        )
            return out

    return FrozenAwareMemTracker()


def measure_step_peak(model, optimizer, ids, *, steps: int = 1) -> dict[str, int]:
    """Peak live bytes of a training step (forward, backward, optimizer step), by category.

    The first step runs untracked so the optimizer state exists, as in steady state.
    """

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = mem_tracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(steps):
            step()
    snap = tracker.get_tracker_snapshot("peak")
    per_dev = next(iter(snap.values()))
    return {str(k).split(".")[-1]: int(v) for k, v in per_dev.items()}


def vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    inside = False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")
