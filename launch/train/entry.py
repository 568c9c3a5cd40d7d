"""A training script's `__main__`: errors a user can cause exit 2 with one line naming the file and field; a
run that fails (a NaN loss, a disk error) exits 1 with one line; `MEMTIER_DEBUG=1` shows the traceback."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


def _user_errors() -> tuple[type[BaseException], ...]:
    from launch.train.config import TrainConfigError
    from planner.errors import SpecError

    errors: list[type[BaseException]] = [TrainConfigError, SpecError]
    try:
        from offload.tiers.errors import (
            TierCapacityError,
            TierPathError,
            TierUnavailableError,
            TierValueError,
        )

        errors += [TierPathError, TierValueError, TierCapacityError, TierUnavailableError]
    except ImportError:  # a build without the runtime
        pass
    return tuple(errors)


def entry(main: Callable[[], int], name: str) -> int:
    """Run `main()`; the exit code a user expects, and never a bare traceback."""
    debug = os.environ.get("MEMTIER_DEBUG") == "1"
    try:
        return main()
    except _user_errors() as exc:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - a failed run: one line (the cause), exit 1
        if debug:
            traceback.print_exc()
        print(
            f"{name}: failed: {type(exc).__name__}: {exc} (MEMTIER_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
