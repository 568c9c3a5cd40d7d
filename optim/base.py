"""The base class of the low-memory optimizers: AdamW whose moments live in a per-parameter subspace.

:class:`SubspaceAdamW` owns ``step()``, the per-parameter step used by layer-wise updates, state
initialisation, the projection refresh schedule and what happens to the state when the subspace changes.
A variant overrides one small hook:

- GaLore (:class:`optim.galore.GaLoreAdamW`) is the base behaviour;
- Natural GaLore overrides :meth:`SubspaceAdamW._precondition` (Woodbury natural gradient);
- FRUGAL overrides the hooks that choose the subspace (``_mode``, ``_rank``, ``_new_basis``, and
  ``_moment_step`` for blocks) and :meth:`SubspaceAdamW._state_free_update` (the update outside it).

Every parameter is in one of four modes at any step, decided from its shape, its group's settings and the
refresh period (never stored): ``"full"`` (Adam on the whole tensor), ``"left"``/``"right"`` (Adam on
``P^T G`` / ``G Q^T``), ``"empty"`` (no state-full part). ``optimizer.state`` holds only tensors:
``step`` (0-dim float32, as in torch.optim.AdamW), ``exp_avg``/``exp_avg_sq`` and, when projected,
``basis`` (plus ``history`` for Natural GaLore; with ``state_bits=8`` the moments are uint8 codes beside
``absmax1``/``absmax2``/``qmap1``/``qmap2``, `optim.quantized`), so ``state_dict()`` round-trips and a resumed run
continues bit-identically: the random sketches are seeded from ``(seed, group, index, refresh period)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch

from optim import quantized
from optim import state_bytes as sb
from optim.errors import OptimizerConfigError, ProjectionFallbackWarning
from optim.projection import SVD_METHODS, add_projected_back_, compute_basis, project, random_basis
from optim.updates import adam_direction_, adamw_step_

Mode = Literal["full", "left", "right", "empty"]
STATE_ON_REFRESH: tuple[str, ...] = ("keep", "reset", "project")
# "torch": torch.optim.AdamW's arithmetic (eps added to the bias-corrected sqrt(v), decoupled weight decay
# before the update). "galore_torch": the reference GaLore package's (eps added to the uncorrected sqrt(v),
# weight decay applied to the updated parameter), for reproducing its runs.
NUMERICS: tuple[str, ...] = ("torch", "galore_torch")


def _mix_seed(*parts: int) -> int:
    # A deterministic 63-bit mix of small integers (splitmix64-style odd multipliers).
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = ((h ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SubspaceAdamW(torch.optim.Optimizer):
    """AdamW with per-parameter subspace projection, switched on per group by ``group[switch_key]``.

    Parameters in groups without the switch, and 0-d/1-d parameters, get plain AdamW, bit-identical to
    ``torch.optim.AdamW(foreach=False)``. Subclasses define ``switch_key`` and ``kind`` and pass their
    keyword-only hyper-parameters as ``defaults``.
    """

    switch_key: ClassVar[str] = "galore"
    kind: ClassVar[str] = "galore"
    # State tensors that transform like coordinates (x -> T x) or like squared coordinates at a subspace
    # change with ``state_on_refresh="project"``.
    linear_state_keys: ClassVar[tuple[str, ...]] = ("exp_avg",)
    quadratic_state_keys: ClassVar[tuple[str, ...]] = ("exp_avg_sq",)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._param_index: dict[int, tuple[int, int]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        gi = len(self.param_groups)
        if isinstance(param_group, dict) and "rank" in param_group and self.switch_key not in param_group:
            raise OptimizerConfigError(
                f"param_groups[{gi}].{self.switch_key}",
                f"the group sets 'rank' but not '{self.switch_key}'; projection is switched on by "
                f"'{self.switch_key}': True, never by the presence of a rank",
            )
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1], f"param_groups[{gi}]")
        self._param_index.clear()

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        def bad(name: str, msg: str) -> OptimizerConfigError:
            return OptimizerConfigError(f"{where}.{name}", msg)

        lr = group["lr"]
        if isinstance(lr, torch.Tensor) or not lr >= 0.0:
            raise bad("lr", f"must be a non-negative float, got {lr!r}")
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise bad("betas", f"both must be in [0, 1), got {betas!r}")
        if not group["eps"] >= 0.0:
            raise bad("eps", f"must be >= 0, got {group['eps']!r}")
        if not group["weight_decay"] >= 0.0:
            raise bad("weight_decay", f"must be >= 0, got {group['weight_decay']!r}")
        switch = group[self.switch_key]
        if not isinstance(switch, bool):
            raise bad(self.switch_key, f"must be True or False, got {switch!r}")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise bad("update_proj_gap", f"must be an int >= 1, got {gap!r}")
        if group["proj_type"] not in sb.PROJ_TYPES:
            raise bad("proj_type", f"{group['proj_type']!r} is not one of {sb.PROJ_TYPES}")
        if group["svd"] not in SVD_METHODS:
            raise bad("svd", f"{group['svd']!r} is not one of {SVD_METHODS}")
        if group["oversample"] is not None and (
            isinstance(group["oversample"], bool)
            or not isinstance(group["oversample"], int)
            or group["oversample"] < 0
        ):
            raise bad("oversample", f"must be None or an int >= 0, got {group['oversample']!r}")
        for name in ("power_iters", "seed"):
            v = group[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, f"must be an int >= 0, got {v!r}")
        if group["state_on_refresh"] not in STATE_ON_REFRESH:
            raise bad("state_on_refresh", f"{group['state_on_refresh']!r} is not one of {STATE_ON_REFRESH}")
        if group["numerics"] not in NUMERICS:
            raise bad("numerics", f"{group['numerics']!r} is not one of {NUMERICS}")
        if not (isinstance(group["scale"], (int, float)) and group["scale"] > 0):
            raise bad("scale", f"must be a positive float, got {group['scale']!r}")
        bits = group["state_bits"]
        if isinstance(bits, bool) or bits not in quantized.STATE_BITS:
            raise bad("state_bits", f"must be one of {quantized.STATE_BITS}, got {bits!r}")
        if bits and group["numerics"] != "torch":
            raise bad(
                "state_bits", "8-bit states run bitsandbytes' Adam, whose arithmetic is numerics='torch'"
            )
        if bits and group["state_on_refresh"] == "project":
            raise bad("state_bits", "quantized moments cannot be rotated: state_on_refresh 'keep' or 'reset'")
        if bits:
            quantized.require()  # bitsandbytes loads here (OptimizerConfigError naming state_bits if not)
        self._validate_extra(group, bad)

    def _validate_extra(self, group: dict[str, Any], bad: Callable[[str, str], OptimizerConfigError]) -> None:
        """Subclass hook: validate the variant's own group settings."""

    # ------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimizer step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._step_one(p, group, gi, i)
        return loss

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """One optimizer step for a single parameter (the layer-wise update calls this from a grad hook)."""
        if param.grad is None:
            return
        gi, i = self._locate(param)
        self._step_one(param, self.param_groups[gi], gi, i)

    def _locate(self, param: torch.Tensor) -> tuple[int, int]:
        if not self._param_index:
            for gi, group in enumerate(self.param_groups):
                for i, p in enumerate(group["params"]):
                    self._param_index[id(p)] = (gi, i)
        try:
            return self._param_index[id(param)]
        except KeyError:
            raise OptimizerConfigError("param", "the tensor is not a parameter of this optimizer") from None

    def _is_projected(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return bool(group[self.switch_key]) and p.dim() >= 2

    def _step_one(self, p: torch.Tensor, group: dict[str, Any], gi: int, i: int) -> None:
        grad = p.grad
        assert grad is not None  # callers check; kept for the type checker
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        step_before = int(state["step"].item())
        state["step"] += 1
        lr = group["lr"]
        weight_decay = group["weight_decay"]
        torch_numerics = group["numerics"] == "torch"

        if not self._is_projected(p, group):
            self._adam_whole_tensor(p, grad, state, group, step=float(step_before + 1), lr=lr)
            return

        gap = group["update_proj_gap"]
        period = step_before // gap
        if step_before % gap == 0:
            self._refresh(p, grad, group, gi, i, state, period)
        mode = self._mode(p, group, gi, i, period)
        if weight_decay != 0 and torch_numerics:
            p.mul_(1 - lr * weight_decay)
        scaled_lr = lr * group["scale"]

        low: torch.Tensor | None = None
        basis: torch.Tensor | None = None
        if mode == "full":
            moment_step = self._moment_step(group, state, mode, step_before)
            self._adam_whole_tensor(p, grad, state, group, step=moment_step, lr=scaled_lr, decay=False)
        elif mode in ("left", "right"):
            basis = state["basis"]
            low = project(grad.reshape(basis_rows_cols(p)), basis, mode)
            conditioned = self._precondition(low, group, state, step_before)
            moment_step = self._moment_step(group, state, mode, step_before)
            direction, multiplier = self._adam_direction(conditioned, state, group, step=moment_step)
            add_projected_back_(p, direction, basis, mode, alpha=-scaled_lr * multiplier)
        self._state_free_update(p, grad, low, basis, mode, group)
        if weight_decay != 0 and not torch_numerics:
            p.add_(p, alpha=-lr * weight_decay)

    def _adam_whole_tensor(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        *,
        step: float,
        lr: float,
        decay: bool = True,
    ) -> None:
        """Adam on the whole tensor: bit-identical to torch.optim.AdamW, or galore-torch's AdamW (or
        bitsandbytes' 8-bit Adam with ``state_bits=8``, `optim.quantized`)."""
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"] if decay else 0.0
        if quantized.quantizes(p.numel(), group.get("state_bits", 0)):
            quantized.adam_step_8bit_(
                p, grad, state, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=weight_decay,
            )  # fmt: skip
            return
        self._ensure_moments(state, p)
        if group["numerics"] == "torch":
            adamw_step_(
                p, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=lr,
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=weight_decay,
            )  # fmt: skip
            return
        direction, multiplier = adam_direction_(
            grad, state["exp_avg"], state["exp_avg_sq"], step=step,
            beta1=beta1, beta2=beta2, eps=group["eps"], eps_on_corrected=False,
        )  # fmt: skip
        p.add_(direction, alpha=-lr * multiplier)
        if weight_decay != 0:
            p.add_(p, alpha=-group["lr"] * weight_decay)

    def _adam_direction(
        self, low: torch.Tensor, state: dict[str, Any], group: dict[str, Any], *, step: float
    ) -> tuple[torch.Tensor, float]:
        """Adam's moments updated with the projected gradient; ``(d, c)`` with the step ``-lr * c * d``."""
        beta1, beta2 = group["betas"]
        if quantized.quantizes(low.numel(), group.get("state_bits", 0)):
            return quantized.adam_direction_8bit_(
                low, state, step=step, beta1=beta1, beta2=beta2, eps=group["eps"]
            )
        self._ensure_moments(state, low)
        return adam_direction_(
            low, state["exp_avg"], state["exp_avg_sq"], step=step, beta1=beta1, beta2=beta2,
            eps=group["eps"], eps_on_corrected=group["numerics"] == "torch",
        )  # fmt: skip

    @staticmethod
    def _ensure_moments(state: dict[str, Any], like: torch.Tensor) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ the refresh

    def _refresh(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        group: dict[str, Any],
        gi: int,
        i: int,
        state: dict[str, Any],
        period: int,
    ) -> None:
        """Choose the subspace for refresh period ``period`` and carry the state over to it."""
        old_mode = self._mode(p, group, gi, i, period - 1) if period > 0 else None
        new_mode = self._mode(p, group, gi, i, period)
        old_basis: torch.Tensor | None = state.pop("basis", None)
        new_basis: torch.Tensor | None = None
        if new_mode in ("left", "right"):
            rows, cols = basis_rows_cols(p)
            rank = self._rank(group, rows, cols, new_mode)
            g2d = grad.reshape(rows, cols)
            if not bool(torch.isfinite(g2d).all()):
                where = (
                    f"parameter {tuple(p.shape)} (group {gi}, index {i}) at step {int(state['step'].item())}"
                )
                if old_basis is not None:
                    warnings.warn(
                        f"non-finite gradient for {where}: keeping the previous projection",
                        ProjectionFallbackWarning,
                        stacklevel=4,
                    )
                    new_basis = old_basis
                else:
                    warnings.warn(
                        f"non-finite gradient for {where}: no previous projection, using a random orthonormal one",
                        ProjectionFallbackWarning,
                        stacklevel=4,
                    )
                    new_basis = random_basis(
                        rows, cols, rank, new_mode, generator=self._generator(group, gi, i, period)
                    )
            else:
                new_basis = self._new_basis(g2d, rank, new_mode, group, gi, i, period)
            new_basis = new_basis.to(device=p.device, dtype=p.dtype)

        if old_mode != new_mode or self._resets_at_refresh(group, new_mode):
            # A different kind of subspace, or a reset, starts from zero moments (re-created lazily at
            # the next update); for a FRUGAL block that became state-free this frees them.
            self._drop_subspace_state(state)
        elif group["state_on_refresh"] == "project" and old_basis is not None and new_basis is not None:
            self._rotate_state(state, old_basis, new_basis, new_mode)
        # else "keep": the moments stay as they are, now read in the new basis (GaLore's behaviour).
        if new_basis is not None:
            state["basis"] = new_basis

    @staticmethod
    def _drop_subspace_state(state: dict[str, Any]) -> None:
        # Everything but the step counter (and the basis, which the refresh replaces) belongs to the
        # subspace: moments, Natural GaLore's history, a block's own step count.
        for key in [k for k in state if k not in ("step", "basis")]:
            del state[key]

    def _rotate_state(self, state: dict[str, Any], old: torch.Tensor, new: torch.Tensor, side: Mode) -> None:
        # Coordinates in the old basis mapped to the new one: left x_new = (P_new^T P_old) x_old,
        # right x_new = x_old (Q_old Q_new^T). Second moments are treated as the diagonal of a covariance
        # with independent coordinates, so they map with the element-wise square of the same matrix.
        if side == "left":
            t = new.t() @ old
            for key in self.linear_state_keys:
                if key in state:
                    state[key] = torch.matmul(t, state[key])
            for key in self.quadratic_state_keys:
                if key in state:
                    state[key] = torch.matmul(t * t, state[key])
        else:
            t = old @ new.t()
            for key in self.linear_state_keys:
                if key in state:
                    state[key] = torch.matmul(state[key], t)
            for key in self.quadratic_state_keys:
                if key in state:
                    state[key] = torch.matmul(state[key], t * t)

    def _generator(self, group: dict[str, Any], gi: int, i: int, period: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix_seed(group["seed"], gi, i, period))

    # ------------------------------------------------------------------ hooks

    def _mode(self, p: torch.Tensor, group: dict[str, Any], gi: int, i: int, period: int) -> Mode:
        """The parameter's mode in refresh period ``period`` (GaLore: the projected side, always)."""
        rows, cols = basis_rows_cols(p)
        return sb.projection_side(rows, cols, group["proj_type"])

    def _resets_at_refresh(self, group: dict[str, Any], mode: Mode) -> bool:
        """Whether a refresh zeroes the moments of a parameter in ``mode``.

        Only a projected subspace changes at a refresh; a whole tensor (``full``) keeps its coordinates.
        """
        return group["state_on_refresh"] == "reset" and mode in ("left", "right")

    def _moment_step(
        self, group: dict[str, Any], state: dict[str, Any], mode: Mode, step_before: int
    ) -> float:
        """The step count for Adam's bias correction: from the last reset, so a reset restarts the warm-up."""
        if self._resets_at_refresh(group, mode):
            return float(step_before % group["update_proj_gap"] + 1)
        return float(step_before + 1)

    def _rank(self, group: dict[str, Any], rows: int, cols: int, side: Mode) -> int:
        """The rank of a projected parameter (GaLore: ``rank`` clamped to the matrix)."""
        return sb.galore_rank(group["rank"], rows, cols)

    def _new_basis(
        self, grad: torch.Tensor, rank: int, side: Mode, group: dict[str, Any], gi: int, i: int, period: int
    ) -> torch.Tensor:
        """A new basis for a finite 2-D gradient (GaLore: leading singular vectors)."""
        return compute_basis(
            grad, rank, side, method=group["svd"], oversample=group["oversample"],  # type: ignore[arg-type]
            power_iters=group["power_iters"], generator=self._generator(group, gi, i, period),
        )  # fmt: skip

    def _precondition(
        self, low: torch.Tensor, group: dict[str, Any], state: dict[str, Any], step_before: int
    ) -> torch.Tensor:
        """Transform the low-rank gradient before the Adam moments see it (GaLore: identity)."""
        return low

    def _state_free_update(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        low: torch.Tensor | None,
        basis: torch.Tensor | None,
        mode: Mode,
        group: dict[str, Any],
    ) -> None:
        """Update the part of the gradient outside the subspace (GaLore: none, it is dropped)."""

    # ------------------------------------------------------------------ memory accounting

    def state_bytes(self) -> int:
        """Bytes held by the optimizer's state tensors, measured from the tensors themselves."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    def expected_state_bytes(self) -> int:
        """The same total from :func:`optim.state_bytes.expected_state_bytes`, for every stepped parameter."""
        total = 0
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state or "step" not in state:
                    continue
                period = (int(state["step"].item()) - 1) // group["update_proj_gap"]
                total += sb.expected_state_bytes(
                    self.kind,
                    tuple(p.shape),
                    dtype_bytes=p.element_size(),
                    projected=bool(group[self.switch_key]),
                    **self._formula_settings(p, group, gi, i, period),
                )
        return total

    def _formula_settings(
        self, p: torch.Tensor, group: dict[str, Any], gi: int, i: int, period: int
    ) -> dict[str, Any]:
        return {
            "rank": group["rank"],
            "proj_type": group["proj_type"],
            "state_bits": group.get("state_bits", 0),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            quantized.restore_codes_(state)  # (torch cast the 8-bit codes to the parameter's dtype)
        self._param_index.clear()


def basis_rows_cols(p: torch.Tensor) -> tuple[int, int]:
    """The 2-D view of a parameter used for projection (``optim.state_bytes.matrix_shape``)."""
    shape = sb.matrix_shape(tuple(p.shape))
    if shape is None:
        return p.numel(), 1
    return shape


def common_defaults(
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
    svd: str,
    oversample: int | None,
    power_iters: int,
    state_on_refresh: str,
    seed: int,
    numerics: str,
    state_bits: int = 0,
) -> dict[str, Any]:
    """The group defaults every variant shares (validated per group by ``SubspaceAdamW``)."""
    return {
        "lr": lr,
        "betas": tuple(betas),
        "eps": eps,
        "weight_decay": weight_decay,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
        "svd": svd,
        "oversample": oversample,
        "power_iters": power_iters,
        "state_on_refresh": state_on_refresh,
        "seed": seed,
        "numerics": numerics,
        "state_bits": state_bits,
    }
