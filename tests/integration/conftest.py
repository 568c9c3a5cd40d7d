"""Fixtures of the multi-process tests: an emulated multi-node cluster (network namespaces + tc)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import pytest

from launch.measure import netem


@pytest.fixture
def emulated_cluster() -> Iterator[
    Callable[[Sequence[Sequence[netem.LinkShape | None]]], netem.EmulatedCluster]
]:
    """`emulated_cluster(shapes)` builds N namespaces with shaped links; all are removed after the test."""
    reason = netem.available()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: {reason}")
    with contextlib.ExitStack() as stack:
        made = []

        def make(shapes: Sequence[Sequence[netem.LinkShape | None]]) -> netem.EmulatedCluster:
            cluster = stack.enter_context(netem.emulated_cluster(shapes, tag=f"t{len(made)}"))
            made.append(cluster)
            return cluster

        yield make
    left = [n for c in made for n in c.names if n in netem.namespaces()]
    assert not left, f"namespaces left behind: {left}"
