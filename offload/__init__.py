"""memtier runtime: carries out a Plan on an unmodified PyTorch model (swap/recompute hooks, tier stores,
optimizer-state offload)."""

# NOTE: `offload.apply` is the function, not the submodule of the same name (import the handle type with
# `from offload.apply import OffloadHandle`). Imported eagerly so a later `import offload.apply` cannot
# rebind the attribute to the module.
from offload.apply import OffloadHandle, apply

__all__ = ["OffloadHandle", "apply"]
