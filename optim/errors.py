"""Errors and warnings raised by the low-memory optimizers."""

from __future__ import annotations


class OptimizerConfigError(ValueError):
    """A hyper-parameter or parameter-group setting is invalid.

    ``field`` names the setting (``"rank"``, ``"density"``, ``"param_groups[1].galore"``) so a caller
    building optimizers from a config file can point at the offending key.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ProjectionFallbackWarning(RuntimeWarning):
    """A projection refresh could not use its configured method and fell back to another one.

    Raised (as a warning) when a gradient is non-finite or an SVD fails to converge; the message names the
    parameter shape, the step and what was used instead.
    """
