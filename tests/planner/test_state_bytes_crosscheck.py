"""The planner's optimizer-state formula is the optimizers' own (planner may not import optim)."""

import pytest

from optim.state_bytes import STEP_BYTES, expected_state_bytes
from planner.memory import low_rank_state_elems, optimizer_state_bytes_per_param
from planner.presets import MODEL_PRESETS
from planner.workload import OptimizerSpec, Workload


def _optim_total(spec, kind, **settings) -> int:
    """Sum over every parameter: block matrices projected, everything else plain AdamW."""
    total = 0
    tensors = 0
    for _, shape in spec.layer_param_shapes():
        total += spec.num_layers * expected_state_bytes(kind, shape, projected=len(shape) == 2, **settings)
        tensors += spec.num_layers
    others = [(spec.vocab_size, spec.hidden_size), (spec.hidden_size,)]
    if spec.lm_head_params:
        others.append((spec.vocab_size, spec.hidden_size))
    for shape in others:
        total += expected_state_bytes(kind, shape, projected=False, **settings)
        tensors += 1
    return total - tensors * STEP_BYTES  # the planner does not count 4-byte step counters


@pytest.mark.parametrize("name", ["llama-20m", "llama2-7b", "tiny-llama"])
@pytest.mark.parametrize(
    "kind,settings",
    [
        ("galore", {"rank": 128}),
        ("galore", {"rank": 8}),
        ("natural_galore", {"rank": 64, "history_size": 10}),
        ("frugal", {"density": 0.25}),
        ("frugal", {"density": 1.0}),
        ("frugal", {"density": 0.0}),
    ],
)
def test_planner_matches_optim(name, kind, settings):
    spec = MODEL_PRESETS[name]
    opt = OptimizerSpec(kind=kind, rank=settings.get("rank", 128), density=settings.get("density", 0.25))
    w = Workload(global_batch=1, seq_len=128, dtype="fp32", optimizer=opt)
    assert low_rank_state_elems(spec, w) * 4 == _optim_total(spec, kind, **settings)
    # and the per-parameter K the ZeRO accounting uses is that total over the parameters
    assert optimizer_state_bytes_per_param(w, spec) * spec.params == pytest.approx(
        _optim_total(spec, kind, **settings)
    )
