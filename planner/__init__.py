"""memtier planner: specs, cost models, solvers and the Plan contract."""

from planner.cluster import ClusterSpec
from planner.errors import InfeasibleError, LayoutError, SpecError
from planner.model import ModelSpec
from planner.plan import SCHEMA_VERSION, Plan, load_plan
from planner.workload import OptimizerSpec, Workload

__all__ = [
    "SCHEMA_VERSION",
    "ClusterSpec",
    "InfeasibleError",
    "LayoutError",
    "ModelSpec",
    "OptimizerSpec",
    "Plan",
    "SpecError",
    "Workload",
    "load_plan",
]
