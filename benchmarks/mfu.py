"""MFU side by side with the baselines: `memtier bench` as a script (the runner is launch/measure/mfu.py).

python -m benchmarks.mfu --model llama-34m --steps 6
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from launch import bench
from launch.measure import mfu


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(mfu.__doc__ or "").splitlines()[0])
    mfu.add_arguments(p)
    return bench.run_cli(p.parse_args(argv), wrote_to=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
