"""examples/train_lm.py with a rank that dies: for the launcher's failure tests (real processes).

Environment:
  FAULT_RANK, FAULT_STEP, FAULT_CODE  which rank dies, at which step, with which exit code (os._exit: no
                                      cleanup, as a crash)
  FAULT_WHERE      "step": after step FAULT_STEP (and its checkpoint); "save": in the middle of step
                   FAULT_STEP's checkpoint, after this rank wrote its RNG file, before the others finished;
                   "stop": after step FAULT_STEP the rank stops itself with SIGSTOP (a hung rank)
  FAULT_FIRST_ATTEMPT_ONLY=1          die only in torchrun's first attempt (TORCHELASTIC_RESTART_COUNT=0)
  FAULT_MARK       file written (time.time()) just before dying
  PID_DIR          every rank writes <rank>.<attempt>.pid there at start
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
spec = importlib.util.spec_from_file_location("train_lm", os.path.join(ROOT, "examples", "train_lm.py"))
train_lm = importlib.util.module_from_spec(spec)
sys.modules["train_lm"] = train_lm
spec.loader.exec_module(train_lm)

rank = int(os.environ.get("RANK", "0"))
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
fault_rank = int(os.environ.get("FAULT_RANK", "-1"))
fault_step = int(os.environ.get("FAULT_STEP", "-1"))
code = int(os.environ.get("FAULT_CODE", "7"))
where = os.environ.get("FAULT_WHERE", "step")
armed = rank == fault_rank and (attempt == 0 or os.environ.get("FAULT_FIRST_ATTEMPT_ONLY") != "1")

if os.environ.get("PID_DIR"):
    with open(os.path.join(os.environ["PID_DIR"], f"{rank}.{attempt}.pid"), "w") as fh:
        fh.write(str(os.getpid()))


def die() -> None:
    mark = os.environ.get("FAULT_MARK")
    if mark:
        with open(mark, "w") as fh:
            fh.write(str(time.time()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if armed and where == "save":
    import launch.train.checkpoint as checkpoint

    original = checkpoint.save_file

    def save_then_die(obj, path):
        original(obj, path)
        if f"step-{fault_step:07d}" in path and os.path.basename(path) == f"rng-rank{rank}.pt":
            die()

    checkpoint.save_file = save_then_die


def stop() -> None:
    mark = os.environ.get("FAULT_MARK")
    if mark:
        with open(mark, "w") as fh:
            fh.write(str(time.time()))
    os.kill(os.getpid(), signal.SIGSTOP)


def on_step(step: int, info: dict) -> None:
    if armed and step == fault_step:
        if where == "step":
            die()
        elif where == "stop":
            stop()


if __name__ == "__main__":
    sys.exit(train_lm.main(on_step=on_step))
