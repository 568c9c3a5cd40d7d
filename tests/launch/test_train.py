"""The trainer library (launch.train): what it checks before it changes anything."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from launch.train import build_parser, run
from launch.train.config import TrainConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "examples", "train_lm.py")


def _example():
    spec = importlib.util.spec_from_file_location("train_lm_for_library_tests", TRAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_non_finite_loss_stops_before_the_update(clip):
    """A NaN loss at step 3 (a weight turned NaN after step 2) stops the run naming the step, and no parameter
    changes: the loss is checked before the optimizer steps (torchtitan's rule), with or without clipping."""
    ex = _example()
    held: dict[str, object] = {}

    def build(spec, seed):
        held["model"] = model = ex.build_model(spec, seed)
        return model

    def on_step(step, info):
        if step == 2:
            model = held["model"]
            with torch.no_grad():
                model.model.norm.weight[0] = float("nan")
            held["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    args = build_parser("t").parse_args(
        [
            "--model",
            "tiny-llama",
            "--seq",
            "32",
            "--micro-batch",
            "2",
            "--steps",
            "5",
            "--max-grad-norm",
            clip,
        ]
    )
    with pytest.raises(FloatingPointError, match="loss is nan at step 3; the parameters were not updated"):
        run(
            args,
            build_model=build,
            build_optimizer=ex.build_optimizer,
            make_data=lambda s: ex.ByteCorpus(
                ex.DEFAULT_DATA, seq_len=s.seq_len, vocab_size=s.spec.vocab_size
            ),
            on_step=on_step,
        )
    after = held["model"].state_dict()
    for k, v in held["before"].items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)


def test_flags_the_plan_decides_are_refused(tmp_path):
    from tests.integration.helpers import small_plan

    small_plan(str(tmp_path / "plan.json"), ranks=1)
    for flags, field in (
        (["--max-grad-norm", "0.5"], "--max-grad-norm"),
        (["--engine", "deepspeed"], "--engine"),
    ):
        with pytest.raises(TrainConfigError, match=field):
            _example().main(["--plan", str(tmp_path / "plan.json"), *flags])


def test_stop_during_an_op_load_is_not_an_op_failure(monkeypatch, tmp_path):
    """SIGTERM becomes SystemExit (launch.train.signals); a load interrupted by it must propagate, not be
    remembered as 'this op failed' while training goes on."""
    from launch.train.signals import StopRequested
    from offload.deepspeed_ops import DeepSpeedOp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    class Builder:
        name = "memtier_test_op"

        def is_compatible(self, verbose=False):
            return True

        def load(self, verbose=False):
            raise StopRequested(143)

    op = DeepSpeedOp("unused", "test_op", not_built_hint="")
    monkeypatch.setattr(op, "_builder", Builder)
    with pytest.raises(StopRequested):
        op.status(build=True)
    assert op.failure is None and op.module is None


def test_resume_refuses_other_dtypes_unless_asked_to_convert(tmp_path):
    """A checkpoint whose weights were saved in bf16 and Adam moments in fp16 is refused on resume (naming the
    tensor), not silently upcast; --convert-checkpoint loads it converted."""
    ex = _example()
    ckpt = tmp_path / "ckpt"
    common = ["--model", "tiny-llama", "--seq", "32", "--micro-batch", "2", "--ckpt-dir", str(ckpt)]
    assert ex.main([*common, "--steps", "2"]) == 0
    (step,) = sorted(ckpt.iterdir())
    model_sd = torch.load(step / "model.pt")
    torch.save({k: v.to(torch.bfloat16) for k, v in model_sd.items()}, step / "model.pt")
    opt_sd = torch.load(step / "optimizer.pt", weights_only=False)
    for entry in opt_sd["state"].values():
        entry["exp_avg"] = entry["exp_avg"].to(torch.float16)
    torch.save(opt_sd, step / "optimizer.pt")
    with pytest.raises(TrainConfigError, match=r"saved as torch.bfloat16, the run has torch.float32"):
        ex.main([*common, "--steps", "3"])
    torch.save(model_sd, step / "model.pt")  # weights back to fp32: the moments alone are refused too
    with pytest.raises(TrainConfigError, match=r"optimizer state\[0\]\.exp_avg: saved as torch.float16"):
        ex.main([*common, "--steps", "3"])
    assert ex.main([*common, "--steps", "3", "--convert-checkpoint"]) == 0


def test_metrics_record_the_process_memory_beside_the_device_pool(tmp_path):
    """On a CPU the device pool is MemTracker's bookkeeping; the summary also carries the process's real
    memory (RSS high-water mark), which holds the pool and everything else."""
    import json

    metrics = tmp_path / "m.json"
    argv = ["--model", "tiny-llama", "--seq", "32", "--micro-batch", "2", "--steps", "2", "--track-memory"]
    assert _example().main([*argv, "--metrics-out", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    proc = m["process_memory"]
    assert proc["peak_rss_bytes"] >= proc["rss_bytes"] > 0
    assert proc["peak_rss_bytes"] > m["memory"]["device_peak_bytes"] > 0
