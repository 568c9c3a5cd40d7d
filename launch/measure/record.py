"""What every measurement records beside its numbers: config, versions, machine (JSON + PNG writers)."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any


def environment() -> dict[str, Any]:
    import psutil
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "cuda": torch.cuda.is_available(),
    }


def write_json(path: str, payload: dict[str, Any]) -> None:
    from planner.schema import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(
        path, json.dumps({"environment": environment(), **payload}, indent=1, default=str) + "\n"
    )


def savefig(fig: Any, path: str) -> None:
    import io

    from planner.schema import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
