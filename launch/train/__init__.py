"""The trainer, as a library: a script supplies its model, optimizer and data; the plan supplies every decision.

    from launch.train import build_parser, run
    args = build_parser("Train my model").parse_args()
    run(args, build_model=..., build_optimizer=..., make_data=...)

Modules: `config` (the run's settings from the plan or flags), `distributed` (process group, gradient
averaging in hooks), `engines` (torch/DDP, Accelerate, DeepSpeed), `layouts` (which layouts run),
`parallel` (device mesh, DTensor tp, FSDP2, pipelining), `apply` (offload.apply with the plan's
settings), `checkpoint` (atomic saves, exact resume), `metrics` (MFU/HFU, memory, summary), `signals`
(clean stops, benchmark step gates), `loop` (the loop).
"""

from launch.train.config import (
    ENGINES,
    OPTIMIZERS,
    Settings,
    TrainConfigError,
    build_parser,
    resolve_settings,
)
from launch.train.entry import entry
from launch.train.loop import run

__all__ = [
    "ENGINES",
    "OPTIMIZERS",
    "Settings",
    "TrainConfigError",
    "build_parser",
    "entry",
    "resolve_settings",
    "run",
]
