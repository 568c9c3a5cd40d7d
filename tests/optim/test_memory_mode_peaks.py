"""Measured peaks of the memory modes against the planner's prediction (MemTracker, a small Llama on CPU).

Layer-wise updates and pure bf16 training, for AdamW and GaLore: each measured peak within 10% of
`planner.memory.estimate_memory`, and layer-wise below the same optimizer's whole-step peak by about the
predicted amount. A large vocabulary and short sequences make the model states dominate, the regime these
modes are for (GaLore's 7B on 24 GB).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from optim import GaLoreAdamW, LayerwiseStepper, low_rank_param_groups
from optim.per_param import PerParameterOptimizer, low_bit_adamw
from planner.memory import MemoryOptions, estimate_memory
from planner.plan import Layout
from planner.presets import MODEL_PRESETS
from planner.workload import OptimizerSpec, Workload
from tests.helpers import hf_model

SPEC = dataclasses.replace(MODEL_PRESETS["llama-20m"], num_layers=2, hidden_size=256, num_heads=4,
                           num_kv_heads=4, ffn_hidden_size=704, vocab_size=8192)  # fmt: skip
BATCH, SEQ, RANK = 1, 32, 16


def _measure(kind: str, dtype: str, layerwise: bool, bits: int = 0) -> int:
    model = hf_model(SPEC)
    if dtype == "bf16":
        model.to(torch.bfloat16)  # pure bf16: no fp32 master, moments created like the parameters
    if bits:
        params = [{"params": list(model.parameters()), "lr": 1e-4}]
        opt = PerParameterOptimizer(params, lambda g: low_bit_adamw(g, bits=bits))
    elif kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if layerwise:
            opt = PerParameterOptimizer.like(opt)
    else:
        opt = GaLoreAdamW(low_rank_param_groups(model, switch_key="galore", rank=RANK), lr=1e-4)
    inner = list(opt._inner.values()) if isinstance(opt, PerParameterOptimizer) else [opt]
    stepper = LayerwiseStepper(opt) if layerwise else None
    ids = torch.randint(0, SPEC.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()  # layer-wise: every parameter stepped in here
        if not layerwise:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # untracked: the optimizer state exists, as in steady state
    tracker = MemTracker()
    tracker.track_external(model, *inner)
    with tracker:
        step()
    if stepper is not None:
        stepper.remove()
    (snap,) = tracker.get_tracker_snapshot("peak").values()
    return int(next(v for k, v in snap.items() if str(k).split(".")[-1] == "Total"))


def _predict(kind: str, dtype: str, layerwise: bool, bits: int = 0) -> int:
    w = Workload(global_batch=BATCH, micro_batch=BATCH, seq_len=SEQ, dtype=dtype, precision="pure",
                 layerwise=layerwise, max_grad_norm=0, optimizer=OptimizerSpec(kind=kind, rank=RANK, state_bits=bits))  # fmt: skip
    # torch's AdamW on CPU runs its single-tensor path
    return estimate_memory(
        SPEC, w, Layout(micro_batch=BATCH), MemoryOptions(optimizer_impl="single_tensor")
    ).total


@pytest.mark.filterwarnings("ignore:Expected a tensor or a traceable wrapper-subclass")
@pytest.mark.parametrize(
    "kind,dtype", [("adamw", "fp32"), ("adamw", "bf16"), ("galore", "fp32"), ("galore", "bf16")]
)
def test_layerwise_and_pure_bf16_peaks_match_the_prediction(kind: str, dtype: str) -> None:
    # (MemTracker's own gradient hook runs after the stepper has freed p.grad and warns about the None)
    measured = {lw: _measure(kind, dtype, lw) for lw in (False, True)}
    predicted = {lw: _predict(kind, dtype, lw) for lw in (False, True)}
    for lw in (False, True):
        assert predicted[lw] == pytest.approx(measured[lw], rel=0.10), (lw, measured, predicted)
    assert measured[True] < measured[False]
    saved_measured, saved_predicted = measured[False] - measured[True], predicted[False] - predicted[True]
    assert saved_predicted == pytest.approx(saved_measured, abs=0.10 * measured[False])


@pytest.mark.filterwarnings("ignore:Expected a tensor or a traceable wrapper-subclass")
def test_8bit_adamw_states_peak_matches_the_prediction() -> None:
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' blockwise 8-bit AdamW (its CPU backend), one optimizer per parameter, stepped layer-wise
    measured = _measure("adamw", "fp32", True, bits=8)
    assert _predict("adamw", "fp32", True, bits=8) == pytest.approx(measured, rel=0.10)
    assert measured < 0.6 * _predict("adamw", "fp32", False)  # 2 B/param of moments instead of 8
