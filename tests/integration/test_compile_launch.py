"""A plan that compiles the blocks (`Workload.compile`) under `memtier launch`: the trainer's `offload.apply`
compiles every block with its decision (recompute, swap), the losses are those of the same plan run eagerly,
and the `--track-memory` step (torch's MemTracker, a dispatch mode dynamo does not compile under) runs its
blocks eagerly without demoting them."""

from __future__ import annotations

import json

import pytest

from planner.plan import ActivationPolicy
from tests.integration.helpers import memtier, small_plan

pytestmark = pytest.mark.integration

ACTS = (
    ActivationPolicy(layer=0, keep_fraction=0.0, recompute_fraction=1.0),
    ActivationPolicy(layer=1, keep_fraction=0.5, swap_fraction=0.5),
)


def _run(tmp_path, name: str, compile_backend: str) -> dict:
    plan = small_plan(str(tmp_path / f"{name}.json"), ranks=1, activations=ACTS)
    plan.replace(workload=plan.workload.replace(compile=compile_backend)).save(tmp_path / f"{name}.json")
    out = tmp_path / f"{name}-metrics.json"
    proc = memtier("launch", "--plan", str(tmp_path / f"{name}.json"), "examples/train_lm.py", "--steps", "4",
                   "--track-memory", "--metrics-out", str(out), timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_compiled_plan_trains_like_the_eager_one(tmp_path):
    eager = _run(tmp_path, "eager", "")
    compiled = _run(tmp_path, "compiled", "aot_eager")
    assert eager["compiled_blocks"] == {}
    blocks = compiled["compiled_blocks"]["blocks"]
    assert [(b["layer"], b["mode"], b["compiled"]) for b in blocks] == [
        (0, "recompute", True),
        (1, "swap", True),
    ]
    assert compiled["compiled_blocks"]["eager_calls"] == 2  # the tracked step's two blocks, nothing else
    assert compiled["swap"]["bytes_swapped"] > 0
    got, ref = [loss for _, loss in compiled["losses"]], [loss for _, loss in eager["losses"]]
    assert got == pytest.approx(ref, rel=1e-5)
