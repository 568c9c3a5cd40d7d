"""What a training run trains: the plan's decisions, or (without a plan) the command line's.

With a plan, every decision the planner makes is read from it (model, sequence length, micro-batch,
accumulation, optimizer, clipping, engine); a flag that would override one is refused, so a run never
silently differs from the plan it was launched with.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from planner import load_plan
from planner.model import ModelSpec
from planner.plan import Plan
from planner.presets import MODEL_PRESETS

ENGINES = ("torch", "deepspeed", "accelerate")
OPTIMIZERS = ("adamw", "galore", "frugal")
DEFAULT_MAX_GRAD_NORM = 1.0


class TrainConfigError(ValueError):
    """A bad setting of a training run; `field` names the option (and `source` the file, when there is one)."""

    def __init__(self, message: str, *, field: str, source: str | None = None) -> None:
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


def build_parser(description: str, *, default_model: str = "llama-20m") -> argparse.ArgumentParser:
    """The trainer's flags. Those marked "without a plan" are refused when a plan decides them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--plan", default=os.environ.get("MEMTIER_PLAN"), help="plan.json (default: $MEMTIER_PLAN)"
    )
    p.add_argument("--model", default=default_model, choices=sorted(MODEL_PRESETS), help="without a plan")
    p.add_argument("--seq", type=int, default=None, help="sequence length (without a plan; default 256)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per rank (without a plan; 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (without a plan; 1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the plan's, else adamw")
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default: the plan's, else 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help=f"global-norm gradient clipping, 0: off (without a plan; default {DEFAULT_MAX_GRAD_NORM})",
    )
    p.add_argument(
        "--steps", type=int, default=20, help="optimizer steps in total (a resume continues to it)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=os.environ.get("MEMTIER_ENGINE") or None,
        help="without a plan (default torch); with one it must equal the plan's layout.engine",
    )
    p.add_argument("--ds-config", default=os.environ.get("MEMTIER_DS_CONFIG"), help="DeepSpeed config JSON")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (resumes from its latest)")
    p.add_argument("--ckpt-every", type=int, default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --ckpt-dir")
    p.add_argument(
        "--convert-checkpoint",
        action="store_true",
        help="resume from a checkpoint whose dtypes differ from the run's, converting (refused otherwise)",
    )
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of tokens/s and MFU")
    p.add_argument(
        "--track-memory",
        action="store_true",
        help="measure the last step's peak live tensor bytes by category (torch MemTracker); slows that step",
    )
    p.add_argument("--metrics-out", default=None, help="write a JSON summary here (rank 0)")
    p.add_argument(
        "--save-final-params", default=None, help="directory: each rank saves its final parameters"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS)")
    p.add_argument(
        "--step-gate",
        default=None,
        help="directory: wait for go-<step> before each step, write done-<step> after (benchmarks interleave "
        "several runs step by step this way)",
    )
    return p


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What this run trains, resolved from the plan (when there is one) and the command line."""

    spec: ModelSpec
    seq_len: int
    micro_batch: int
    grad_accum: int
    optimizer: str
    optimizer_settings: dict[str, Any]
    dtype: str
    engine: str
    max_grad_norm: float
    plan: Plan | None
    plan_path: str | None


def _refuse_overrides(args: argparse.Namespace, plan: Plan, path: str) -> None:
    for name in ("seq", "micro_batch", "grad_accum", "max_grad_norm"):
        if getattr(args, name) is not None:
            raise TrainConfigError(
                f"the plan decides this ({path}); re-plan instead of overriding it",
                field="--" + name.replace("_", "-"),
            )
    if args.engine is not None and args.engine != plan.layout.engine:
        raise TrainConfigError(
            f"the plan's layout.engine is {plan.layout.engine!r}, not {args.engine!r} ({path}); "
            f"re-plan with `memtier plan --engine {args.engine}`",
            field="--engine",
        )


def _from_plan(args: argparse.Namespace) -> Settings:
    if not os.path.isfile(args.plan):
        raise TrainConfigError("file not found", field="--plan", source=args.plan)
    plan = load_plan(args.plan)
    _refuse_overrides(args, plan, args.plan)
    wl, lay = plan.workload, plan.layout
    settings = dict(plan.optimizer.settings)
    settings.setdefault("rank", wl.optimizer.rank)
    settings.setdefault("density", wl.optimizer.density)
    if args.rank is not None:
        settings["rank"] = args.rank
    return Settings(
        spec=plan.model,
        seq_len=wl.seq_len,
        micro_batch=lay.micro_batch,
        grad_accum=lay.grad_accum,
        optimizer=args.optimizer or plan.optimizer.kind,
        optimizer_settings=settings,
        dtype=wl.dtype,
        engine=lay.engine,
        max_grad_norm=plan.optimizer.max_grad_norm,
        plan=plan,
        plan_path=args.plan,
    )


def _from_flags(args: argparse.Namespace) -> Settings:
    settings: dict[str, Any] = {"rank": 64, "density": 0.25}
    if args.rank is not None:
        settings["rank"] = args.rank
    max_norm = DEFAULT_MAX_GRAD_NORM if args.max_grad_norm is None else args.max_grad_norm
    return Settings(
        spec=MODEL_PRESETS[args.model],
        seq_len=args.seq or 256,
        micro_batch=args.micro_batch or 4,
        grad_accum=args.grad_accum or 1,
        optimizer=args.optimizer or "adamw",
        optimizer_settings=settings,
        dtype="fp32",
        engine=args.engine or "torch",
        max_grad_norm=max_norm,
        plan=None,
        plan_path=None,
    )


def resolve_settings(args: argparse.Namespace) -> Settings:
    s = _from_plan(args) if args.plan else _from_flags(args)
    if s.optimizer not in OPTIMIZERS:
        raise TrainConfigError(
            f"{s.optimizer!r} is not one of {OPTIMIZERS}", field="optimizer.kind", source=s.plan_path
        )
    if s.seq_len > s.spec.max_position_embeddings:
        raise TrainConfigError(
            f"seq_len({s.seq_len}) > max_position_embeddings({s.spec.max_position_embeddings})",
            field="seq_len",
        )
    if s.max_grad_norm < 0:
        raise TrainConfigError(f"must be >= 0, got {s.max_grad_norm}", field="--max-grad-norm")
    for name, value in (("--steps", args.steps), ("--log-every", args.log_every)):
        if value < 1:
            raise TrainConfigError(f"must be >= 1, got {value}", field=name)
    return s
