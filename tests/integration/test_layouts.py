"""Every layout memtier's trainer runs on torch's engine, against one process: `memtier launch --nproc 4`
(torchrun, gloo) trains tiny-llama under dp2 x tp2, FSDP2 dp4 (ZeRO-3), FSDP2 dp2 x tp2 with sequence
parallelism, pp2 x dp2 (1F1B; and with FSDP2 ZeRO-3 inside the stages), pp2 with 2 virtual stages
(interleaved 1F1B) and tp2 x pp2 with sequence parallelism; the loss of every step and the parameters after
the run (gathered) equal one process training the same global batch, up to fp32 reduction order.

Every layout runs with swap on (block 0 swaps half its tokens, block 3 all of them, to the DRAM tier; saved
DTensors go by their local shards), beside the recompute some of them have, plus, on some layouts, the chunked
loss and optimizer-state offload of the shards (`WITH_SWAP`). Recompute, swap and offload are copies of the
same values, so the reference is the same one-process run. A tp layout also runs with swap off (`SWAP_OFF`):
where a swap-on run fails, it tells the layout from the swap apart. (The other layouts' swap-off
runs gave the same figures as their swap-on runs to the last digit; dropped for CI's time.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from planner.plan import ActivationPolicy
from tests.integration.helpers import ROOT, TRAIN, memtier, small_plan

STEPS = "6"
RECOMPUTE = (ActivationPolicy(layer=1, keep_fraction=0.0, recompute_fraction=1.0),)
SWAP = (
    ActivationPolicy(layer=0, keep_fraction=0.5, swap_fraction=0.5),
    ActivationPolicy(layer=3, keep_fraction=0.0, swap_fraction=1.0),
)
# name -> small_plan arguments (4 ranks, tiny-llama with 4 blocks: 2 per pipeline stage, 1 per interleaved
# chunk; global batch 8 sequences)
LAYERS = 4
LAYOUTS = {
    "dp2_tp2": {"micro_batch": 4, "tp": 2, "activations": RECOMPUTE},
    "fsdp_dp4_zero3": {"micro_batch": 2, "zero_stage": 3, "activations": RECOMPUTE},
    "fsdp_dp2_tp2_sp": {"micro_batch": 4, "tp": 2, "zero_stage": 3, "sequence_parallel": True},
    "pp2_dp2_1f1b": {"micro_batch": 2, "pp": 2, "grad_accum": 2, "activations": RECOMPUTE},
    "pp2_dp2_zero3": {"micro_batch": 2, "pp": 2, "grad_accum": 2, "zero_stage": 3},
    "pp2_v2_interleaved": {"micro_batch": 2, "pp": 2, "grad_accum": 2, "virtual_stages": 2},
    "tp2_pp2_sp": {"micro_batch": 4, "tp": 2, "pp": 2, "grad_accum": 2, "sequence_parallel": True},
}
# what the swap-on run of a layout adds besides the swap: the chunked loss (inside the model's forward under
# tp + FSDP2, in the last pipeline stage's loss function under pp) and optimizer-state offload of the rank's
# shards (DRAM tier)
WITH_SWAP = {
    "fsdp_dp2_tp2_sp": {"chunked_loss": True, "optimizer_offload": True},
    "tp2_pp2_sp": {"chunked_loss": True},
    "pp2_dp2_1f1b": {"optimizer_offload": True},
    "fsdp_dp4_zero3": {"chunked_loss": True},
}


def _run_args(d) -> tuple[str, ...]:
    return ("--steps", STEPS, "--save-final-params", str(d / "params"), "--metrics-out", str(d / "m.json"))


def _result(d) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The losses (rank 0's: every rank logs the all-reduced mean) and every rank's parameters, merged."""
    losses = [loss for _, loss in json.loads((d / "m.json").read_text())["losses"]]
    params: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(d / "params")):
        params.update(torch.load(d / "params" / f))
    return losses, params


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole global batch as one micro-batch."""
    d = tmp_path_factory.mktemp("reference")
    small_plan(str(d / "plan.json"), ranks=1, micro_batch=8, num_layers=LAYERS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, TRAIN, "--plan", str(d / "plan.json"), *_run_args(d)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return _result(d)


SWAP_OFF = ("dp2_tp2",)
RUNS = [(name, True) for name in sorted(LAYOUTS)] + [(name, False) for name in SWAP_OFF]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "swap"), RUNS, ids=[f"{n}-{'swap_on' if s else 'swap_off'}" for n, s in RUNS]
)
def test_layout_trains_like_one_process(reference, tmp_path, name, swap):
    kw = dict(LAYOUTS[name])
    if swap:
        kw["activations"] = tuple(kw.get("activations", ())) + SWAP
        kw.update(WITH_SWAP.get(name, {}))
    small_plan(str(tmp_path / "plan.json"), ranks=4, num_layers=LAYERS, **kw)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = memtier(
        "launch", "--nproc", "4", "--plan", str(tmp_path / "plan.json"), TRAIN, *_run_args(tmp_path),
        timeout=240, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    losses, params = _result(tmp_path)
    ref_losses, ref_params = reference
    assert len(losses) == int(STEPS)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert params.keys() == ref_params.keys()
    # Adam moves an element by about lr * m / (sqrt(v) + eps) whatever the gradient's size, so where a
    # gradient is ~0 its last bits (the reduction order) can move the element by a fraction of lr (1e-3):
    # rtol 1e-5 plus 1% of one step's lr absolute
    for k, ref in ref_params.items():
        torch.testing.assert_close(
            params[k], ref, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{name} {k}: {m}"
        )
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    param_diff = max(float((params[k] - ref).abs().max()) for k, ref in ref_params.items())
    print(f"{name}: max relative loss difference {loss_diff:.2e}, max parameter difference {param_diff:.2e}")
    m = json.loads((tmp_path / "m.json").read_text())
    if swap:  # rank 0 holds block 0 in every layout: its half went out and came back
        assert m["swap"]["bytes_swapped"] > 0 and m["swap"]["tensors_swapped"] > 0, m["swap"]
        if kw.get("tp", 1) > 1:  # the projections' inputs are DTensors: packed by their local shards
            assert m["swap"]["shards_packed"] > 0, m["swap"]
    if kw.get("chunked_loss") and kw.get("pp", 1) == 1:
        # rank 0 computes the loss of every micro-batch; under pp it holds the first stage and receives the
        # loss (the last chunk returns hidden states, not logits: the losses could not match unless the head
        # ran inside the chunked loss)
        assert m["chunked_loss_calls"] == int(STEPS) * kw.get("grad_accum", 1)
    if kw.get("optimizer_offload"):  # rank 0's moments are in the DRAM tier
        assert m["optimizer_tier_bytes"].get("dram", 0) > 0, m["optimizer_tier_bytes"]
    if any(
        a.recompute_fraction for a in kw.get("activations", ())
    ):  # recomputed block 1: its forward runs again in backward, where this rank has it
        assert m["attention_calls_last_step"][1] in (0, 2 * kw.get("grad_accum", 1))


def test_interleaved_chunks_follow_the_stage_split(tmp_path):
    """Chunk k * pp + s is stage s's k-th: stage_layers (4, 2) with 2 virtual stages gives stage 0 blocks 0-1
    and 3-4, stage 1 blocks 2 and 5; a stage whose blocks do not divide by virtual_stages is refused."""
    from launch.train.layouts import refusals
    from launch.train.parallel import chunk_layers
    from planner.plan import Layout

    lay = Layout(dp=1, pp=2, virtual_stages=2, grad_accum=2, stage_layers=(4, 2))
    assert chunk_layers(lay, 6) == [(0, 2), (2, 1), (3, 2), (5, 1)]
    plan = small_plan(str(tmp_path / "plan.json"), ranks=2, pp=2, grad_accum=2, num_layers=4)
    assert refusals(plan) == []
    bad = plan.replace(layout=Layout(dp=1, pp=2, virtual_stages=2, grad_accum=2, stage_layers=(3, 1)))
    assert [name for name, _ in refusals(bad)] == ["layout.stage_layers"]
