"""`memtier estimate`: the JSON contract, the plot, and layouts that cannot work (exit 2)."""

import json

import pytest

from launch.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_keys(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "llama3-70b", "--cluster", "dgx-a100-8x80g", "--nodes", "4",
                       "--tp", "8", "--pp", "4", "--seq", "4096", "--global-batch", "64", "--recompute", "full", "--json")  # fmt: skip
    assert code == 0
    r = json.loads(out)
    assert r["params"] == 70_553_706_496
    per = r["memory"]["per_device"]
    assert set(per) == {"parameters", "gradients", "optimizer_states", "activations", "buffers", "total"}
    assert per["total"] == sum(v for k, v in per.items() if k != "total")
    assert r["time"]["step_s"] > 0
    assert 0 < r["mfu"] <= 1 and r["throughput"]["tflops_per_device"] > 0


def test_offload_and_zero_lower_device_memory(capsys):
    args = ["estimate", "--model", "llama2-7b", "--cluster", "dgx-a100-8x80g", "--seq", "2048", "--json"]
    _, out, _ = run(capsys, *args)
    base = json.loads(out)["memory"]["per_device"]["total"]
    _, out, _ = run(capsys, *args, "--zero", "3")
    z3 = json.loads(out)["memory"]["per_device"]["total"]
    _, out, _ = run(capsys, *args, "--zero", "2", "--offload", "optimizer")
    r = json.loads(out)
    assert z3 < base and r["memory"]["per_device"]["total"] < base
    assert r["memory"]["per_tier"]["dram"] > 0


def test_table_and_plot(capsys, tmp_path):
    png = tmp_path / "mem.png"
    code, out, _ = run(capsys, "estimate", "--model", "llama2-7b", "--cluster", "rtx4090-nvme", "--seq", "1024",
                       "--offload", "optimizer", "--recompute", "full", "--plot", str(png))  # fmt: skip
    assert code == 0
    assert "memory per device" in out and "step time" in out and "MFU" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_world_size_mismatch(capsys):
    code, _, err = run(capsys, "estimate", "--model", "llama2-7b", "--cluster", "dgx-a100-8x80g",
                       "--tp", "2", "--pp", "2", "--dp", "3")  # fmt: skip
    assert code == 2
    assert "tp(2) * pp(2) * dp(3) * cp(1) = 12 != world_size(8)" in err


def test_heads_not_divisible_by_tp(capsys):
    code, _, err = run(capsys, "estimate", "--model", "gpt2-xl", "--cluster", "dgx-a100-8x80g", "--tp", "8")
    assert code == 2 and "num_heads(25) % tp(8) = 1 != 0" in err


def test_batch_not_divisible(capsys):
    code, _, err = run(capsys, "estimate", "--model", "llama2-7b", "--cluster", "dgx-a100-8x80g",
                       "--global-batch", "12", "--micro-batch", "1")  # fmt: skip
    assert code == 2 and "global_batch(12) % (micro_batch(1) * dp(8)) = 4 != 0" in err


FACTORY = """
import transformers


def build():
    # no dropout: the memory model's formulas assume none (with dropout HF's attention saves the s x s
    # probabilities and masks, which the trace shows and the formula does not)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=256, n_head=4, vocab_size=1000, n_positions=512,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def not_a_module():
    return 42
"""


def test_model_from_a_factory_and_the_meta_trace(capsys, tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    code, out, _ = run(capsys, "estimate", "--model", f"{path}:build", "--cluster", "rtx4090-nvme", "--seq", "512",
                       "--dtype", "fp32", "--micro-batch", "2", "--trace", "--json")  # fmt: skip
    assert code == 0
    r = json.loads(out)
    trace = r["trace"]
    # the spec read from the module's config counts exactly the module's parameters
    assert r["params"] == trace["params"]
    blocks = [m for m in trace["modules"] if m["kind"] == "GPT2Block"]
    assert len(blocks) == 1 and blocks[0]["saved_bytes"] > 0
    # one block's traced saved bytes are the memory model's per-block figure (within 10%)
    assert blocks[0]["saved_bytes"] == pytest.approx(r["memory"]["detail"]["block_saved_bytes"], rel=0.10)
    code, out, _ = run(capsys, "estimate", "--model", f"{path}:build", "--cluster", "rtx4090-nvme", "--trace")
    assert code == 0 and "traced on the meta device" in out and "GPT2Block" in out


def test_bad_factories_exit_2(capsys, tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    for ref, msg in ((f"{path}:missing", "no function"), (f"{path}:not_a_module", "not a torch.nn.Module"),
                     (f"{tmp_path}/nope.py:build", "file not found")):  # fmt: skip
        code, _, err = run(capsys, "estimate", "--model", ref, "--cluster", "rtx4090-nvme")
        assert code == 2 and msg in err and "Traceback" not in err, (ref, err)
