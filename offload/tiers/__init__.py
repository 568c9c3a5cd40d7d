"""Tier stores: where swapped activations and offloaded optimizer states live.

One interface (:class:`TierStore`: ``put``/``get``/``prefetch``/``free``/``synchronize``/``close``, capacity,
usage and :class:`TierStats`) over three kinds:

- ``host``: a pre-allocated (pinned with CUDA) DRAM arena with an offset allocator and a hard cap;
- ``cxl``: the same arena bound to a CPU-less NUMA node (a CXL memory expander);
- ``nvme``: files in a private per-run directory, asynchronous I/O through DeepSpeed's aio op or a thread pool.

Build one with :func:`make_tier`, or from a plan's tier entries with ``offload.tiers.factory.stores_for_plan``
(the one place that maps the plan's tier names and enforces its caps); check a path with :func:`preflight`
before training.
"""

from offload.tiers.base import Handle, TierStore
from offload.tiers.cxl import CxlSettings, CxlTier
from offload.tiers.engines import aio_status
from offload.tiers.errors import (
    InvalidHandleError,
    TierCapacityError,
    TierClosedError,
    TierCorruptionError,
    TierError,
    TierFragmentationError,
    TierIOError,
    TierNoSpaceError,
    TierPathError,
    TierUnavailableError,
    TierValueError,
)
from offload.tiers.host import HostSettings, HostTier
from offload.tiers.nvme import NvmeSettings, NvmeTier
from offload.tiers.preflight import PreflightReport, preflight
from offload.tiers.registry import TIER_KINDS, availability, available, make_tier
from offload.tiers.stats import TierStats

# NOTE: `offload.tiers.preflight` is the function, not the submodule of the same name; it is imported eagerly
# above so the package attribute stays bound to the function.
__all__ = [
    "TIER_KINDS",
    "CxlSettings",
    "CxlTier",
    "Handle",
    "HostSettings",
    "HostTier",
    "InvalidHandleError",
    "NvmeSettings",
    "NvmeTier",
    "PreflightReport",
    "TierCapacityError",
    "TierClosedError",
    "TierCorruptionError",
    "TierError",
    "TierFragmentationError",
    "TierIOError",
    "TierNoSpaceError",
    "TierPathError",
    "TierStats",
    "TierStore",
    "TierUnavailableError",
    "TierValueError",
    "aio_status",
    "availability",
    "available",
    "make_tier",
    "preflight",
]
