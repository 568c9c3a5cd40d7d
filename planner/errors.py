"""Typed errors of the planner: bad input (exit 2) and infeasible plans (exit 3).

Every check that rejects user input raises a `SpecError` naming the file, the dotted
field and what was expected; the CLI maps it to exit code 2 without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class SpecError(ValueError):
    """Bad user input: a malformed file, an unknown key, a wrong type or an impossible value."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.field = field
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line is not None else "")
        parts = [p for p in (where, self.field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

    def located(self, source: str | None, line: int | None = None) -> SpecError:
        """The same error with the file (and line) it came from filled in."""
        return SpecError(
            self.message,
            source=self.source or source,
            field=self.field,
            line=self.line if self.line is not None else line,
        )


class LayoutError(SpecError):
    """A parallel layout that cannot work: the message prints the arithmetic that failed."""


class InfeasibleError(RuntimeError):
    """No layout fits: says by how many bytes the best candidate misses and what would fit."""

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        need_bytes: int,
        have_bytes: int,
        alternatives: Sequence[str] = (),
    ) -> None:
        self.need_bytes = need_bytes
        self.have_bytes = have_bytes
        self.alternatives = tuple(alternatives)
        super().__init__(message)

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.need_bytes - self.have_bytes)


def closest_names(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The known names nearest to a misspelt one (for 'unknown preset' messages)."""
    import difflib

    prefixed = [k for k in names if k.startswith(name)]
    close = prefixed + [
        k for k in difflib.get_close_matches(name, list(names), n=n, cutoff=0.4) if k not in prefixed
    ]
    if not close:
        close = [k for k in names if name.split("-")[0] in k]
    return close[:n]
