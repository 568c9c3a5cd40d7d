"""Errors of the chunked loss, shared by `offload.loss` (bad input) and `offload.hf_loss` (unsupported models).

A module of its own so that the dependency between those two goes one way: loss -> hf_loss -> loss_errors.
"""

from __future__ import annotations

__all__ = ["ChunkedLossError", "UnsupportedModelError"]


class ChunkedLossError(ValueError):
    """Bad input to the chunked loss; `field` names the argument (or model attribute) that is wrong."""

    def __init__(self, message: str, *, field: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class UnsupportedModelError(ChunkedLossError):
    """A model the installer cannot serve: no linear LM head, a custom loss, logits changed before loss."""
