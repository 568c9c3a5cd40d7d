"""benchmarks/activations.py end to end on a tiny Llama: memtier's plan (swapping to a real NVMe-tier
directory) meets its activation budget as measured, eager and on compiled blocks (with the compiled model's
gradients), torch's sac_milp policy is carried out op-for-op and
saves less as the budget falls, and the JSON and plot are written."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import activations as bench


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """The folder the bench wrote activations.json/.png (and its NVMe tier's swap directory) to."""
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("bench")
    try:
        bench.main(
            [
                "--model=tiny-llama",
                "--layers=4",
                "--batch=2",
                "--seq-len=128",
                "--steps=1",
                "--strategies",
                "memtier",
                "memtier_compile",
                "sac_milp",
                "compile_budget",
                "--budgets",  # 25% is below what any strategy reaches on a 4-layer model
                "0.4",
                "0.5",
                "0.75",
                "--threads=1",
                "--compile-backend=aot_eager_decomp_partition",
                "--disk-probe-mib=2",
                f"--swap-dir={out / 'swap'}",
                f"--out={out / 'activations'}",
            ]
        )
    finally:
        torch.set_num_threads(before)
    assert (out / "activations.png").stat().st_size > 0
    return out


@pytest.fixture(scope="module")
def result(bench_out):
    with open(bench_out / "activations.json") as f:
        return json.load(f)


def _rows(result, strategy):
    return {r["budget_fraction"]: r for r in result["rows"] if r["strategy"] == strategy}


def test_memtier_meets_half_the_activation_peak(result):
    row = _rows(result, "memtier")[0.5]
    assert row["status"] == "ok", row.get("error")
    assert set(row["modes"]) - {"K"}, "half the peak cannot be met by keeping every block"
    assert row["act_peak_bytes"] <= row["budget_bytes"], (row["act_peak_bytes"], row["budget_bytes"])
    assert row["predicted_act_peak_bytes"] <= row["budget_bytes"]
    baseline = _rows(result, "no_offload")[0.5]
    assert baseline["act_peak_bytes"] > row["budget_bytes"]  # the budget binds


def test_memtier_on_compiled_blocks_fits_with_the_compiled_models_gradients(result):
    rows = _rows(result, "memtier_compile")
    for frac, row in rows.items():
        assert row["status"] == "ok", (frac, row.get("error"))
        assert row["act_peak_bytes"] <= row["budget_bytes"], (
            frac,
            row["act_peak_bytes"],
            row["budget_bytes"],
        )
        assert row["grad_within_tol"], row["grad_max_abs_diff"]
        assert all(b["compiled"] for b in row["compiled_blocks"]), row["compiled_blocks"]
        planned, measured = row["swap_bytes_per_step_planned"], row["swap_bytes_per_step_measured"]
        assert (planned == 0) == (measured == 0), (planned, measured)
    half = rows[0.5]
    # half the peak is not met by keeping every block compiled as is: memtier swaps or recomputes some, or
    # the partitioner recomputes inside them (a budget below 1.0), or both
    assert set(half["modes"]) - {"K"} or half["partitioner_budget"] < 1.0, half


def test_sac_milp_policy_is_carried_out_and_saves_less_as_the_budget_falls(result):
    rows = _rows(result, "sac_milp")
    assert all(r["status"] == "ok" for r in rows.values()), {f: r.get("error") for f, r in rows.items()}
    # the selective-checkpoint policy saw exactly the ops the per-op stats were measured on
    assert all(r["op_alignment_ok"] for r in rows.values())
    saved = [rows[f]["saved_op_bytes"] for f in (0.4, 0.5, 0.75)]
    assert saved[0] <= saved[1] <= saved[2] and saved[0] < saved[2], saved
    peaks = [rows[f]["act_peak_bytes"] for f in (0.4, 0.5, 0.75)]
    assert peaks[0] < peaks[2], peaks


def test_json_records_config_environment_and_definitions(result):
    assert result["config"]["model"] == "tiny-llama" and result["model"]["num_layers"] == 4
    assert result["environment"]["torch"] == torch.__version__
    assert "act_peak_bytes" in result["definitions"]
    assert result["nvme"]["tier_write_bps"] > 0 and result["nvme"]["tier_read_bps"] > 0


def test_refined_partitioner_budget_lands_between_the_measured_budgets_that_bracket_the_line():
    """memtier_compile measures one more partitioner budget per activation budget: the one whose compiled
    no-offload peak would land on the planning line, interpolated between the measured budgets around it."""
    from types import SimpleNamespace

    from benchmarks.activations_run import Bench

    mib = 2**20

    def costs(peak):
        return ([], SimpleNamespace(act_peak_bytes=peak))

    fake = SimpleNamespace(
        planning_budget=lambda frac: int(frac * 140 * mib),
        compiled_costs={1.0: costs(116 * mib), 0.7: costs(88 * mib), 0.4: costs(60 * mib)},
    )
    # the line 105 MiB sits between 0.7 (88) and 1.0 (116): 0.7 + 17/28 x 0.3
    assert Bench.refined_share(fake, 0.75) == pytest.approx(0.7 + 17 / 28 * 0.3, abs=1e-4)
    assert Bench.refined_share(fake, 0.9) is None  # 126 MiB: 1.0 keeps everything under the line
    assert Bench.refined_share(fake, 0.3) is None  # 42 MiB: below every measured budget's peak
    fake.compiled_costs[round(0.7 + 17 / 28 * 0.3, 4)] = costs(105 * mib)
    assert Bench.refined_share(fake, 0.75) is None  # measured already


def test_compile_paired_replays_the_benchs_plans_in_alternating_rounds(bench_out, result):
    """benchmarks/compile_paired.py steps the activations result's memtier + compile plan and compile's
    partitioner setting turn about: the plan it rebuilds from the row runs at the row's measured peak (so it is
    the row's plan), and every round times both."""
    from benchmarks import compile_paired

    before = torch.get_num_threads()
    try:
        compile_paired.main(
            ["--from", str(bench_out / "activations.json"), "--budgets", "0.5", "--rounds", "2", "--steps", "1",
             "--out", str(bench_out / "paired")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert (bench_out / "paired.png").stat().st_size > 0
    pair = json.loads((bench_out / "paired.json").read_text())["pairs"][0]
    row = _rows(result, "memtier_compile")[0.5]
    assert pair["fits"]["memtier"] and pair["act_peak_bytes"]["memtier"] == pytest.approx(
        row["act_peak_bytes"], rel=0.02
    )
    assert all(len(pair["step_times_s"][n]) == 2 for n in ("memtier", "partitioner"))
    ratios = pair["memtier_over_partitioner_per_round"]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    with pytest.raises(SystemExit, match="no memtier_compile row at budget 0.3"):
        compile_paired.main(["--from", str(bench_out / "activations.json"), "--budgets", "0.3"])
