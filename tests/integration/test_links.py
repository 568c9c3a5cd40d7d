"""`memtier probe --links` on an emulated cluster (namespaces + tc), and the emulated cluster's cleanup."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch.measure import links, netem
from planner.cluster import cluster_to_yaml, load_cluster
from planner.mapping import LinkEvaluator, anneal_mapping
from planner.plan import Layout
from tests.integration.helpers import ROOT, cpu_cluster

MB = 1e6
FAST_MBIT, SLOW_MBIT = 400.0, 100.0


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _measurement(bw: np.ndarray, per: int) -> links.LinkMeasurement:
    world = bw.shape[0]
    lat = np.full((world, world), 1e-4)
    np.fill_diagonal(lat, 0.0)
    return links.LinkMeasurement(
        world_size=world,
        devices_per_node=per,
        backend="gloo",
        message_bytes=1 << 20,
        reps=1,
        alone_bandwidth=bw.tolist(),
        parallel_bandwidth=bw.tolist(),
        latency=lat.tolist(),
        allreduce=[],
        seconds=0.0,
    )


# ------------------------------------------------------------------------------------------- unit
@pytest.mark.parametrize("world", [2, 3, 4, 5, 8])
def test_round_robin_rounds_pair_every_rank_once(world):
    rounds = links.round_robin_rounds(world)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(world), 2))
    for r in rounds:
        ranks = [x for p in r for x in p]
        assert len(ranks) == len(set(ranks))  # a rank is in one pair per round


def test_busbw_is_nccl_tests_ring_factor():
    assert links.busbw(10.0, 2) == pytest.approx(10.0)
    assert links.busbw(10.0, 8) == pytest.approx(10.0 * 2 * 7 / 8)
    assert links.allreduce_group_sizes(6) == [2, 4, 6]


def test_measured_matrix_reaches_the_mapping_unchanged(tmp_path):
    """3 nodes x 2 devices: a slow node pair and one slow device pair survive the YAML round trip as
    measured, and the mapping stage sees exactly those numbers."""
    per, nodes = 2, 3
    world = per * nodes
    node_bw = np.array([[20e9, 1e9, 5e9], [1e9, 20e9, 5e9], [5e9, 5e9, 20e9]])
    bw = np.array([[node_bw[i // per, j // per] for j in range(world)] for i in range(world)])
    bw[0, 5] = bw[5, 0] = 2e9  # n0:d0 <-> n2:d1 is slower than the rest of n0-n2
    np.fill_diagonal(bw, 0.0)
    cluster = links.to_cluster(cpu_cluster(1), _measurement(bw, per))
    path = tmp_path / "cluster.yaml"
    path.write_text(cluster_to_yaml(cluster))
    loaded = load_cluster(path)
    assert (loaded.nodes, loaded.devices_per_node) == (nodes, per)
    expected = bw.copy()
    np.fill_diagonal(expected, np.inf)
    np.testing.assert_array_equal(loaded.bandwidth_matrix(), expected)
    ev = LinkEvaluator(Layout(dp=world), loaded)
    assert ev.links(np.arange(world))["dp"].bandwidth == 1e9  # the ring's 1 -> 2 edge crosses n0-n1


def test_mapping_avoids_a_measured_slow_pair():
    """4 nodes, one slow pair: the searched ring order keeps the dp ring off it; uniform links keep the default."""
    world = 4
    bw = np.full((world, world), 50e6)
    bw[0, 1] = bw[1, 0] = 12.5e6
    np.fill_diagonal(bw, 0.0)
    measured = links.to_cluster(cpu_cluster(1), _measurement(bw, 1))
    layout = Layout(dp=world)

    def cost(group_links):
        return 1.0 / group_links["dp"].bandwidth

    searched = anneal_mapping(layout, measured, cost)
    assert searched.gain == pytest.approx(4.0)
    assert searched.links["dp"].bandwidth == 50e6
    uniform = links.to_cluster(cpu_cluster(1), _measurement(np.where(bw > 0, 50e6, 0.0), 1))
    assert anneal_mapping(layout, uniform, cost).is_default


def test_probe_links_on_one_machine(tmp_path):
    """`memtier probe --links --nproc-per-node 2` (gloo, no namespaces): one node, an intra-node link."""
    base, out = tmp_path / "base.yaml", tmp_path / "cluster.yaml"
    base.write_text(cluster_to_yaml(cpu_cluster(1)))
    argv = [
        sys.executable,
        "-m",
        "launch.cli",
        "probe",
        "--links",
        "--nproc-per-node",
        "2",
        "--cluster",
        str(base),
    ]
    argv += ["--out", str(out), "--message-bytes", "1MiB", "--reps", "2"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = load_cluster(out)
    assert (measured.nodes, measured.devices_per_node) == (1, 2)
    assert measured.link(0, 1).bandwidth > 0
    assert [o.between for o in measured.links.overrides] == [("n0", "n0")]


# ------------------------------------------------------------------------------------------- cleanup
def test_cluster_is_removed_when_the_block_raises():
    reason = netem.available()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: {reason}")
    before = _host_links()
    names = []
    shapes = netem.uniform_shapes(2, 100.0)
    with pytest.raises(RuntimeError, match="boom"), netem.emulated_cluster(shapes, tag="raise") as cluster:
        names = list(cluster.names)
        assert set(names) <= set(netem.namespaces())
        raise RuntimeError("boom")
    assert not set(names) & set(netem.namespaces())
    assert _host_links() == before  # the veths never lived in the host's namespace


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_cluster_is_removed_when_its_process_is_killed(sig):
    reason = netem.available()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: {reason}")
    before = _host_links()
    cmd = [sys.executable, "-m", "launch.measure.netem", "--nodes", "2", "--", "sleep", "60"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    prefix = f"{netem.PREFIX}{proc.pid}-"
    try:
        deadline = time.monotonic() + 20
        while len([n for n in netem.namespaces() if n.startswith(prefix)]) < 2:
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.1)
        time.sleep(0.3)  # links and routes are added after the namespaces
        proc.send_signal(sig)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGKILL:  # nothing ran in the dead process: the next user removes what it left
        netem.remove_stale()
    assert not [n for n in netem.namespaces() if n.startswith(prefix)]
    assert _host_links() == before


# ------------------------------------------------------------------------------------------- the probe
def test_probe_links_recovers_each_links_tc_rate(emulated_cluster, tmp_path):
    """3 nodes, links at 400 mbit except n0-n1 at 100 mbit (tbf): `memtier probe --links` under
    torchrun (one agent per namespace) writes each node pair's bandwidth within 20% of its tc rate."""
    shapes = netem.uniform_shapes(3, FAST_MBIT)
    shapes = netem.with_link(shapes, 0, 1, netem.LinkShape(rate_mbit=SLOW_MBIT))
    cluster = emulated_cluster(shapes)
    base, out = tmp_path / "base.yaml", tmp_path / "cluster.yaml"
    base.write_text(cluster_to_yaml(cpu_cluster(1)))
    argv = [sys.executable, "-m", "launch.cli", "probe", "--links", "--nnodes", "3", "--nproc-per-node", "1"]
    argv += ["--rdzv-endpoint", cluster.rdzv_endpoint(29511), "--cluster", str(base), "--out", str(out)]
    argv += ["--message-bytes", "4MiB", "--reps", "3"]
    results = cluster.run_all(lambda k: [*argv, "--node-rank", str(k)], timeout_s=240, cwd=ROOT)
    for k, r in enumerate(results):
        assert r.returncode == 0, f"node {k}: {r.stderr[-3000:]}"
    measured = load_cluster(out)
    assert (measured.nodes, measured.devices_per_node) == (3, 1)
    bw, lat = measured.bandwidth_matrix(), measured.latency_matrix()
    rows = []
    for i, j in itertools.combinations(range(3), 2):
        rate = cluster.shape(i, j).bytes_per_s
        rows.append(
            f"n{i}-n{j}: tc {rate / MB:6.2f} MB/s, measured {bw[i, j] / MB:6.2f} MB/s ({bw[i, j] / rate:.0%})"
        )
        assert 0.8 * rate <= bw[i, j] <= 1.2 * rate, rows[-1]
    print("\n".join(rows))
    # one-way latency = half a 4-byte round trip: no delay is emulated, so the stack's microseconds
    assert all(0 < lat[i, j] < 5e-3 for i, j in itertools.combinations(range(3), 2)), lat
    json_path, png_path = links.side_paths(str(out))
    with open(json_path) as fh:
        report = json.load(fh)["measurement"]
    assert [a["ranks"] for a in report["allreduce"]] == [2, 3]
    assert os.path.getsize(png_path) > 0
