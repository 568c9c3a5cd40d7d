"""Hugging Face plumbing for the chunked loss: find a causal LM's head, swap its head and loss, strip logits.

Kept apart from offload/loss.py so the loss itself has no knowledge of transformers' conventions. Nothing
here imports transformers: the checks go by the attributes every `PreTrainedModel` has
(`get_output_embeddings()`, the `loss_function` property backed by `_loss_function`, `ModelOutput`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from offload.loss_errors import UnsupportedModelError

# The name of transformers' default causal-LM loss (transformers/loss/loss_utils.py::ForCausalLMLoss): shift
# labels by one, upcast logits to fp32, cross-entropy with ignore_index, mean or sum / num_items_in_batch.
CAUSAL_LM_LOSS_NAME = "ForCausalLMLoss"


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The causal LM a wrapper runs: PEFT's `PeftModel.get_base_model()` (the model under the LoRA layers,
    whose forward computes the loss), or `model` itself. Looked up on the class: PeftModel forwards unknown
    attributes to the model it wraps."""
    if callable(getattr(type(model), "get_base_model", None)):
        inner = model.get_base_model()  # type: ignore[operator]
        if isinstance(inner, nn.Module) and inner is not model:
            return inner
    return model


def is_head_passthrough(logits: Tensor, hidden: Tensor | None) -> bool:
    """Whether the loss function got what the swapped head returned (the hidden states), not logits.

    By identity, or as the same storage, shape and strides: DeepSpeed ZeRO-3's forward hook hands a module's
    output on through an autograd function that returns `output.detach()` (a new tensor object over the same
    storage; deepspeed/runtime/zero/parameter_offload.py, PreBackwardFunctionForModule). Anything that made
    new values (soft-capping, scaling) makes a new storage."""
    if hidden is None:
        return False
    if logits is hidden:
        return True
    return (
        logits.shape == hidden.shape
        and logits.stride() == hidden.stride()
        and logits.data_ptr() == hidden.data_ptr()
        and logits.dtype == hidden.dtype
    )


def find_lm_head(model: nn.Module) -> nn.Linear:
    """The model's output projection (an nn.Linear of weight (vocab, hidden)), tied or not."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else getattr(model, "lm_head", None)
    if head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no output embedding (get_output_embeddings() is None)", field="model"
        )
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"output embedding is {type(head).__name__}, expected nn.Linear (vocab x hidden)",
            field="model.lm_head",
        )
    return head


def default_causal_lm_loss(model: nn.Module) -> Callable[..., Tensor]:
    """The model's loss function if it is transformers' default causal-LM loss, else UnsupportedModelError."""
    if "_loss_function" in vars(model):
        raise UnsupportedModelError(
            "has a custom loss_function set; the chunked loss would replace it", field="model.loss_function"
        )
    fn = getattr(model, "loss_function", None)
    name = getattr(fn, "__name__", type(fn).__name__)
    if fn is None or name != CAUSAL_LM_LOSS_NAME:
        raise UnsupportedModelError(
            f"is {name}, expected transformers' {CAUSAL_LM_LOSS_NAME}", field="model.loss_function"
        )
    return fn


def override_forward(
    module: nn.Module, replacement: Callable[[Callable[..., Any], Tensor], Any]
) -> Callable[[], None]:
    """Make `module(x)` call `replacement(previous_forward, x)`; returns the undo.

    An instance attribute shadows the class's forward (nn.Module.__call__ looks up self.forward), so the
    module's parameters, buffers and state_dict keys are untouched. A forward already overridden on the
    instance (e.g. by accelerate's hooks) is chained to and restored on undo.
    """
    had_own = "forward" in vars(module)
    previous = module.forward

    def forward(hidden: Tensor) -> Any:
        return replacement(previous, hidden)

    module.forward = forward  # type: ignore[method-assign]

    def undo() -> None:
        if had_own:
            module.forward = previous  # type: ignore[method-assign]
        else:
            del module.forward

    return undo


def override_loss_function(model: nn.Module, fn: Callable[..., Tensor]) -> Callable[[], None]:
    """Set the model's loss function (PreTrainedModel.loss_function's setter stores `_loss_function`)."""
    # PreTrainedModel.loss_function is a property whose setter stores `_loss_function` on the instance
    setattr(model, "loss_function", fn)  # noqa: B010

    def undo() -> None:
        if "_loss_function" in vars(model):
            delattr(model, "_loss_function")

    return undo


def drop_logits(output: Any, placeholder: Tensor) -> Any:
    """The model output without the placeholder the head returned in place of logits.

    A ModelOutput is rebuilt without that field (so `.logits` is None and `to_tuple()` skips it); a tuple
    (return_dict=False) loses the entry.
    """
    if isinstance(output, tuple):
        return tuple(v for v in output if v is not placeholder)
    if isinstance(output, dict):  # transformers.utils.ModelOutput is an OrderedDict dataclass
        return type(output)(**{k: v for k, v in output.items() if v is not placeholder})
    raise UnsupportedModelError(
        f"forward returned {type(output).__name__}, expected a ModelOutput or tuple", field="model"
    )
