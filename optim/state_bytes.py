"""Optimizer-state size as a pure function of a parameter's shape and the optimizer settings.

This module imports nothing from torch: the planner's memory model reproduces these formulas (it may not
import ``optim``) and a cross-check test holds the two together. Every optimizer in ``optim`` has a
``state_bytes()`` method that measures its actual state tensors; ``tests/optim/test_state_bytes.py``
asserts that the measurement equals :func:`expected_state_bytes` for every kind and setting.

The rules that decide a tensor's shape (which side GaLore projects, how a FRUGAL density becomes a rank,
which FRUGAL blocks are active) live here too, so the optimizers and the formula share one definition.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from typing import Any, Literal

from optim.errors import OptimizerConfigError

OptimizerKind = Literal["adamw", "galore", "natural_galore", "frugal"]
ProjType = Literal["std", "reverse_std", "left", "right"]
Side = Literal["left", "right"]
FrugalProjection = Literal["svd", "random", "blockwise"]

OPTIMIZER_KINDS: tuple[str, ...] = ("adamw", "galore", "natural_galore", "frugal")
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right")
FRUGAL_PROJECTIONS: tuple[str, ...] = ("svd", "random", "blockwise")

# The per-parameter step counter is a 0-dim float32 tensor, as torch.optim.AdamW stores it.
STEP_BYTES = 4


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """The 2-D view a projected optimizer uses for a parameter: ``(shape[0], prod(shape[1:]))``.

    Returns None for 0-d and 1-d parameters (biases, norms), which every optimizer here updates with plain
    AdamW.
    """
    if len(shape) < 2:
        return None
    cols = 1
    for d in shape[1:]:
        cols *= int(d)
    return int(shape[0]), cols


def projection_side(rows: int, cols: int, proj_type: str) -> Side:
    """Which side of a ``rows x cols`` gradient is projected.

    ``"left"`` keeps ``P^T G`` (``r x cols``, basis ``rows x r``); ``"right"`` keeps ``G Q^T`` (``rows x r``,
    basis ``r x cols``). ``"std"`` projects the shorter side so the basis is the small factor, as in GaLore's
    reference projector (Zhao et al. 2024, ``GaLoreProjector`` proj_type ``std``: right when rows >= cols).
    """
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    if proj_type in ("left", "right"):
        return "left" if proj_type == "left" else "right"
    raise OptimizerConfigError("proj_type", f"{proj_type!r} is not one of {PROJ_TYPES}")


def reduced_dim(rows: int, cols: int, side: Side) -> int:
    """The dimension a projection of ``side`` reduces to the rank: rows for left, cols for right."""
    return rows if side == "left" else cols


def low_rank_shape(rows: int, cols: int, rank: int, side: Side) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments kept for it)."""
    return (rank, cols) if side == "left" else (rows, rank)


def basis_shape(rows: int, cols: int, rank: int, side: Side) -> tuple[int, int]:
    """Shape of the stored orthonormal basis: ``rows x r`` (left) or ``r x cols`` (right)."""
    return (rows, rank) if side == "left" else (rank, cols)


def galore_rank(rank: int, rows: int, cols: int) -> int:
    """GaLore's rank clamped to the matrix: a rank above min(rows, cols) cannot be represented."""
    return max(1, min(int(rank), rows, cols))


def round_half_up(x: float) -> int:
    """Deterministic rounding (Python's round() rounds half to even)."""
    return int(math.floor(x + 0.5))


def frugal_rank(density: float, rows: int, cols: int, side: Side) -> int:
    """FRUGAL's state-full rank: the fraction ``density`` of the reduced dimension.

    With ``r = density * reduced_dim`` the state-full coordinates are ``density`` of the matrix's entries,
    which is how FRUGAL (Zmushko et al. 2024, sec. 4) defines density.
    """
    d = reduced_dim(rows, cols, side)
    return min(d, max(0, round_half_up(density * d)))


def num_active_blocks(density: float, num_blocks: int) -> int:
    """How many blocks (parameter tensors) a blockwise FRUGAL keeps state-full (FRUGAL: round(n * density))."""
    return min(num_blocks, max(0, round_half_up(density * num_blocks)))


# 8-bit moments (optim.quantized, bitsandbytes' blockwise format, Dettmers et al. 2022): one byte per element,
# an fp32 absmax per 256 elements and a 256-entry fp32 code-book per moment; moments under 4096 elements
# stay unquantized. planner.optimizer_state.LOW_BIT_FORMATS[8] holds the same numbers.
QUANT_BLOCK, QUANT_CODES, QUANT_MIN_ELEMENTS = 256, 256, 4096


def moment_bytes(numel: int, dtype_bytes: int, state_bits: int = 0) -> int:
    """Bytes of one Adam moment of ``numel`` elements: the dtype's, or 8-bit blockwise-quantized."""
    if state_bits == 8 and numel >= QUANT_MIN_ELEMENTS:
        return numel + 4 * (-(-numel // QUANT_BLOCK)) + 4 * QUANT_CODES
    return numel * dtype_bytes


def _adamw_bytes(numel: int, dtype_bytes: int, state_bits: int = 0) -> int:
    # AdamW: exp_avg + exp_avg_sq, each the parameter's size (Loshchilov & Hutter 2019), plus the step.
    return 2 * moment_bytes(numel, dtype_bytes, state_bits) + STEP_BYTES


def expected_state_bytes(
    kind: str,
    shape: Sequence[int],
    *,
    dtype_bytes: int = 4,
    projected: bool = True,
    rank: int = 128,
    proj_type: str = "std",
    history_size: int = 10,
    density: float = 0.25,
    projection: str = "svd",
    active: bool = True,
    state_bits: int = 0,
) -> int:
    """Bytes of optimizer state that one parameter of ``shape`` holds after its first step.

    Args:
        kind: ``"adamw"``, ``"galore"``, ``"natural_galore"`` or ``"frugal"``.
        shape: the parameter's shape.
        dtype_bytes: bytes per element of the parameter (moments, bases and history use its dtype).
        projected: whether the parameter sits in a group with the projection switched on
            (``galore=True`` / ``frugal=True``); a parameter outside such a group gets AdamW state.
        rank: GaLore / Natural GaLore rank (clamped to the matrix).
        proj_type: which side is projected (see :func:`projection_side`).
        history_size: Natural GaLore's number of stored low-rank gradients ``s``.
        density: FRUGAL's state-full fraction.
        projection: FRUGAL's subspace choice, ``"svd"``, ``"random"`` or ``"blockwise"``.
        active: for blockwise FRUGAL, whether this parameter is one of the state-full blocks right now.
        state_bits: 0, or 8 for blockwise-quantized moments (:func:`moment_bytes`; bases and history keep
            ``dtype_bytes``).

    Formulas (elements; times ``dtype_bytes``, plus a 4-byte step counter for every kind):
        adamw:          2 * m * n
        galore:         2 * r * (kept dim) + r * (reduced dim)        moments + basis (Zhao et al. 2024, sec. 4.2)
        natural_galore: galore + s * r * (kept dim)                   + history of s low-rank gradients
        frugal svd/random: like galore with r = density * reduced dim; r = reduced dim means the whole
                        space (plain AdamW, no basis) and r = 0 means no state-full part (step only)
        frugal blockwise: active block: 2 * numel (+ its own step count); inactive block: step only
    """
    if kind not in OPTIMIZER_KINDS:
        raise OptimizerConfigError("kind", f"{kind!r} is not one of {OPTIMIZER_KINDS}")
    if dtype_bytes <= 0:
        raise OptimizerConfigError("dtype_bytes", f"must be positive, got {dtype_bytes}")
    numel = 1
    for d in shape:
        numel *= int(d)
    bits = state_bits
    if kind == "adamw" or not projected:
        return _adamw_bytes(numel, dtype_bytes, bits)
    if kind == "frugal" and projection == "blockwise":
        # An active block also counts its own steps since activation (a second 4-byte scalar).
        return _adamw_bytes(numel, dtype_bytes, bits) + STEP_BYTES if active else STEP_BYTES
    if kind == "frugal" and projection not in FRUGAL_PROJECTIONS:
        raise OptimizerConfigError("projection", f"{projection!r} is not one of {FRUGAL_PROJECTIONS}")
    mat = matrix_shape(shape)
    if mat is None:
        return _adamw_bytes(numel, dtype_bytes, bits)
    rows, cols = mat
    side = projection_side(rows, cols, proj_type)
    if kind == "frugal":
        r = frugal_rank(density, rows, cols, side)
        if r == reduced_dim(rows, cols, side):
            return _adamw_bytes(numel, dtype_bytes, bits)
        if r == 0:
            return STEP_BYTES
    else:
        r = galore_rank(rank, rows, cols)
    lr_rows, lr_cols = low_rank_shape(rows, cols, r, side)
    b_rows, b_cols = basis_shape(rows, cols, r, side)
    elements = b_rows * b_cols
    if kind == "natural_galore":
        elements += history_size * lr_rows * lr_cols
    return 2 * moment_bytes(lr_rows * lr_cols, dtype_bytes, bits) + elements * dtype_bytes + STEP_BYTES


def total_expected_state_bytes(
    kind: str,
    shapes: Sequence[Sequence[int]],
    **settings: Any,
) -> int:
    """Sum of :func:`expected_state_bytes` over parameter shapes with one set of settings."""
    return sum(expected_state_bytes(kind, s, **settings) for s in shapes)


BLOCK_ORDERS: tuple[str, ...] = ("random", "ascending", "descending")


@functools.lru_cache(maxsize=256)
def active_blocks(
    num_blocks: int, density: float, refresh_index: int, *, order: str, seed: int
) -> frozenset[int]:
    """Indices of the state-full blocks of a blockwise FRUGAL group for one refresh period.

    A pure function of its arguments, so every parameter can compute its own status inside a layer-wise
    hook and a resumed run picks the same blocks (cached: every parameter of a group asks each step). ``ascending``/``descending`` walk through the blocks in
    order, ``k`` at a time, wrapping around (BAdam's block cycling, Luo et al. 2024); ``random`` draws ``k``
    blocks without replacement from a generator seeded by ``(seed, refresh_index)``.
    """
    if order not in BLOCK_ORDERS:
        raise OptimizerConfigError("block_order", f"{order!r} is not one of {BLOCK_ORDERS}")
    k = num_active_blocks(density, num_blocks)
    if k == 0 or num_blocks == 0:
        return frozenset()
    if order == "random":
        rng = random.Random(seed * 1_000_003 + refresh_index)
        return frozenset(rng.sample(range(num_blocks), k))
    start = (refresh_index * k) % num_blocks
    if order == "ascending":
        return frozenset((start + i) % num_blocks for i in range(k))
    return frozenset((num_blocks - 1 - start - i) % num_blocks for i in range(k))
