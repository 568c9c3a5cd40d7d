"""`memtier bench`: MFU side by side with the baselines (the work lives in launch/measure/mfu.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options beyond the parser's --quick/--out/--calibrate/--cluster."""
    from launch.measure.mfu import add_arguments as add

    add(p, with_common=False)


def run_cli(args: argparse.Namespace, *, wrote_to: TextIO | None = None) -> int:
    """Run the bench for `args`, print the table (and calibration); the files written go to `wrote_to`
    (default stderr)."""
    from launch.measure import mfu
    from launch.measure.report import render_calibration

    payload = mfu.run(mfu.config_from_args(args))
    print(payload["table"])
    if "calibration" in payload:
        print(render_calibration(payload["calibration"]))
    print(
        f"wrote {os.path.join(args.out, 'mfu.json')} and mfu.png ({payload['seconds']:.0f} s)",
        file=wrote_to or sys.stderr,
    )
    return 0
