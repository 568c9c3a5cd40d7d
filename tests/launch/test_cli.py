"""Bad input exits 2 with a message naming the file and the field; no traceback."""

import json
import subprocess
import sys

import pytest
import yaml

from launch.cli import main
from planner.cluster import cluster_to_yaml, load_cluster
from planner.presets import resolve_cluster


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_verbs():
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for verb in ("probe", "estimate", "plan", "launch", "bench"):
        assert verb in proc.stdout


def test_estimate_summary_json(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "llama3-8b", "--cluster", "dgx-a100-8x80g", "--json")
    assert code == 0
    assert json.loads(out)["params"] == 8_030_261_248


def test_unknown_model_preset(capsys):
    code, _, err = run(capsys, "estimate", "--model", "llama3-7b", "--cluster", "dgx-a100-8x80g")
    assert code == 2
    assert "unknown model preset 'llama3-7b'" in err and "llama3-8b" in err
    assert "Traceback" not in err


def test_unknown_cluster_preset(capsys):
    code, _, err = run(capsys, "estimate", "--model", "gpt2", "--cluster", "dgx-b200")
    assert code == 2 and "unknown cluster preset 'dgx-b200'" in err


def test_malformed_yaml(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndevice: [1, 2\nnodes: 1\n")
    code, _, err = run(capsys, "estimate", "--model", "gpt2", "--cluster", str(path))
    assert code == 2
    assert f"{path}:" in err and "malformed YAML" in err


def test_malformed_json_model(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama",\n "hidden_size": }')
    code, _, err = run(capsys, "estimate", "--model", str(path), "--cluster", "dgx-a100-8x80g")
    assert code == 2 and f"{path}:2" in err and "malformed JSON" in err


def _cluster_file(tmp_path, mutate):
    data = yaml.safe_load(cluster_to_yaml(resolve_cluster("dgx-a100-8x80g")))
    mutate(data)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_dotted(capsys, tmp_path):
    path = _cluster_file(tmp_path, lambda d: d["links"]["inter_node"].update(bandwith="1GB/s"))
    code, _, err = run(capsys, "estimate", "--model", "gpt2", "--cluster", str(path))
    assert code == 2 and "links.inter_node.bandwith: unknown key" in err and str(path) in err


def test_wrong_type(capsys, tmp_path):
    path = _cluster_file(tmp_path, lambda d: d.update(devices_per_node="eight"))
    code, _, err = run(capsys, "estimate", "--model", "gpt2", "--cluster", str(path))
    assert code == 2 and "devices_per_node: expected an integer" in err


def test_non_positive_size(capsys, tmp_path):
    path = _cluster_file(tmp_path, lambda d: d["device"].update(memory=-5))
    code, _, err = run(capsys, "estimate", "--model", "gpt2", "--cluster", str(path))
    assert code == 2 and "device.memory: must be positive" in err


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "estimate", "--model", "gpt2", "--cluster", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: file not found" in err


def test_debug_shows_traceback(capsys):
    code, _, err = run(capsys, "--debug", "estimate", "--model", "nope", "--cluster", "dgx-a100-8x80g")
    assert code == 2 and "Traceback" in err


@pytest.mark.timeout(600)  # a bound on a hang, not a speed test: a busy 2-core machine takes minutes
def test_probe_quick_writes_loadable_yaml(tmp_path):
    out = tmp_path / "local.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "probe",
            "--quick",
            "--out",
            str(out),
            "--disk",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[probe] GEMM fp32" in proc.stderr  # progress lines
    cluster = load_cluster(out)
    assert cluster.device.peak_flops["fp32"] > 1e9
    assert cluster.tier("nvme") is not None and cluster.tier("nvme").write_bandwidth > 0
    assert not list(tmp_path.glob(".memtier-probe-*"))  # the probe file is gone
    assert "[probe] transparent huge pages: " in proc.stderr
    assert cluster.device.compile_backend == "" and cluster.device.compile_factors("inductor") == (1.0, 1.0)


def test_probe_compile_measures_what_compile_changes_in_a_block():
    """`memtier probe --compile`: the partitioner's graph of the reference block saves less than eager, and
    the factors land in the device of the cluster the probe writes."""
    import dataclasses

    from launch.measure.compile_probe import measure_compile
    from launch.measure.probe import ProbeResult, to_cluster

    factors = measure_compile("aot_eager_decomp_partition", quick=True)
    assert 0 < factors.compiled_saved_bytes < factors.eager_saved_bytes
    assert factors.saved_ratio == factors.compiled_saved_bytes / factors.eager_saved_bytes
    assert factors.time_ratio > 0 and factors.compile_s > 0
    res = ProbeResult(
        cores=2, dram_bytes=8 << 30, gemm_flops={"fp32": 1e11, "bf16": 1e11}, block_efficiency=0.5,
        block_overhead_s=0.0, copy_bandwidth=5e9, adam_params_per_s=1e9, disk_path="/tmp", disk_free_bytes=1 << 30,
        disk_write_bandwidth=1e9, disk_read_bandwidth=1e9, disk_direct_io=True, numa_nodes=(), gpus=(), seconds=1.0,
    )  # fmt: skip
    dev = to_cluster(dataclasses.replace(res, compile=factors)).device
    assert dev.compile_backend == "aot_eager_decomp_partition"
    assert dev.compile_saved_ratio == round(factors.saved_ratio, 4) < 1.0
    assert to_cluster(res).device.compile_backend == ""  # not probed: nothing claimed
    # probed at each partitioner budget: the saved set falls with the budget (measured); the time ratios are
    # made monotone by the probe, so a lower budget is never costed faster
    rows = dev.compile_budgets
    assert (
        [r.budget for r in rows]
        == [1.0, 0.8, 0.6, 0.4, 0.2]
        == list(dev.partitioner_budgets(dev.compile_backend))
    )
    assert rows[-1].saved_ratio < rows[0].saved_ratio
    assert all(a.time_ratio <= b.time_ratio for a, b in zip(rows, rows[1:]))
    assert dev.compile_factors(dev.compile_backend, 0.4) == (rows[3].saved_ratio, rows[3].time_ratio)
    assert dev.partitioner_budgets("inductor") == ()  # another backend: not probed


def test_transparent_huge_pages_reads_the_bracketed_mode(tmp_path):
    from launch.measure.probe import transparent_huge_pages

    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert transparent_huge_pages(str(mode)) == "madvise"
    mode.write_text("[always] madvise never\n")
    assert transparent_huge_pages(str(mode)) == "always"
    assert transparent_huge_pages(str(tmp_path / "missing")) == "unavailable"


def test_probe_bad_disk(capsys, tmp_path):
    code, _, err = run(capsys, "probe", "--quick", "--disk", str(tmp_path / "missing"))
    assert code == 2 and "--disk" in err and "not a directory" in err


def test_block_cost_fit_recovers_rate_and_overhead():
    from launch.measure.probe import fit_block_cost

    rate, overhead = 2e11, 3e-3
    points = [(f, f / rate + overhead) for f in (1e9, 4e9, 2e10)]
    got_rate, got_overhead = fit_block_cost(points)
    assert got_rate == pytest.approx(rate, rel=1e-9) and got_overhead == pytest.approx(overhead, rel=1e-9)
    # noise that would make the intercept negative: no negative fixed cost, rate through the origin
    r2, o2 = fit_block_cost([(1e9, 0.004), (2e9, 0.0095), (4e9, 0.0205)])
    assert o2 == 0.0 and 1.9e11 < r2 < 2.1e11
