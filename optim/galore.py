"""GaLore AdamW: Adam moments kept for a low-rank projection of each matrix gradient.

Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (arXiv
2403.03507), Alg. 2: every ``update_proj_gap`` steps the projection is refreshed from the current gradient's
leading singular vectors; in between, the gradient is projected (``P^T G`` or ``G Q^T``), Adam runs on
the ``r``-row/column result, and the normalised step is projected back and scaled by ``scale``.

Departures from the reference ``galore-torch`` package, each deliberate:

- switched on by ``galore=True`` in a parameter group (a group that only sets ``rank`` is rejected);
- 0-d/1-d parameters in a GaLore group get plain AdamW instead of failing;
- by default torch.optim.AdamW's arithmetic: eps added to the bias-corrected ``sqrt(v)`` and decoupled
  weight decay before the update (galore-torch adds eps to the uncorrected ``sqrt(v)`` and decays the
  updated parameter); ``numerics="galore_torch"`` reproduces the reference's arithmetic;
- the projector is a state tensor (``state["basis"]``), so ``state_dict()`` round-trips;
- the refresh can use a randomized range finder (default) instead of a full SVD, and survives
  non-finite or rank-deficient gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from optim.base import SubspaceAdamW, common_defaults


class GaLoreAdamW(SubspaceAdamW):
    """GaLore AdamW. Projection is on for parameter groups with ``galore=True``.

    Args:
        params: parameters or parameter groups; a group switches GaLore on with ``"galore": True`` and may
            override any keyword below.
        lr, betas, eps, weight_decay: AdamW's, with ``torch.optim.AdamW``'s meaning.
        galore: default for groups that do not say (False: only explicit groups are projected).
        rank: projection rank ``r`` (clamped to the matrix).
        update_proj_gap: refresh the projection every this many steps of the parameter (GaLore's ``T``).
        scale: multiplier on the projected-back update (GaLore's ``alpha``). The default 1.0 suits AdamW's
            learning rate; the paper's recipe is ``scale=0.25`` with a 10x larger ``lr`` (0.01).
        proj_type: which side to project, ``"std"`` (the shorter side, GaLore's default), ``"reverse_std"``,
            ``"left"`` or ``"right"``.
        svd: ``"randomized"`` (range finder, fast) or ``"exact"`` (``torch.linalg.svd``, as galore-torch).
        oversample, power_iters: the randomized range finder's extra sketch columns (None: as many as the
            rank) and power iterations.
        state_on_refresh: ``"keep"`` the moments across a refresh (GaLore), ``"reset"`` them, or
            ``"project"`` them onto the new basis.
        seed: seeds the randomized sketches (with the parameter's position and the refresh period).
        numerics: ``"torch"`` (torch.optim.AdamW's eps placement and weight-decay order) or
            ``"galore_torch"`` (the reference package's), see ``optim.base.NUMERICS``.
        state_bits: 0 (moments in the parameter's dtype) or 8: moments of 4096 elements or more, the projected
            ones and the whole-tensor ones alike, in bitsandbytes' blockwise 8-bit format (`optim.quantized`,
            galore-torch's ``GaLoreAdamW8bit``); the basis stays in the parameter's dtype.
    """

    switch_key: ClassVar[str] = "galore"
    kind: ClassVar[str] = "galore"

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        galore: bool = False,
        rank: int = 128,
        update_proj_gap: int = 200,
        # GaLore's published recipe (Zhao et al. 2024, and the galore-torch scripts) is scale 0.25 with lr
        # 0.01, against full-rank AdamW at lr 1e-3: a projected step 2.5x AdamW's. Users give this optimizer
        # AdamW's lr, where 0.25 moves the projected weights a quarter as far. Measured by
        # benchmarks/optimizer_convergence.py (7.3M Llama, byte corpus, 300 steps, lr 1e-3, rank 96): final
        # loss 1.76x AdamW's with 0.25, 0.95x with 1.0 (AdamW's step size on the projected coordinates).
        scale: float = 1.0,
        proj_type: str = "std",
        svd: str = "randomized",
        oversample: int | None = None,
        power_iters: int = 2,
        state_on_refresh: str = "keep",
        seed: int = 0,
        numerics: str = "torch",
        state_bits: int = 0,
    ) -> None:
        defaults = common_defaults(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
            scale=scale, proj_type=proj_type, svd=svd, oversample=oversample, power_iters=power_iters,
            state_on_refresh=state_on_refresh, seed=seed, numerics=numerics, state_bits=state_bits,
        )  # fmt: skip
        defaults.update(galore=galore, rank=rank)
        super().__init__(params, defaults)

    def _validate_extra(self, group: dict[str, Any], bad: Any) -> None:
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise bad("rank", f"must be an int >= 1, got {rank!r}")
