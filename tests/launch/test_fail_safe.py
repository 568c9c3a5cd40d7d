"""What a hostile input gets: exit 2 naming the file and field, never a traceback, nothing created outside
what the user named; identical inputs give identical files (issue 22, items 6 and 8)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch.cli import main

LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
}  # fmt: skip
CLUSTER = ["--cluster", "dgx-a100-8x80g"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def test_plan_files_are_byte_identical_for_identical_inputs(tmp_path, capsys):
    """Solver wall times stay out of plan.json; nothing else in it or the emitted files depends on when or
    where it ran (accelerate.yaml names ds_config.json by absolute path: accelerate reads it from the cwd)."""
    argv = ["plan", "--model", "gpt2-xl", "--cluster", "rtx4090-nvme", "--global-batch", "8", "--seq", "1024",
            "--budget", "8GiB"]  # fmt: skip
    for d in ("a", "b"):
        assert run(capsys, *argv, "--out", str(tmp_path / d))[0] == 0
    assert run(capsys, *argv, "--out", str(tmp_path / "a2"))[0] == 0
    for name in ("plan.json", "ds_config.json", "launch.sh"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    first = (tmp_path / "a" / "plan.json").read_bytes()
    assert b'"seconds"' not in first
    assert run(capsys, *argv, "--out", str(tmp_path / "a"))[0] == 0  # the same --out again
    for name in ("plan.json", "ds_config.json", "accelerate.yaml", "launch.sh"):
        assert (tmp_path / "a" / name).read_bytes() == (
            tmp_path / "a2" / name
        ).read_bytes() or name == "accelerate.yaml"
    plan = json.loads(first)
    assert plan["tiers"] and all(t["checksum"] for t in plan["tiers"])  # CRC on by default
    assert run(capsys, *argv, "--out", str(tmp_path / "c"), "--no-checksum")[0] == 0
    assert not any(t["checksum"] for t in json.loads((tmp_path / "c" / "plan.json").read_text())["tiers"])


@pytest.mark.parametrize(
    ("mutation", "field"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"intermediate_size": -3}, "intermediate_size"),
        ({"hidden_size": 65}, "num_attention_heads"),  # 65 does not split into 4 heads
        ({"num_attention_heads": -4}, "num_attention_heads"),
        ({"head_dim": "x"}, "head_dim"),
        ({"num_key_value_heads": 3}, "num_kv_heads"),  # 4 heads do not group into 3
    ],
)
def test_bad_hf_config_values_exit_2_naming_the_key(tmp_path, capsys, mutation, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, **mutation}))
    code, err = run(capsys, "estimate", "--model", str(path), *CLUSTER)
    assert code == 2 and str(path) in err and field in err, err


def test_non_utf8_inputs_exit_2(tmp_path, capsys):
    for name, args in (
        ("cluster.yaml", ["estimate", "--model", "llama2-7b", "--cluster", "{}"]),
        ("config.json", ["estimate", *CLUSTER, "--model", "{}"]),
        ("plan.json", ["launch", "--plan", "{}", "examples/train_lm.py"]),
    ):
        path = tmp_path / name
        path.write_bytes(b'{"a": "\xff\xfe"}\n')
        code, err = run(capsys, *(str(path) if a == "{}" else a for a in args))
        assert code == 2 and str(path) in err and "not UTF-8" in err, err


def test_output_paths_are_checked_and_nothing_is_created_outside_them(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    est = ["estimate", "--model", "llama2-7b", *CLUSTER]
    code, err = run(capsys, *est, "--plot", str(tmp_path))
    assert code == 2 and "--plot" in err and "is a directory" in err
    code, err = run(capsys, *est, "--plot", str(a_file / "x.png"))
    assert code == 2 and "--plot" in err and "not a directory" in err
    missing = tmp_path / "no" / "such" / "x.png"
    code, err = run(capsys, *est, "--plot", str(missing))
    assert code == 2 and "does not exist" in err and not (tmp_path / "no").exists()
    code, err = run(capsys, "plan", "--model", "llama2-7b", *CLUSTER, "--out", str(a_file / "sub"))
    assert code == 2 and "--out" in err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["estimate", "--model", "llama2-7b", *CLUSTER, "--nodes", "100000000000"], "--nodes"),
        (["estimate", "--model", "llama2-7b", *CLUSTER, "--chunked-loss", "-5"], "--chunked-loss"),
        (["launch", "--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", "localhost:99999", "examples/train_lm.py"],
         "--rdzv-endpoint"),
        (["launch", "--heartbeat-timeout", "-1", "examples/train_lm.py"], "--heartbeat-timeout"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_exit_2(capsys, argv, field):
    with pytest.raises(SystemExit) as info:  # argparse's own rejections exit 2 too
        raise SystemExit(main(argv))
    _, err = capsys.readouterr()
    assert info.value.code == 2 and field in err and "Traceback" not in err


def test_an_internal_error_is_one_line_and_exit_1(capsys, monkeypatch):
    import launch.estimate

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(launch.estimate, "run", boom)
    code, err = run(capsys, "estimate", "--model", "llama2-7b", *CLUSTER)
    assert code == 1 and "internal error: RuntimeError: a bug" in err and "--debug" in err
    assert len(err.strip().splitlines()) == 1


_BAD_INT = st.one_of(st.integers(-(10**12), 0), st.text(max_size=3), st.floats(allow_nan=True), st.booleans())


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=st.sampled_from(sorted(LLAMA.keys() - {"model_type"})), value=_BAD_INT)
def test_random_bad_config_values_exit_2_naming_the_key(tmp_path, capsys, key, value):
    """Property: a value no reader should accept in a size field of config.json exits 2 naming that key; no
    value ever exits 1 or prints a traceback."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, key: value}))
    code, err = run(capsys, "estimate", "--model", str(path), *CLUSTER)
    assert code == 2 and key in err, (key, value, err)


_CLUSTER_KEYS = (
    "nodes",
    "devices_per_node",
    "device.memory",
    "device.efficiency",
    "links.intra_node.bandwidth",
)


@settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    key=st.sampled_from(_CLUSTER_KEYS),
    value=st.one_of(st.integers(-(10**15), 0), st.text(alphabet="xyz!@ ", max_size=4), st.booleans()),
)
def test_random_bad_cluster_values_exit_2_naming_the_field(tmp_path, capsys, key, value):
    import yaml

    from planner.cluster import cluster_to_yaml
    from planner.presets import resolve_cluster

    data = yaml.safe_load(cluster_to_yaml(resolve_cluster("dgx-a100-8x80g")))
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    code, err = run(capsys, "estimate", "--model", "llama2-7b", "--cluster", str(path))
    assert code == 2 and leaf in err and str(path) in err, (key, value, err)


@settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    flag=st.sampled_from(
        ["--tp", "--pp", "--dp", "--micro-batch", "--global-batch", "--seq", "--budget", "--zero"]
    ),
    value=st.one_of(st.integers(-(10**6), 10**13).map(str), st.text(max_size=5)),
)
def test_random_flag_values_never_traceback(capsys, flag, value):
    """Property: any value of a numeric flag of `estimate`/`plan` is a result (0/3) or a named error (2)."""
    verb = "plan" if flag in ("--global-batch", "--budget") else "estimate"
    argv = [verb, "--model", "tiny-llama", "--cluster", "dgx-a100-8x80g", flag, value]
    if verb == "plan":
        argv += ["--time-limit", "2"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, 2, 3), (flag, value, err[-500:])
    assert "Traceback" not in out + err
    if code == 2:
        assert flag.lstrip("-").split("-")[0] in err.replace("_", "-") or "argument" in err, err


def test_empty_nvme_path_is_refused_when_read(tmp_path, capsys):
    import yaml

    from planner.cluster import cluster_to_yaml
    from planner.presets import resolve_cluster

    data = yaml.safe_load(cluster_to_yaml(resolve_cluster("rtx4090-nvme")))
    for tier in data["host"]:
        if tier["kind"] == "nvme":
            tier["path"] = ""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    code, err = run(capsys, "estimate", "--model", "gpt2", "--cluster", str(path))
    assert code == 2 and "path" in err and "empty" in err and str(path) in err


def test_training_script_with_a_missing_tier_path_exits_2_in_one_line(tmp_path):
    import subprocess
    import sys

    from planner.plan import ActivationPolicy
    from tests.integration.helpers import TRAIN, small_plan

    swap = (ActivationPolicy(layer=0, keep_fraction=0.0, swap_fraction=1.0),)
    small_plan(str(tmp_path / "plan.json"), ranks=1, activations=swap, swap_tier="nvme",
               swap_path=str(tmp_path / "missing"))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, TRAIN, "--plan", str(tmp_path / "plan.json"), "--steps", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if "WARNING" not in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("train_lm: error:") and str(tmp_path / "missing") in lines[-1]
