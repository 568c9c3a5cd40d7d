"""Every optimizer's measured state bytes equal the torch-free formula the planner mirrors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optim import FRUGAL, GaLoreAdamW, NaturalGaLoreAdamW, OptimizerConfigError
from optim.state_bytes import (
    STEP_BYTES,
    active_blocks,
    expected_state_bytes,
    frugal_rank,
    projection_side,
    total_expected_state_bytes,
)

# Tall, wide, square, 3-D (viewed as 12 x 20), 1-D and 0-d parameters.
SHAPES = [(24, 10), (10, 24), (16, 16), (12, 4, 5), (7,), ()]


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def _measured_vs_formula(opt, params, kind: str, steps: int, **settings) -> tuple[int, int]:
    _run(opt, params, steps)
    formula = sum(
        expected_state_bytes(kind, tuple(p.shape), dtype_bytes=p.element_size(), **settings) for p in params
    )
    return opt.state_bytes(), formula


@pytest.mark.parametrize("rank", [1, 3, 64])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_state_bytes_equal_formula(rank: int, proj_type: str) -> None:
    params = _params()
    opt = GaLoreAdamW(params, galore=True, rank=rank, proj_type=proj_type, update_proj_gap=2)
    measured, formula = _measured_vs_formula(opt, params, "galore", 3, rank=rank, proj_type=proj_type)
    assert measured == formula
    assert opt.expected_state_bytes() == formula


def test_galore_state_is_smaller_than_adamw() -> None:
    params = _params()
    opt = GaLoreAdamW(params, galore=True, rank=2)
    measured, _ = _measured_vs_formula(opt, params, "galore", 1, rank=2)
    adamw = total_expected_state_bytes("adamw", [tuple(p.shape) for p in params])
    assert measured < adamw


@pytest.mark.parametrize("history_size", [1, 4])
def test_natural_galore_state_bytes_equal_formula(history_size: int) -> None:
    params = _params()
    opt = NaturalGaLoreAdamW(params, galore=True, rank=3, history_size=history_size)
    measured, formula = _measured_vs_formula(
        opt, params, "natural_galore", 2, rank=3, history_size=history_size
    )
    assert measured == formula
    assert opt.expected_state_bytes() == formula


@pytest.mark.parametrize("projection", ["svd", "random"])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_frugal_projected_state_bytes_equal_formula(projection: str, density: float) -> None:
    params = _params()
    opt = FRUGAL(params, frugal=True, density=density, projection=projection, update_proj_gap=2)
    measured, formula = _measured_vs_formula(opt, params, "frugal", 3, density=density, projection=projection)
    assert measured == formula
    assert opt.expected_state_bytes() == formula


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_frugal_blockwise_state_bytes_equal_formula_per_period(order: str) -> None:
    params = _params()
    opt = FRUGAL(
        params, frugal=True, density=0.5, projection="blockwise", block_order=order, update_proj_gap=2
    )
    for period in range(3):
        _run(opt, params, 2)
        active = active_blocks(len(params), 0.5, period, order=order, seed=0)
        assert len(active) == 3
        formula = sum(
            expected_state_bytes("frugal", tuple(p.shape), projection="blockwise", active=i in active)
            for i, p in enumerate(params)
        )
        assert opt.state_bytes() == formula
        assert opt.expected_state_bytes() == formula
        # Inactive blocks hold only their step counter: their moments were freed.
        for i, p in enumerate(params):
            assert ("exp_avg" in opt.state[p]) == (i in active)


def test_state_bytes_follow_the_parameter_dtype() -> None:
    params = _params(torch.bfloat16)
    opt = GaLoreAdamW(params, galore=True, rank=3)
    measured, formula = _measured_vs_formula(opt, params, "galore", 1, rank=3)
    assert measured == formula
    assert formula == sum(
        expected_state_bytes("galore", tuple(p.shape), rank=3, dtype_bytes=2) for p in params
    )


def test_non_projected_group_is_adamw_state() -> None:
    params = _params()
    opt = GaLoreAdamW(params, galore=False)
    _run(opt, params, 1)
    assert opt.state_bytes() == total_expected_state_bytes("adamw", [tuple(p.shape) for p in params])


def test_formula_values_by_hand() -> None:
    # 24 x 10, rank 3, std -> right projection: moments 2 * 24 * 3, basis 3 * 10, float32, + step.
    assert expected_state_bytes("galore", (24, 10), rank=3) == (2 * 24 * 3 + 3 * 10) * 4 + STEP_BYTES
    assert expected_state_bytes("natural_galore", (24, 10), rank=3, history_size=5) == (
        (2 * 24 * 3 + 3 * 10 + 5 * 24 * 3) * 4 + STEP_BYTES
    )
    assert expected_state_bytes("adamw", (24, 10), dtype_bytes=2) == 2 * 240 * 2 + STEP_BYTES
    assert frugal_rank(0.25, 24, 10, projection_side(24, 10, "std")) == 3  # round(2.5) half up
    assert expected_state_bytes("frugal", (24, 10), density=1.0) == expected_state_bytes("adamw", (24, 10))
    assert expected_state_bytes("frugal", (24, 10), density=0.0) == STEP_BYTES


def test_formula_module_does_not_import_torch() -> None:
    code = "import sys, optim.state_bytes; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=_repo_root(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _repo_root() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[2])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "param_groups[0].rank"),
        ({"update_proj_gap": 0}, "param_groups[0].update_proj_gap"),
        ({"proj_type": "diagonal"}, "param_groups[0].proj_type"),
        ({"svd": "lanczos"}, "param_groups[0].svd"),
        ({"state_on_refresh": "forget"}, "param_groups[0].state_on_refresh"),
        ({"betas": (0.9, 1.0)}, "param_groups[0].betas"),
        ({"lr": -1.0}, "param_groups[0].lr"),
        ({"numerics": "numpy"}, "param_groups[0].numerics"),
    ],
)
def test_galore_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(OptimizerConfigError) as err:
        GaLoreAdamW(_params(), galore=True, **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"density": 1.5}, "param_groups[0].density"),
        ({"projection": "columns"}, "param_groups[0].projection"),
        ({"state_free": "adam"}, "param_groups[0].state_free"),
        ({"block_order": "mirror"}, "param_groups[0].block_order"),
    ],
)
def test_frugal_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(OptimizerConfigError) as err:
        FRUGAL(_params(), frugal=True, **kwargs)
    assert err.value.field == field


def test_rank_key_alone_does_not_switch_galore_on() -> None:
    params = _params()
    with pytest.raises(OptimizerConfigError) as err:
        GaLoreAdamW([{"params": params[:2], "rank": 4}, {"params": params[2:]}])
    assert err.value.field == "param_groups[0].galore"
    assert isinstance(err.value, ValueError)


def test_bad_formula_kind_names_the_field() -> None:
    with pytest.raises(OptimizerConfigError) as err:
        expected_state_bytes("lion", (4, 4))
    assert err.value.field == "kind"


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 24), min_size=1, max_size=3).map(tuple),
    rank=st.integers(1, 30),
    density=st.floats(0.0, 1.0),
    proj_type=st.sampled_from(["std", "reverse_std", "left", "right"]),
    kind=st.sampled_from(["galore", "natural_galore", "frugal"]),
)
def test_formula_matches_measurement_for_any_shape(shape, rank, density, proj_type, kind) -> None:
    p = torch.nn.Parameter(torch.randn(shape))
    if kind == "galore":
        opt = GaLoreAdamW([p], galore=True, rank=rank, proj_type=proj_type)
    elif kind == "natural_galore":
        opt = NaturalGaLoreAdamW([p], galore=True, rank=rank, proj_type=proj_type, history_size=3)
    else:
        opt = FRUGAL([p], frugal=True, density=density, proj_type=proj_type)
    p.grad = torch.randn(shape)
    opt.step()
    assert opt.state_bytes() == expected_state_bytes(
        kind, shape, rank=rank, proj_type=proj_type, density=density, history_size=3
    )
