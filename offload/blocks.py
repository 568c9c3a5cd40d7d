"""Finding the transformer blocks of a model: the units a plan's per-layer activation policy refers to.

`plan.activations[i].layer` indexes the list returned here. Known layouts are looked up by attribute path
(HF Llama/Mistral/Qwen/Phi-3/Gemma/OLMo 2 and the MoE families `model.layers`, GPT-2 and Falcon
`transformer.h`, GPT-NeoX `gpt_neox.layers`, their base models `layers` / `h`, and the same inside PEFT's
`PeftModel`: `base_model.model.model.layers`); any other model falls back
to the largest `nn.ModuleList` / `nn.Sequential` whose children all have the same class, "largest" meaning
the most parameters (so a stack of decoder layers wins over experts held as a ModuleList inside each of them;
transformers' own MoE blocks hold their experts as 3-D tensors), then the most children. An explicit
`blocks=` argument overrides the search.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from planner.errors import SpecError

__all__ = ["BlockDiscoveryError", "BlockList", "KNOWN_BLOCK_PATHS", "find_blocks"]

# Attribute paths of the block stack in known model families, tried in order.
KNOWN_BLOCK_PATHS: tuple[str, ...] = (
    # HF *ForCausalLM of Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, OLMo 2, Mixtral, Qwen2-MoE/Qwen3-MoE
    "model.layers",
    "transformer.h",  # HF GPT2LMHeadModel, FalconForCausalLM
    "gpt_neox.layers",  # HF GPTNeoXForCausalLM
    "layers",  # HF LlamaModel (the base model)
    "h",  # HF GPT2Model (the base model)
    # PEFT: PeftModelForCausalLM.base_model (LoraModel).model (the causal LM) -> its blocks
    "base_model.model.model.layers",
    "base_model.model.transformer.h",
    "base_model.model.gpt_neox.layers",
)


class BlockDiscoveryError(SpecError):
    """No transformer blocks could be found (or the explicit `blocks=` argument is malformed)."""


@dataclass(frozen=True)
class BlockList:
    """The transformer blocks of a model, in forward order, and where they were found."""

    path: str  # dotted attribute path of the container ("model.layers"), or "<explicit>"
    modules: tuple[nn.Module, ...]

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, index: int) -> nn.Module:
        return self.modules[index]

    def __iter__(self):
        return iter(self.modules)


def _get_path(model: nn.Module, path: str) -> object | None:
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _block_class(m: nn.Module) -> type:
    """The module's own class: FSDP2's `fully_shard` swaps in a subclass (FSDP<Name>) on the modules it
    shards, so a pipeline stage's sharded blocks and the other stages' unsharded ones are the same kind."""
    cls = type(m)
    if any(b.__name__ == "FSDPModule" for b in cls.__bases__):
        return next((b for b in cls.__bases__ if b.__name__ != "FSDPModule"), cls)
    return cls


def _homogeneous(container: nn.Module) -> bool:
    children = list(container.children())
    return len(children) >= 1 and all(_block_class(c) is _block_class(children[0]) for c in children)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, *, blocks: Iterable[nn.Module] | None = None) -> BlockList:
    """The transformer blocks of `model` (see the module docstring for the search order)."""
    if not isinstance(model, nn.Module):
        raise BlockDiscoveryError(f"expected an nn.Module, got {type(model).__name__}", field="model")
    if blocks is not None:
        mods = tuple(blocks)
        if not mods:
            raise BlockDiscoveryError("the explicit block list is empty", field="blocks")
        owned = {id(m) for m in model.modules()}
        for i, m in enumerate(mods):
            if not isinstance(m, nn.Module):
                raise BlockDiscoveryError(
                    f"blocks[{i}] is a {type(m).__name__}, not an nn.Module", field="blocks"
                )
            if id(m) not in owned:
                raise BlockDiscoveryError(
                    f"blocks[{i}] ({type(m).__name__}) is not a submodule of the model", field="blocks"
                )
        if len({id(m) for m in mods}) != len(mods):
            raise BlockDiscoveryError("the same module appears twice in the block list", field="blocks")
        return BlockList(path="<explicit>", modules=mods)

    for path in KNOWN_BLOCK_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and _homogeneous(found):
            return BlockList(path=path, modules=tuple(found))

    best: tuple[int, int] | None = None
    best_name, best_mod = "", None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2 and _homogeneous(mod):
            score = (_param_count(mod), len(mod))
            if best is None or score > best:  # strict: the first of equal candidates (outermost) wins
                best, best_name, best_mod = score, name, mod
    if best_mod is None:
        raise BlockDiscoveryError(
            f"no transformer blocks found in {type(model).__name__}: none of {', '.join(KNOWN_BLOCK_PATHS)} "
            "is a ModuleList, and no nn.ModuleList/nn.Sequential holds two or more modules of one class; "
            "pass blocks=[...] explicitly",
            field="blocks",
        )
    return BlockList(path=best_name, modules=tuple(best_mod.children()))


def block_names(model: nn.Module, blocks: Sequence[nn.Module]) -> list[str]:
    """Qualified names of `blocks` inside `model` (for messages)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names.get(id(b), f"<block {i}>") for i, b in enumerate(blocks)]
