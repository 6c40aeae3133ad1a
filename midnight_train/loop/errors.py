"""The errors a run ends with: one line each, saying why and what to do (the CLI prints the
message without a traceback)."""

from __future__ import annotations


class RunError(RuntimeError):
    """The run cannot start or go on; the message says why and what to do (no traceback)."""


class NonFiniteLossError(RunError):
    pass
