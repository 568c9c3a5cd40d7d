"""Streamed model state (`offload.state`): parameters, gradients and AdamW state in the tiers, bit-identical to
the run without it; checkpoint and resume after a kill; the plans it refuses; memory that does not grow."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import pytest
import torch

import offload
from offload.state import StateError
from planner.plan import Layout, OptimizerPlan
from tests.offload.state_helpers import batches, build, stream_plan, train

STEPS, GA = 20, 2


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference(layers: int, steps: int = STEPS):
    model = build(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    losses = train(model, step, batches(steps * GA), steps=steps, ga=GA)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def streamed(tmp_path, layers: int, steps: int = STEPS, **plan_kw):
    model = build(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    handle = offload.apply(model, opt, stream_plan(model, str(tmp_path), **plan_kw))

    def step():
        handle.optimizer.step()
        handle.optimizer.zero_grad()

    try:
        losses = train(model, step, batches(steps * GA), steps=steps, ga=GA)
        return losses, handle.state.state_dict(), handle.state.streamer.stats
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("layers", "kw"),
    [
        (3, {"tier": "nvme"}),
        (5, {"tier": "nvme", "depth": 2, "activations": "swap"}),
        (3, {"tier": "dram", "activations": "recompute"}),
        (3, {"tier": "nvme", "params": "dram", "grads": "device"}),
        # chunks smaller than a parameter and straddling parameters; more open chunks than buffers
        (3, {"tier": "nvme", "chunk": 1000, "steps": 6}),
        (2, {"tier": "dram", "chunk": 333, "activations": "swap", "steps": 6}),
    ],
    ids=["nvme", "nvme-depth2-swap", "dram-recompute", "mixed-tiers", "chunks-1000", "chunks-333"],
)
def test_bit_identical_to_unoffloaded(tmp_path, layers, kw):
    kw = dict(kw)
    steps = kw.pop("steps", STEPS)
    ref_losses, ref_params = reference(layers, steps)
    losses, params, stats = streamed(tmp_path, layers, steps, **kw)
    assert losses == ref_losses
    for name, p in ref_params.items():
        assert torch.equal(p, params[name]), name
    if kw.get("params", kw["tier"]) != "device":
        # each block read before forward and again before backward (the last block stays for backward), "rest"
        # once a step
        assert stats.reads == (2 * layers - 1) * steps * GA + steps
        assert stats.prefetch_hits > 0


def test_with_chunked_loss(tmp_path):
    """The chunked loss (the head's weight used chunk by chunk in forward and backward) on streamed state:
    bit-identical to the same chunked loss without streaming."""
    from planner.plan import LossPlan, ModelStatePlan

    def run(stream: bool):
        model = build(3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        plan = dataclasses.replace(
            stream_plan(model, str(tmp_path)), loss=LossPlan(kind="chunked", chunk_size=16)
        )
        if not stream:
            plan = dataclasses.replace(plan, model_state=ModelStatePlan())
        handle = offload.apply(model, opt, plan)

        def step():
            if not stream:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            handle.optimizer.step()
            handle.optimizer.zero_grad()

        try:
            losses = train(model, step, batches(6 * GA), steps=6, ga=GA)
            params = (
                handle.state.state_dict()
                if stream
                else {n: p.detach().clone() for n, p in model.named_parameters()}
            )
        finally:
            handle.remove()
        return losses, params

    (ref_losses, ref_params), (losses, params) = run(False), run(True)
    assert losses == ref_losses
    for name, p in ref_params.items():
        assert torch.equal(params[name], p), name


def test_buffers_are_reused_so_saved_weight_views_are_resolved_again(tmp_path, monkeypatch):
    """Without re-resolving saved views of streamed weights, a reused buffer feeds backward another block's
    weights: the guard that this test can fail."""
    from offload.state.stream import ParamStreamer

    ref_losses, _ = reference(5, steps=3)
    monkeypatch.setattr(ParamStreamer, "param_ref", lambda self, t: None)
    losses, _, _ = streamed(tmp_path, 5, steps=3, depth=2)
    assert losses != ref_losses


_RESUME = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
import offload
from tests.offload.state_helpers import batches, build, stream_plan, train
model = build(3)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
handle = offload.apply(model, opt, stream_plan(model, {nvme!r}))
def step():
    handle.optimizer.step(); handle.optimizer.zero_grad()
losses = train(model, step, batches({steps} * 2), steps=10, ga=2)
handle.state.save({ckpt!r})
print(repr(losses), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_save_kill_resume(tmp_path):
    ref_losses, ref_params = reference(3)
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    ckpt = tmp_path / "ckpt"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _RESUME.format(root=root, nvme=str(nvme), ckpt=str(ckpt), steps=STEPS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr of a list of floats
    assert first == ref_losses[:10]

    model = build(3, seed=123)  # other initial weights: everything must come from the checkpoint
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    handle = offload.apply(model, opt, stream_plan(model, str(nvme)))
    try:
        handle.state.load(ckpt)

        def step():
            handle.optimizer.step()
            handle.optimizer.zero_grad()

        rest = train(model, step, batches(STEPS * GA), steps=10, ga=GA, start=10)
        assert rest == ref_losses[10:]
        params = handle.state.state_dict()
        for name, p in ref_params.items():
            assert torch.equal(p, params[name]), name
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"layout": Layout(tp=2)}, "layout"),
        ({"layout": Layout(dp=2, zero_stage=1)}, "layout"),
        ({"optimizer": OptimizerPlan(offload=True, tier="dram")}, "optimizer.offload"),
    ],
)
def test_refuses_what_it_cannot_run(tmp_path, change, field):
    model = build(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plan = dataclasses.replace(stream_plan(model, str(tmp_path)), **change)
    with pytest.raises(StateError) as err:
        offload.apply(model, opt, plan)
    assert err.value.field == field
    for n, p in model.named_parameters():  # nothing moved
        assert torch.equal(p, before[n])


def test_refuses_other_optimizers_and_other_models(tmp_path):
    model = build(2)
    with pytest.raises(StateError, match="AdamW"):
        offload.apply(model, torch.optim.SGD(model.parameters(), lr=0.1), stream_plan(model, str(tmp_path)))
    other = build(3)
    with pytest.raises(StateError, match="groups"):
        offload.apply(model, torch.optim.AdamW(model.parameters()), stream_plan(other, str(tmp_path)))


def test_memory_does_not_grow_over_steps(tmp_path):
    """One staging pool allocated once: after warm-up, RSS stays flat over steps (no per-step growth)."""
    from launch.train.metrics import process_memory

    model = build(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    handle = offload.apply(model, opt, stream_plan(model, str(tmp_path)))
    data = batches(60)

    def step():
        handle.optimizer.step()
        handle.optimizer.zero_grad()

    try:
        train(model, step, data, steps=5, ga=2)
        warm = process_memory()["rss_bytes"]
        train(model, step, data, steps=20, ga=2, start=5)
        after = process_memory()["rss_bytes"]
    finally:
        handle.remove()
    assert after - warm < 8 << 20, f"RSS grew by {(after - warm) / 2**20:.1f} MiB over 20 steps"


def test_meta_model_filled_from_weights_file(tmp_path):
    """A model built on the meta device, its weights read group by group from a safetensors file: the same
    training as the model built whole."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    ref_losses, _ = reference(3, steps=4)
    source = build(3)
    path = tmp_path / "weights.safetensors"
    save_file({n: p.detach() for n, p in source.named_parameters()}, str(path))
    with init_empty_weights(include_buffers=False):
        model = build(3, seed=99)
    assert all(p.is_meta for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    handle = offload.apply(model, opt, stream_plan(model, str(nvme)), weights=path)

    def step():
        handle.optimizer.step()
        handle.optimizer.zero_grad()

    try:
        assert train(model, step, batches(4 * GA), steps=4, ga=GA) == ref_losses
    finally:
        handle.remove()
    assert not any(p.is_meta for p in model.parameters())


def test_weights_file_errors_name_the_tensor(tmp_path):
    from safetensors.torch import save_file

    model = build(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = tmp_path / "w.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(StateError, match="embed_tokens"):
        offload.apply(
            model, torch.optim.AdamW(model.parameters()), stream_plan(model, str(tmp_path)), weights=path
        )
    (tmp_path / "junk").write_bytes(b"\xff" * 16)
    with pytest.raises(StateError, match="safetensors"):
        offload.apply(
            model,
            torch.optim.AdamW(model.parameters()),
            stream_plan(model, str(tmp_path)),
            weights=tmp_path / "junk",
        )
    for n, p in model.named_parameters():  # a failed apply leaves the model as it was
        assert torch.equal(p, before[n])
