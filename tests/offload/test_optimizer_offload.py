"""Interleaved optimizer-state offload (offload.optimizer): numerics, schedule, state, checkpoints, resume.

Run as a script, this file is also the training program of the kill-and-resume test
(``python tests/offload/test_optimizer_offload.py train ...``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offload.optimizer import (
    OffloadedAdamW,
    OffloadSettings,
    OptimizerOffloadError,
    offload_optimizer,
    partition_subgroups,
)
from offload.optimizer.kernels import (
    AdamWHyper,
    AdamWTensors,
    DeepSpeedCpuAdam,
    TorchFusedAdamW,
    deepspeed_cpu_adam_prebuilt,
    deepspeed_cpu_adam_status,
)
from offload.optimizer.records import JobRecord, RateMeter
from offload.optimizer.schedule import SubgroupWork, Throughputs, schedule_subgroups, simulate
from offload.optimizer_checkpoint import CheckpointError, write_checkpoint
from planner.plan import OptimizerPlan, Subgroup, TierPlan
from tests.helpers import vm_flags

VOCAB = 64
STEPS = 20
ACCUM = 4
MAX_NORM = 0.05  # small enough that most steps clip
SUBGROUP = 1300


class Net(nn.Module):
    """A small residual model: embedding, two MLP blocks with LayerNorm, head (tensors of many shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, micro: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1000 * step + micro))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def groups(model: nn.Module, wd: float = 0.1) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 5) * 0.9 ** max(0, step - 5)


def train(
    model, opt, sched, *, steps: int, first: int = 0, clip: float | None, ref_params=None
) -> list[float]:
    """`steps` optimizer steps of ACCUM micro-batches; clip_grad_norm_ for the torch references."""
    losses = []
    for step in range(first, first + steps):
        total = 0.0
        for micro in range(ACCUM):
            loss = loss_of(model, batch(step, micro)) / ACCUM
            loss.backward()
            total += loss.item()
        if ref_params is not None and clip is not None:
            torch.nn.utils.clip_grad_norm_(ref_params, clip)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(total)
    return losses


def ordered(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def interleaved_plan(model: nn.Module, tier: str, size: int = SUBGROUP) -> OptimizerPlan:
    """A plan whose subgroups match the runtime's partition, updated alternately on the CPU and the device."""
    layouts = partition_subgroups([[p.numel() for p in g["params"]] for g in groups(model)], size)
    return OptimizerPlan(
        offload=True,
        tier=tier,
        subgroup_size=size,
        subgroups=tuple(
            Subgroup(
                index=lay.index, numel=lay.numel, tier=tier, update_side="device" if lay.index % 2 else "cpu"
            )
            for lay in layouts
        ),
    )


FAST_DEVICE = Throughputs(
    cpu_params_per_s=1e8,
    device_params_per_s=1e11,
    h2d_bytes_per_s=1e12,
    d2h_bytes_per_s=1e12,
    shared_compute=False,
)


# ---- numerics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "schedule", "clip"),
    [("dram", "plan", MAX_NORM), ("nvme", "auto", MAX_NORM), ("nvme", "plan", None)],
    ids=["host-interleaved-clip", "nvme-scheduled-clip", "nvme-early-noclip"],
)
def test_bit_identical_to_fused_adamw_and_close_to_adamw(tmp_path, tier, schedule, clip):
    model = make_net()
    fused_ref, plain_ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = OffloadedAdamW(
        groups(model),
        lr=3e-3,
        placement=interleaved_plan(model, tier),
        tier_plans=(TierPlan(kind="nvme", capacity_bytes=0, path=str(tmp_path)),),
        settings=OffloadSettings(
            grad_accum=ACCUM,
            max_grad_norm=clip,
            schedule=schedule,
            cpu_kernel="torch_fused",
            nvme_io_engine="posix",
        ),
        throughputs=FAST_DEVICE,
    )
    assert set(opt.subgroup_tiers) == {tier} and len(opt.subgroups) >= 4
    fused = torch.optim.AdamW(groups(fused_ref), lr=3e-3, fused=True)
    plain = torch.optim.AdamW(groups(plain_ref), lr=3e-3)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in (opt, fused, plain)]

    ours = train(model, opt, scheds[0], steps=STEPS, clip=clip)
    theirs = train(fused_ref, fused, scheds[1], steps=STEPS, clip=clip, ref_params=ordered(fused))
    train(plain_ref, plain, scheds[2], steps=STEPS, clip=clip, ref_params=ordered(plain))

    assert ours == theirs
    for a, b, c in zip(model.parameters(), fused_ref.parameters(), plain_ref.parameters()):
        assert torch.equal(a, b)  # the same kernel, without offload
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # the optimizer state too, in torch's format
    mine, ref = opt.state_dict(), fused.state_dict()
    assert mine["state"].keys() == ref["state"].keys()
    for pid, st in ref["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine["state"][pid][key], st[key]), (pid, key)
    assert opt.param_groups[0]["lr"] == fused.param_groups[0]["lr"]  # the scheduler drove both

    log = list(opt.schedule_log)
    assert len(log) == STEPS
    executed = {side for rec in log for side in rec.executed_sides.values()}
    assert executed == {"cpu", "device"}  # both lanes really ran
    if clip is not None:
        assert all(rec.schedule.phase == "step" for rec in log)  # deferred until the global norm is known
        assert sum(rec.clip_coef < 1.0 for rec in log) >= STEPS // 2
    else:
        assert all(rec.schedule.phase == "backward" for rec in log)
    if tier == "nvme":
        assert len(list(Path(tmp_path).rglob("*.swap"))) == len(opt.subgroups)  # one file per subgroup
    opt.remove()


def test_updates_start_during_backward_without_clipping():
    model = make_net()
    opt = OffloadedAdamW(
        model.parameters(),
        lr=1e-3,
        subgroup_size=SUBGROUP,
        settings=OffloadSettings(grad_accum=2, cpu_kernel="torch_fused"),
    )
    seen: list[int] = []
    # the embedding's gradient is computed last in backward; by then the later subgroups are dispatched
    model.embed.weight.register_hook(lambda grad: seen.append(opt.updates_started))
    loss_of(model, batch(0, 0)).backward()
    assert opt.updates_started == 0  # micro-batch 1 of 2: gradients still accumulate
    loss_of(model, batch(0, 1)).backward()
    assert seen[-1] >= 1
    opt.step()
    rec = opt.schedule_log[-1]
    assert rec.schedule.phase == "backward" and len(rec.jobs) == len(opt.subgroups)
    assert all(p.grad is None for p in model.parameters())  # consumed gradients are dropped
    opt.remove()


def test_skips_parameters_without_gradients_like_adamw():
    model, ref = make_net(), make_net()
    opt = OffloadedAdamW(
        model.parameters(), lr=1e-2, subgroup_size=10_000, settings=OffloadSettings(cpu_kernel="torch_fused")
    )
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    for m, o in ((model, opt), (ref, ropt)):
        for step in range(3):
            out = m.embed(batch(step, 0)).sum() if step == 1 else loss_of(m, batch(step, 0))
            out.backward()  # step 1 only reaches the embedding
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert [float(s) for s in opt._states.slots[0].steps][:2] == [3.0, 2.0]  # embedding 3 steps, the next 2
    opt.remove()


def _arena_span(store) -> tuple[int, int]:
    start = store.arena.data_ptr()
    return start, start + store.arena.numel()


@pytest.mark.parametrize("clip", [None, MAX_NORM], ids=["early", "clip"])
def test_host_tier_updates_the_state_in_place_in_the_arena(clip):
    """The CPU lane updates host-resident moments through ``HostTier.view`` (no staging copies), the fp32
    parameters are their own master weights (no write-back), and the result stays bit-identical."""
    from offload.tiers import HostTier

    model, ref = make_net(), make_net()
    store = HostTier(capacity_bytes=1 << 20)
    opt = OffloadedAdamW(
        groups(model), lr=3e-3, placement=interleaved_plan(model, "dram"), stores={"dram": store},
        settings=OffloadSettings(grad_accum=2, schedule="cpu", cpu_kernel="torch_fused", max_grad_norm=clip),
    )  # fmt: skip
    handles = [slot.handle for slot in opt._states.slots]
    assert not any(slot.staged for slot in opt._states.slots) and opt._states.pool is None
    assert all(slot.master_is_param and slot.rows == 2 for slot in opt._states.slots)
    lo, hi = _arena_span(store)
    views = [store.view(h) for h in handles]
    for slot, v in zip(opt._states.slots, views):
        assert v.shape == (2, slot.layout.numel) and lo <= v.data_ptr() and v.data_ptr() + v.nbytes <= hi
    # the kernel's operands are the arena views and the parameters themselves: record what it is handed
    seen: list[int] = []
    kernel = opt._lanes.cpu_kernel

    def recording(t, hyper):
        seen.extend(x.data_ptr() for x in (*t.exp_avgs, *t.exp_avg_sqs))
        assert {x.data_ptr() for x in t.params} <= {p.data_ptr() for p in model.parameters()}
        kernel(t, hyper)

    opt._lanes.cpu_kernel = recording
    fused = torch.optim.AdamW(groups(ref), lr=3e-3, fused=True)
    for m, o in ((model, opt), (ref, fused)):
        for step in range(4):
            for micro in range(2):
                (loss_of(m, batch(step, micro)) / 2).backward()
            if clip is not None and o is fused:
                torch.nn.utils.clip_grad_norm_(ordered(fused), clip)
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert seen and all(lo <= ptr < hi for ptr in seen)  # every moment the kernel wrote lives in the arena
    assert [slot.handle for slot in opt._states.slots] == handles  # updated where it lives: no new blocks
    for pid, st in fused.state_dict()["state"].items():  # and the arena holds torch's moments, bit for bit
        assert torch.equal(opt.state_dict()["state"][pid]["exp_avg_sq"], st["exp_avg_sq"])
    assert all(j.param_bytes == 0 for rec in opt.schedule_log for j in rec.jobs)  # no write-back
    opt.remove()
    assert not store.closed  # a store passed in belongs to the caller
    store.close()


# ---- the scheduler -----------------------------------------------------------------------------------------


def _work(n: int, *, every_s: float = 1e-4) -> list[SubgroupWork]:
    """``n`` subgroups of 1M elements whose gradients complete every ``every_s`` seconds."""
    return [
        SubgroupWork(index=i, numel=1_000_000, tier="dram", grad_bytes=2_000_000, param_bytes=2_000_000,
                     device_bytes=16_000_000, ready_s=every_s * i)
        for i in range(n)
    ]  # fmt: skip


def test_scheduler_respects_device_memory_and_never_loses_to_baselines():
    rates = Throughputs(
        cpu_params_per_s=1e9, device_params_per_s=5e10, h2d_bytes_per_s=2.5e10, d2h_bytes_per_s=2.5e10
    )
    work = _work(12)
    none = schedule_subgroups(work, rates, free_device_bytes=0)
    assert set(none.sides) == {"cpu"}
    some = schedule_subgroups(work, rates, free_device_bytes=1 << 30)
    share = some.device_fraction([w.numel for w in work])
    assert 0 < share < 1  # interleaved: both sides busy
    assert some.predicted_s <= min(some.baselines_s.values()) + 1e-12
    assert some.predicted_s < some.baselines_s["cpu_only"]
    # a fixed assignment re-simulated gives the predicted makespan
    assert simulate(work, dict(enumerate(some.sides)), some.order, rates) == pytest.approx(some.predicted_s)
    # gradients arriving slower than the device updates: the device alone keeps up
    slow = schedule_subgroups(_work(12, every_s=2e-3), rates, free_device_bytes=1 << 30)
    assert slow.predicted_s <= slow.baselines_s["cpu_only"]
    # state on the device always updates there, whatever the memory
    pinned = [SubgroupWork(index=0, numel=10, tier="device"), *_work(3)[1:]]
    assert schedule_subgroups(pinned, rates, free_device_bytes=0).sides[0] == "device"


def test_scheduler_on_a_cpu_only_machine_keeps_the_update_on_the_cpu():
    # the "device" is the CPU: copies in and out buy nothing, the kernels share the cores
    rates = Throughputs(
        cpu_params_per_s=3e8,
        device_params_per_s=3e8,
        h2d_bytes_per_s=5e9,
        d2h_bytes_per_s=5e9,
        shared_compute=True,
    )
    work = [dataclasses.replace(w, grad_bytes=4_000_000, param_bytes=4_000_000) for w in _work(8)]
    s = schedule_subgroups(work, rates, free_device_bytes=1 << 40)
    assert s.strategy in ("greedy", "cpu_only") and set(s.sides) == {"cpu"}


def test_rate_meter_moves_towards_measurements():
    start = Throughputs(
        cpu_params_per_s=1e8, device_params_per_s=1e8, h2d_bytes_per_s=1e9, d2h_bytes_per_s=1e9
    )
    meter = RateMeter(start, smoothing=0.5)
    job = JobRecord(index=0, side="cpu", numel=4_000_000, start_s=0, end_s=0.02, kernel_s=0.01, grads_s=0.001,
                    grad_bytes=16_000_000)  # fmt: skip
    rates = meter.update([job])
    assert rates.cpu_params_per_s == pytest.approx(0.5 * 1e8 + 0.5 * 4e8)
    assert rates.d2h_bytes_per_s == pytest.approx(0.5 * 1e9 + 0.5 * 1.6e10)
    assert rates.device_params_per_s == 1e8  # nothing measured on the device


def test_schedule_follows_phase_memory_and_falls_back(caplog):
    model = make_net()
    calls = []

    def free(phase):
        calls.append(phase)
        return 0 if phase == "backward" else 1 << 30

    opt = OffloadedAdamW(
        model.parameters(), lr=1e-3, subgroup_size=SUBGROUP, throughputs=FAST_DEVICE, free_device_bytes=free,
        settings=OffloadSettings(cpu_kernel="torch_fused"),
    )  # fmt: skip
    caplog.set_level("DEBUG", logger="memtier.offload.optimizer")
    # no clipping: decided in backward, where no device memory is free -> all on the CPU
    loss_of(model, batch(0, 0)).backward()
    opt.step()
    rec = opt.schedule_log[-1]
    assert rec.schedule.phase == "backward" and set(rec.schedule.sides) == {"cpu"}
    # with clipping the decision is taken in step(), where memory is free -> the fast device gets work
    opt.settings = opt.settings.replace(max_grad_norm=1.0)
    loss_of(model, batch(1, 0)).backward()
    opt.step()
    rec = opt.schedule_log[-1]
    assert rec.schedule.phase == "step" and "device" in rec.schedule.sides
    assert set(rec.executed_sides.values()) >= {"device"} and not rec.fallbacks
    assert "iteration 1 (step)" in caplog.text
    # memory gone by the time the device lane starts: the subgroup falls back to the CPU, logged
    state = {"n": 0}

    def shrinking(phase):
        state["n"] += 1
        return (1 << 30) if state["n"] == 1 else 0

    opt._free_device_bytes_fn = shrinking
    loss_of(model, batch(2, 0)).backward()
    opt.step()
    rec = opt.schedule_log[-1]
    assert "device" in rec.schedule.sides and rec.fallbacks
    assert all(rec.executed_sides[i] == "cpu" for i in rec.fallbacks)
    assert "fell back to the CPU" in caplog.text
    opt.remove()


@pytest.mark.parametrize("schedule", ["cpu", "auto"])
def test_every_step_is_logged_forced_schedules_decided_once(schedule):
    """Every step() reaches schedule_log, in order, whenever it is read. A forced schedule is decided once (per
    mode, phase and readiness order) and its iterations are folded into the rates in batches; the scheduler
    ("auto") decides every iteration from rates that include the iteration before."""
    model = make_net()
    opt = OffloadedAdamW(
        model.parameters(), lr=1e-3, subgroup_size=SUBGROUP,
        settings=OffloadSettings(schedule=schedule, cpu_kernel="torch_fused"),
    )  # fmt: skip
    initial = opt.throughputs
    steps = 40  # more than one batch of a forced schedule's records
    for step in range(steps):
        loss_of(model, batch(step, 0)).backward()
        opt.step()
        opt.zero_grad()
        if step == 2:
            assert [r.iteration for r in opt.schedule_log] == [
                0,
                1,
                2,
            ]  # reading the log brings it up to date
    log = list(opt.schedule_log)
    assert [r.iteration for r in log] == list(range(steps))
    assert all(len(r.jobs) == len(opt.subgroups) for r in log)
    assert opt.throughputs.cpu_params_per_s != initial.cpu_params_per_s  # measurements folded in
    later = log[4:]
    if schedule == "cpu":
        # the first iteration's observed readiness order replaces the default one once; then one decision
        assert len({id(r.schedule) for r in later}) == 1
        assert all(set(r.schedule.sides) == {"cpu"} and r.schedule.strategy == "forced:cpu" for r in log)
    else:
        assert len({id(r.schedule) for r in later}) == len(later)
        assert all(a.rates != b.rates for a, b in zip(later, later[1:]))  # every iteration measured
    opt.remove()


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
def test_cpu_parameters_move_into_huge_pages_and_train_bit_identically():
    """On a CPU device the fp32 parameters that own their storage move into one huge-page buffer (same
    Parameter objects, same bytes); a parameter sharing its storage stays; training is bit-identical."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 8))
        m.register_parameter("alias", nn.Parameter(m[0].bias.data))  # shares the bias's storage
        return m

    model, ref = build(), build()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    opt = OffloadedAdamW(
        model.parameters(), lr=1e-2, subgroup_size=1 << 20, settings=OffloadSettings(cpu_kernel="torch_fused")
    )
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    assert opt.params_in_huge_pages == 3  # both weights and the last bias; not the bias and its alias
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1])
    assert "hg" in vm_flags(model[0].weight.data_ptr())
    assert model.alias.data_ptr() == model[0].bias.data_ptr()  # still shared
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (ref, ropt)):
        for _ in range(3):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    opt.remove()


def test_zero_grad_clears_gradients_kept_or_set_after_step():
    model = make_net()
    params = list(model.parameters())
    opt = OffloadedAdamW(
        params,
        lr=1e-3,
        subgroup_size=SUBGROUP,
        settings=OffloadSettings(free_grads=False, cpu_kernel="torch_fused"),
    )
    loss_of(model, batch(0, 0)).backward()
    opt.step()
    assert all(p.grad is not None for p in params)  # free_grads=False keeps them
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    params[0].grad = torch.ones_like(params[0])  # set by hand after step()
    opt.zero_grad()
    assert params[0].grad is None
    opt.remove()


# ---- state dict, checkpoints --------------------------------------------------------------------------------


def test_state_dict_round_trips_with_torch_adamw(tmp_path):
    model, ref = make_net(), make_net()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(ropt, lr_lambda)
    train(ref, ropt, sched, steps=3, clip=None)
    model.load_state_dict(ref.state_dict())
    plan = OptimizerPlan(offload=True, tier="nvme", subgroup_size=SUBGROUP)
    opt = OffloadedAdamW(
        model.parameters(), placement=plan, tier_plans=(TierPlan(kind="nvme", capacity_bytes=0, path=str(tmp_path)),),
        settings=OffloadSettings(cpu_kernel="torch_fused", nvme_io_engine="posix"),
    )  # fmt: skip
    opt.load_state_dict(ropt.state_dict())  # torch's AdamW state into NVMe-resident subgroups
    assert opt.param_groups[0]["lr"] == ropt.param_groups[0]["lr"]
    for m, o in ((model, opt), (ref, ropt)):
        for step in range(3, 5):
            loss_of(m, batch(step, 0)).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # and back: our state dict loads into torch's AdamW
    back = torch.optim.AdamW(copy.deepcopy(ref).parameters(), lr=1e-2, fused=True)
    back.load_state_dict(opt.state_dict())
    for pid, st in ropt.state_dict()["state"].items():
        assert torch.equal(back.state_dict()["state"][pid]["exp_avg_sq"], st["exp_avg_sq"])
    opt.remove()
    with pytest.raises(OptimizerOffloadError, match="removed"):
        opt.step()


def test_checkpoint_is_atomic_and_checked(tmp_path):
    model = make_net()
    opt = OffloadedAdamW(
        model.parameters(),
        lr=1e-2,
        subgroup_size=SUBGROUP,
        settings=OffloadSettings(cpu_kernel="torch_fused"),
    )
    loss_of(model, batch(0, 0)).backward()
    opt.step()
    path = tmp_path / "opt.bin"
    opt.save_checkpoint(str(path))
    good = path.read_bytes()

    # a save that fails half-way leaves the previous checkpoint intact and no temporary behind
    def failing():
        yield torch.ones(10)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_checkpoint(path, {"format": "x"}, failing())
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["opt.bin"]

    other = OffloadedAdamW(
        copy.deepcopy(model).parameters(),
        subgroup_size=SUBGROUP,
        settings=OffloadSettings(cpu_kernel="torch_fused"),
    )
    other.load_checkpoint(str(path))
    for i in range(len(opt.subgroups)):
        assert torch.equal(other.subgroup_state(i), opt.subgroup_state(i))
    # a flipped bit in the first block (it starts at the first 4096-byte boundary after the header)
    data = bytearray(good)
    data[4096 + 16] ^= 0x01
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC32|trailer"):
        other.load_checkpoint(str(tmp_path / "bad.bin"))
    (tmp_path / "short.bin").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"short\.bin.*(truncated|trailer)"):
        other.load_checkpoint(str(tmp_path / "short.bin"))
    # another partition of the same parameters
    coarse = OffloadedAdamW(
        copy.deepcopy(model).parameters(), subgroup_size=0, settings=OffloadSettings(cpu_kernel="torch_fused")
    )
    with pytest.raises(CheckpointError) as info:
        coarse.load_checkpoint(str(path))
    assert info.value.field == "subgroups" and str(path) in str(info.value)
    for o in (opt, other, coarse):
        o.remove()


# ---- bad input ---------------------------------------------------------------------------------------------


def _plan(tmp_path, *, optimizer: OptimizerPlan, grad_accum: int = ACCUM):
    from planner.plan import Layout, Plan
    from planner.presets import MODEL_PRESETS, resolve_cluster
    from planner.workload import Workload

    return Plan(
        model=MODEL_PRESETS["tiny-llama"],
        cluster=resolve_cluster("rtx4090-nvme"),
        workload=Workload(global_batch=grad_accum, seq_len=64, dtype="fp32"),
        layout=Layout(grad_accum=grad_accum),
        optimizer=optimizer,
        tiers=(TierPlan(kind="nvme", capacity_bytes=1 << 30, path=str(tmp_path)),),
    )


def test_bad_settings_plans_and_calls_name_the_field(tmp_path):
    with pytest.raises(OptimizerOffloadError) as info:
        OffloadSettings(grad_accum=0)
    assert info.value.field == "grad_accum"
    with pytest.raises(ValueError, match="max_grad_norm"):
        OffloadSettings(max_grad_norm=-1.0)
    model = make_net()
    with pytest.raises(OptimizerOffloadError) as info:
        OffloadedAdamW([{"params": list(model.parameters()), "amsgrad": True}])
    assert info.value.field == "param_groups[0].amsgrad"
    with pytest.raises(OptimizerOffloadError) as info:
        OffloadedAdamW(
            model.parameters(),
            placement=OptimizerPlan(offload=True, tier="nvme"),
            settings=OffloadSettings(cpu_kernel="torch_fused"),
        )
    assert info.value.field == "tiers.nvme.path"

    plan = _plan(tmp_path, optimizer=OptimizerPlan(offload=True, tier="dram"))
    with pytest.raises(OptimizerOffloadError) as info:
        offload_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), plan)
    assert info.value.field == "optimizer"
    with pytest.raises(OptimizerOffloadError) as info:
        offload_optimizer(
            model,
            torch.optim.AdamW(model.parameters()),
            _plan(tmp_path, optimizer=OptimizerPlan(kind="galore", offload=True)),
        )
    assert info.value.field == "optimizer.kind"
    with pytest.raises(OptimizerOffloadError) as info:
        offload_optimizer(model, torch.optim.AdamW(make_net().parameters()), plan)
    assert info.value.field == "param_groups[0].params[0]"

    opt = OffloadedAdamW(model.parameters(), settings=OffloadSettings(grad_accum=1, cpu_kernel="torch_fused"))
    loss_of(model, batch(0, 0)).backward()
    with pytest.raises(OptimizerOffloadError, match="grad_accum"):
        loss_of(model, batch(0, 1)).backward()  # a second backward before step() with grad_accum=1
    with pytest.raises(OptimizerOffloadError) as info:
        opt.zero_grad()  # the first backward already started updates
    assert info.value.field == "zero_grad"
    opt.step()
    opt.remove()


def test_offload_optimizer_carries_out_a_planned_placement(tmp_path):
    """ModelSpec -> placement (planner) -> Plan -> offload_optimizer on the HF model built from the spec."""
    from planner.optimizer_placement import PlacementSettings, place_optimizer
    from planner.plan import Layout
    from tests.helpers import hf_model

    plan = _plan(tmp_path, optimizer=OptimizerPlan(), grad_accum=2)
    params = plan.model.params
    dram = dataclasses.replace(plan.cluster.host[0], capacity=int(params * 12 * 0.6 / 0.9))  # ~60% fits
    cluster = dataclasses.replace(plan.cluster, host=(dram, *plan.cluster.host[1:]))
    placement = place_optimizer(
        plan.model, cluster, plan.workload, Layout(grad_accum=2), 1 << 30,
        settings=PlacementSettings(target_subgroups=6, min_subgroup_elems=1024, round_elems=1024),
    )  # fmt: skip
    assert {sg.tier for sg in placement.subgroups} == {"dram", "nvme"}
    plan = plan.replace(cluster=cluster, optimizer=placement)

    model = hf_model(plan.model)
    ref = copy.deepcopy(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = offload_optimizer(
        model, adamw, plan,
        settings=OffloadSettings(grad_accum=2, cpu_kernel="torch_fused", nvme_io_engine="posix"),
    )  # fmt: skip
    assert opt.param_groups is adamw.param_groups  # shared: a scheduler on either drives both
    assert set(opt.subgroup_tiers) == {"dram", "nvme"}
    assert opt.subgroup_tiers[-1] == "dram" and opt.subgroup_tiers[0] == "nvme"  # last updated first: DRAM
    rref = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, plan.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for m, o in ((model, opt), (ref, rref)):
        for _ in range(2):
            for _ in range(2):
                (m(ids, labels=ids).loss / 2).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    opt.remove()


@pytest.mark.skipif(
    not deepspeed_cpu_adam_prebuilt(), reason="DeepSpeed's cpu_adam op is not built (optional)"
)
def test_deepspeed_cpu_adam_kernel_is_close_to_torch():
    assert deepspeed_cpu_adam_status(build=False)[0]
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(10_000, generator=gen)
    tensors = {name: [p.clone(), torch.zeros_like(p), torch.zeros_like(p)] for name in ("torch", "ds")}
    hyper = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    kernels = {"torch": TorchFusedAdamW(), "ds": DeepSpeedCpuAdam()}
    for step in range(1, 6):
        g = torch.randn(10_000, generator=gen)
        for name, (param, m, v) in tensors.items():
            t = AdamWTensors(params=[param], grads=[g], exp_avgs=[m], exp_avg_sqs=[v], steps=[float(step)])
            kernels[name](t, hyper)
    torch.testing.assert_close(tensors["ds"][0], tensors["torch"][0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(tensors["ds"][0], p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_interleaved_update_matches_fused_adamw():
    model = make_net().cuda()
    ref = copy.deepcopy(model)
    opt = OffloadedAdamW(
        groups(model), lr=3e-3, placement=interleaved_plan(model, "dram"), throughputs=FAST_DEVICE,
        settings=OffloadSettings(grad_accum=ACCUM, max_grad_norm=MAX_NORM, schedule="plan", cpu_kernel="torch_fused"),
    )  # fmt: skip
    fused = torch.optim.AdamW(groups(ref), lr=3e-3, fused=True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in (opt, fused)]

    def on_cuda(step, micro):
        return batch(step, micro).cuda()

    for m, o, sc in ((model, opt, scheds[0]), (ref, fused, scheds[1])):
        for step in range(5):
            for micro in range(ACCUM):
                (loss_of(m, on_cuda(step, micro)) / ACCUM).backward()
            if o is fused:
                torch.nn.utils.clip_grad_norm_(ordered(fused), MAX_NORM)
            o.step()
            o.zero_grad()
            sc.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # CPU and CUDA kernels: close, not identical
    assert {s for rec in opt.schedule_log for s in rec.executed_sides.values()} == {"cpu", "device"}
    opt.remove()


# ---- save at step 10, SIGKILL, resume -------------------------------------------------------------------------


def _run_training(
    out: Path, *, steps: int, save_at: int | None, resume: bool, nvme_dir: str, pause_after_save: float
) -> None:
    """The training program of the resume test: NVMe-resident state, accumulation, clipping, a scheduler."""
    import time

    torch.set_num_threads(1)
    model = make_net()
    plan = OptimizerPlan(offload=True, tier="nvme", subgroup_size=SUBGROUP)
    opt = OffloadedAdamW(
        groups(model), lr=3e-3, placement=plan,
        tier_plans=(TierPlan(kind="nvme", capacity_bytes=0, path=nvme_dir),),
        settings=OffloadSettings(grad_accum=ACCUM, max_grad_norm=MAX_NORM, cpu_kernel="torch_fused",
                                 nvme_io_engine="posix"),
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    first = 0
    if resume:
        meta = json.loads((out / "ckpt.json").read_text())
        model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        opt.load_checkpoint(str(out / "opt.bin"))
        sched.load_state_dict(meta["scheduler"])
        first = meta["step"]
    for step in range(first, steps):
        loss = train(model, opt, sched, steps=1, first=step, clip=MAX_NORM)[0]
        print(f"loss {step + 1} {float(loss).hex()}", flush=True)
        if save_at is not None and step + 1 == save_at:
            # write-then-rename for every file; the JSON marker last, so a complete marker means all of it
            torch.save(model.state_dict(), out / "model.pt.tmp")
            os.replace(out / "model.pt.tmp", out / "model.pt")
            opt.save_checkpoint(str(out / "opt.bin"))
            meta = {"step": step + 1, "scheduler": sched.state_dict()}
            (out / "ckpt.json.tmp").write_text(json.dumps(meta))
            os.replace(out / "ckpt.json.tmp", out / "ckpt.json")
            print(f"saved {step + 1}", flush=True)
        if save_at is not None and step + 1 > save_at:
            time.sleep(pause_after_save)  # keep training slowly: the parent kills us in the middle
    opt.remove()


def _child(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "train", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _losses(text: str) -> dict[int, str]:
    return {int(parts[1]): parts[2] for line in text.splitlines() if (parts := line.split())[:1] == ["loss"]}


@pytest.mark.integration
def test_resume_after_sigkill_repeats_the_loss_sequence(tmp_path):
    full_dir, run_dir = tmp_path / "full", tmp_path / "run"
    for d in (full_dir, run_dir, tmp_path / "nvme"):
        d.mkdir()
    nvme = str(tmp_path / "nvme")
    full = _child(["--out", str(full_dir), "--steps", "20", "--nvme", nvme], tmp_path)
    victim = _child(["--out", str(run_dir), "--steps", "20", "--save-at", "10", "--nvme", nvme], tmp_path)
    assert victim.stdout is not None
    seen = []
    for line in victim.stdout:
        seen.append(line)
        if line.startswith("saved 10"):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=120)
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read() if victim.stderr else ""
    assert "loss 20" not in "".join(seen)  # it died before finishing
    resumed = _child(["--out", str(run_dir), "--steps", "20", "--resume", "--nvme", nvme], tmp_path)
    r_out, r_err = resumed.communicate(timeout=240)
    f_out, f_err = full.communicate(timeout=240)
    assert resumed.returncode == 0, r_err
    assert full.returncode == 0, f_err
    uninterrupted, after = _losses(f_out), _losses(r_out)
    assert sorted(after) == list(range(11, 21))
    assert {k: uninterrupted[k] for k in range(11, 21)} == after  # bit-exact loss sequence
    assert _losses("".join(seen))[10] == uninterrupted[10]


if __name__ == "__main__" and sys.argv[1:2] == ["train"]:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--nvme", required=True)
    parser.add_argument("--pause", type=float, default=0.5)
    a = parser.parse_args()
    _run_training(
        a.out, steps=a.steps, save_at=a.save_at, resume=a.resume, nvme_dir=a.nvme, pause_after_save=a.pause
    )
