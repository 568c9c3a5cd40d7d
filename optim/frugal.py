"""FRUGAL: Full-Rank Updates with GrAdient spLitting.

Zmushko, Beznosikov, Takac & Horvath 2024 (arXiv 2411.07837), Alg. 1: split each gradient into a
state-full part in a low-dimensional subspace, updated by Adam whose moments live in that subspace, and
the state-free remainder, updated by signSGD or SGD, so the weight update is full-rank while the state
covers only ``density`` of the entries. The subspace is refreshed every ``update_proj_gap`` steps.

Subspace choices (``projection``):

- ``"svd"``: the leading singular vectors of the gradient, as GaLore (FRUGAL's ``GaloreOptimizer``);
- ``"random"``: a random orthonormal basis (FRUGAL's ``proj_type="random"``);
- ``"blockwise"``: whole tensors, ``round(density * n)`` of the group's ``n`` at a time, chosen by
  ``block_order`` (BAdam-style, Luo et al. 2024; FRUGAL's ``BlockOptimizer``). Blocks are the group's
  tensors, i.e. one per module weight.

State at a subspace change (``state_on_refresh``), the options the paper compares: ``"reset"`` (FRUGAL's
default), ``"keep"`` (GaLore's behaviour), ``"project"`` (map the moments onto the new basis). Blocks
have no such choice: a block that goes state-free loses its state (that is the memory saving), a block
that becomes state-full starts from zero, and a block that stays state-full keeps its state.

# NOTE: FRUGAL's reference code also resets a block that is chosen again for the next period; here its
# coordinates did not change, so its state is kept. This is what makes density 1 equal AdamW.

Density 1 means the whole space in the parameter's own coordinates (Adam on the tensor, no rotation),
so FRUGAL at density 1 is AdamW; density 0 means no state-full part, so it is the state-free optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from optim import state_bytes as sb
from optim.base import Mode, SubspaceAdamW, basis_rows_cols, common_defaults
from optim.projection import compute_basis, random_basis, residual_after_projection
from optim.updates import state_free_step_

STATE_FREE_RULES: tuple[str, ...] = ("sign_sgd", "sgd")


class FRUGAL(SubspaceAdamW):
    """FRUGAL with Adam as the state-full optimizer. Splitting is on for groups with ``frugal=True``.

    Args:
        params: parameters or parameter groups; a group switches FRUGAL on with ``"frugal": True`` and may
            override any keyword below. Other groups get plain AdamW.
        lr, betas, eps, weight_decay: the state-full AdamW's (weight decay applies to the whole tensor).
        frugal: default for groups that do not say.
        density: fraction of each matrix (or of the group's blocks) that is state-full, in [0, 1].
        update_proj_gap: steps between subspace refreshes (FRUGAL's ``T``).
        projection: ``"svd"``, ``"random"`` or ``"blockwise"``.
        state_free: ``"sign_sgd"`` or ``"sgd"``, the update of the remaining directions.
        state_free_lr_scale: the state-free learning rate is ``lr * state_free_lr_scale``.
        scale: multiplier on the state-full update's learning rate (FRUGAL's ``proj_params_lr_scale``).
        state_on_refresh: ``"reset"``, ``"keep"`` or ``"project"`` (``svd``/``random`` only, see above).
        proj_type: projected side for ``svd``/``random`` (see ``optim.state_bytes.projection_side``).
        block_order: ``"random"``, ``"ascending"`` or ``"descending"`` for ``blockwise``.
        svd, oversample, power_iters: how the ``svd`` projection is computed (as in GaLoreAdamW).
        seed: seeds random bases, randomized sketches and random block choices.
        numerics: ``"torch"`` or ``"galore_torch"`` arithmetic for the Adam part (see ``optim.base.NUMERICS``).
        state_bits: 0 or 8: the state-full Adam moments in 8 bits (as GaLoreAdamW's ``state_bits``).
    """

    switch_key: ClassVar[str] = "frugal"
    kind: ClassVar[str] = "frugal"

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        frugal: bool = False,
        density: float = 0.25,
        update_proj_gap: int = 200,
        projection: str = "svd",
        state_free: str = "sign_sgd",
        state_free_lr_scale: float = 1.0,
        scale: float = 1.0,
        state_on_refresh: str = "reset",
        proj_type: str = "std",
        block_order: str = "random",
        svd: str = "randomized",
        oversample: int | None = None,
        power_iters: int = 2,
        seed: int = 0,
        numerics: str = "torch",
        state_bits: int = 0,
    ) -> None:
        defaults = common_defaults(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
            scale=scale, proj_type=proj_type, svd=svd, oversample=oversample, power_iters=power_iters,
            state_on_refresh=state_on_refresh, seed=seed, numerics=numerics, state_bits=state_bits,
        )  # fmt: skip
        defaults.update(
            frugal=frugal, density=density, projection=projection, state_free=state_free,
            state_free_lr_scale=state_free_lr_scale, block_order=block_order,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate_extra(self, group: dict[str, Any], bad: Any) -> None:
        density = group["density"]
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
            raise bad("density", f"must be in [0, 1], got {density!r}")
        if group["projection"] not in sb.FRUGAL_PROJECTIONS:
            raise bad("projection", f"{group['projection']!r} is not one of {sb.FRUGAL_PROJECTIONS}")
        if group["state_free"] not in STATE_FREE_RULES:
            raise bad("state_free", f"{group['state_free']!r} is not one of {STATE_FREE_RULES}")
        if not (isinstance(group["state_free_lr_scale"], (int, float)) and group["state_free_lr_scale"] >= 0):
            raise bad("state_free_lr_scale", f"must be >= 0, got {group['state_free_lr_scale']!r}")
        if group["block_order"] not in sb.BLOCK_ORDERS:
            raise bad("block_order", f"{group['block_order']!r} is not one of {sb.BLOCK_ORDERS}")

    def _is_projected(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        if not group["frugal"]:
            return False
        return group["projection"] == "blockwise" or p.dim() >= 2

    def _mode(self, p: torch.Tensor, group: dict[str, Any], gi: int, i: int, period: int) -> Mode:
        if group["projection"] == "blockwise":
            active = sb.active_blocks(
                len(group["params"]), group["density"], period, order=group["block_order"], seed=group["seed"]
            )
            return "full" if i in active else "empty"
        rows, cols = basis_rows_cols(p)
        side = sb.projection_side(rows, cols, group["proj_type"])
        rank = sb.frugal_rank(group["density"], rows, cols, side)
        if rank == sb.reduced_dim(rows, cols, side):
            return "full"
        if rank == 0:
            return "empty"
        return side

    def _rank(self, group: dict[str, Any], rows: int, cols: int, side: Mode) -> int:
        return sb.frugal_rank(group["density"], rows, cols, side)  # type: ignore[arg-type]

    def _moment_step(
        self, group: dict[str, Any], state: dict[str, Any], mode: Mode, step_before: int
    ) -> float:
        if group["projection"] != "blockwise":
            return super()._moment_step(group, state, mode, step_before)
        # A block counts its own steps since it became state-full: it may stay active for several periods
        # (always, at density 1), and its state is dropped when it goes inactive.
        if "moment_step" not in state:
            state["moment_step"] = torch.zeros((), dtype=torch.float32)
        state["moment_step"] += 1
        return float(state["moment_step"].item())

    def _new_basis(
        self, grad: torch.Tensor, rank: int, side: Mode, group: dict[str, Any], gi: int, i: int, period: int
    ) -> torch.Tensor:
        rows, cols = grad.shape
        generator = self._generator(group, gi, i, period)
        if group["projection"] == "random":
            return random_basis(rows, cols, rank, side, generator=generator)  # type: ignore[arg-type]
        return compute_basis(
            grad, rank, side, method=group["svd"], oversample=group["oversample"],  # type: ignore[arg-type]
            power_iters=group["power_iters"], generator=generator,
        )  # fmt: skip

    def _state_free_update(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        low: torch.Tensor | None,
        basis: torch.Tensor | None,
        mode: Mode,
        group: dict[str, Any],
    ) -> None:
        if mode == "full":
            return
        lr = group["lr"] * group["state_free_lr_scale"]
        if mode == "empty":
            state_free_step_(p, grad, lr=lr, rule=group["state_free"])
            return
        assert low is not None and basis is not None  # set by the base for left/right modes
        # The residual g - P P^T g (or g - g Q^T Q): the part of the gradient the subspace does not hold.
        residual = residual_after_projection(grad.reshape(basis_rows_cols(p)), low, basis, mode)
        state_free_step_(p, residual.view_as(p), lr=lr, rule=group["state_free"])

    def _formula_settings(
        self, p: torch.Tensor, group: dict[str, Any], gi: int, i: int, period: int
    ) -> dict[str, Any]:
        active = True
        if group["projection"] == "blockwise":
            active = self._mode(p, group, gi, i, period) == "full"
        return {
            "density": group["density"],
            "projection": group["projection"],
            "proj_type": group["proj_type"],
            "active": active,
            "state_bits": group.get("state_bits", 0),  # (a checkpoint from before state_bits has none)
        }
