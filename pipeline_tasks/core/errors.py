"""Errors that retrying cannot fix. The DAGs map :class:`PermanentError` (once) to a failed task without retries;
everything else is treated as transient and keeps its retries."""

from __future__ import annotations


class PermanentError(Exception):
    """Bad input, a failed gate, invalid params, a checksum mismatch: the same inputs fail the same way again."""


class InvalidParamsError(PermanentError, ValueError):
    """A run parameter or stage config is unknown or out of range (the message names it and what is allowed)."""


class NoTestUsersError(PermanentError, ValueError):
    """An evaluation window has no users to score (empty window, or none of its users has history)."""


class VersionExistsError(PermanentError, FileExistsError):
    """A published, immutable version is already there: it is never overwritten."""
