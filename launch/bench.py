"""`memtier bench`: MFU side by side with the baselines (the work lives in benchmarks/mfu.py)."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options beyond the parser's --quick/--out/--calibrate/--cluster."""
    from benchmarks.mfu import add_arguments as add

    add(p, with_common=False)


def run_cli(args: argparse.Namespace) -> int:
    from benchmarks import mfu

    payload = mfu.run(mfu.config_from_args(args))
    print(payload["table"])
    if "calibration" in payload:
        print(mfu.render_calibration(payload["calibration"]))
    print(
        f"wrote {os.path.join(args.out, 'mfu.json')} and mfu.png ({payload['seconds']:.0f} s)",
        file=sys.stderr,
    )
    return 0
