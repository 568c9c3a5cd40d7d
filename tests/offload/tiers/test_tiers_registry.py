"""make_tier / available: every kind through one factory, bad kinds and settings named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from offload.tiers import TIER_KINDS, TierStore, TierValueError, availability, available, make_tier


def test_every_kind_builds_and_round_trips(tmp_path: Path) -> None:
    settings: dict[str, dict[str, Any]] = {
        "host": {"capacity_bytes": 1 << 20},
        "cxl": {"capacity_bytes": 1 << 20, "node": 0},
        "nvme": {"path": tmp_path, "capacity_bytes": 1 << 20, "io_engine": "posix"},
    }
    assert set(TIER_KINDS) == set(settings)
    t = torch.randn(1000)
    for kind, kw in settings.items():
        with make_tier(kind, **kw) as store:
            assert isinstance(store, TierStore) and store.kind == kind
            h = store.put(t)
            assert h.tier == kind and torch.equal(store.get(h), t)
            assert 0 < store.used_bytes <= store.capacity_bytes


def test_availability() -> None:
    assert available("host") and available("nvme")
    ok, why = availability("cxl")
    assert ok or why
    with pytest.raises(TierValueError, match="kind"):
        available("tape")


def test_bad_kind_and_setting_are_named(tmp_path: Path) -> None:
    with pytest.raises(TierValueError, match=r"kind: unknown tier kind 'ram'"):
        make_tier("ram")
    with pytest.raises(TierValueError, match="settings"):
        make_tier("host", capacity_bytes=4096, size=3)
