"""Plan tiers -> stores (offload.tiers.factory): the "dram" -> "host" mapping, settings, caps enforced once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from offload.tiers import HostTier, NvmeTier, TierCapacityError
from offload.tiers.factory import STORE_KINDS, TierPlanError, bytes_for_blocks, stores_for_plan, tier_settings
from planner.plan import TierPlan

DRAM = TierPlan(kind="dram", capacity_bytes=64 << 20)


def test_tier_settings_map_the_plan_entries():
    assert tier_settings(DRAM) == ("host", {"capacity_bytes": 64 << 20})
    kind, nvme = tier_settings(TierPlan(kind="nvme", capacity_bytes=1 << 30, path="/x", block_bytes=1 << 20))
    assert kind == "nvme" and nvme["path"] == "/x" and nvme["chunk_bytes"] == 1 << 20
    with pytest.raises(TierPlanError, match="needs a path") as err:
        tier_settings(TierPlan(kind="nvme", capacity_bytes=1))
    assert err.value.field == "tiers.nvme.path"
    with pytest.raises(TierPlanError, match="multiple of 4096") as err:
        tier_settings(TierPlan(kind="nvme", capacity_bytes=1, path="/x", block_bytes=1000))
    assert err.value.field == "tiers.nvme.block_bytes"
    assert tier_settings(TierPlan(kind="cxl", capacity_bytes=4096, numa_node=2)) == (
        "cxl",
        {"capacity_bytes": 4096, "node": 2},
    )
    assert STORE_KINDS["dram"] == "host"  # the one place that knows the plan's name of the host tier


def test_a_need_is_checked_against_the_cap_and_sizes_memory_arenas():
    need = bytes_for_blocks([1000, 512])
    assert need == 1024 + 512 + 512  # each block aligned to 512, plus one unit
    assert tier_settings(DRAM, need_bytes=need) == ("host", {"capacity_bytes": need})
    with pytest.raises(TierPlanError, match=r"need\(1025\) > capacity_bytes\(1024\)") as err:
        tier_settings(TierPlan(kind="dram", capacity_bytes=1024), need_bytes=1025)
    assert err.value.field == "tiers.dram.capacity_bytes"
    with pytest.raises(TierPlanError) as err:
        tier_settings(TierPlan(kind="nvme", capacity_bytes=4096, path="/x"), need_bytes=8192)
    assert err.value.field == "tiers.nvme.capacity_bytes"
    # no cap in the plan (0): the need is the size
    assert tier_settings(TierPlan(kind="dram", capacity_bytes=0), need_bytes=4096)[1] == {
        "capacity_bytes": 4096
    }


def test_stores_for_plan_builds_each_tier_and_the_store_holds_the_cap(tmp_path: Path):
    nvme = TierPlan(kind="nvme", capacity_bytes=1 << 20, path=str(tmp_path), direct_io=False)
    stores = stores_for_plan([TierPlan(kind="dram", capacity_bytes=8192), nvme], {"dram": None, "nvme": None},
                             nvme_io_engine="posix")  # fmt: skip
    try:
        assert isinstance(stores["dram"], HostTier) and isinstance(stores["nvme"], NvmeTier)
        assert stores["dram"].capacity_bytes == 8192  # no need given: the plan's whole cap
        with pytest.raises(TierCapacityError):
            stores["dram"].put(torch.zeros(4096))  # 16 KiB over an 8 KiB cap
    finally:
        for store in stores.values():
            store.close()
    # a memory tier the plan has no entry for is sized to the need; NVMe needs its entry (a path)
    (host,) = stores_for_plan([], {"dram": 4096}).values()
    assert host.capacity_bytes == 4096
    host.close()
    with pytest.raises(TierPlanError) as err:
        stores_for_plan([], {"nvme": 4096})
    assert err.value.field == "tiers.nvme.path"


def test_apply_refuses_a_bad_entry_before_installing_anything():
    import offload
    from offload.activations import PolicyError
    from planner.plan import ActivationPolicy, Plan
    from planner.presets import MODEL_PRESETS, resolve_cluster
    from planner.workload import Workload

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    plan = Plan(
        model=MODEL_PRESETS["tiny-llama"],
        cluster=resolve_cluster("rtx4090-nvme"),
        workload=Workload(global_batch=2, seq_len=8),
        activations=(ActivationPolicy(layer=0, keep_fraction=0.0, swap_fraction=1.0, swap_tier="nvme"),),
        tiers=(TierPlan(kind="nvme", capacity_bytes=1 << 20),),
    )
    with pytest.raises(PolicyError, match="needs a path") as err:
        offload.apply(model, None, plan, blocks=list(model))
    assert err.value.field == "tiers.nvme.path"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
