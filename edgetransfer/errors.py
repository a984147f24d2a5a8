"""Typed errors that carry their CLI exit code.

Every failure a user can act on is one of these, so the CLI maps it to the exit code agreed in
DESIGN.md and prints one clear line instead of a traceback. Anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class EdgeTransferError(Exception):
    """Base class: `exit_code` is what the CLI returns for this failure."""

    exit_code: int = 2

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None):
        self.path = Path(path) if path is not None else None
        self.field = field
        where = []
        if path is not None:
            where.append(str(path))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = f"{': '.join(where)}: " if where else ""
        super().__init__(prefix + message)


class GateFailed(EdgeTransferError):
    """The stage ran and wrote its report, but a parity or accuracy gate failed."""

    exit_code = 1


class UsageError(EdgeTransferError):
    """Bad arguments, configuration or input data."""

    exit_code = 2


class DataError(UsageError):
    """The dataset on disk breaks one of the checks (missing classes, unreadable images...)."""


class DependencyError(EdgeTransferError):
    """An optional dependency, weights file or piece of hardware is missing here."""

    exit_code = 3


class IntegrityError(EdgeTransferError):
    """Refused for integrity or safety: tampered, truncated or unsafe files."""

    exit_code = 4
