"""Errors of a training run, shared by train, compare and the command line."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot start or continue; the message names the cause and the fix."""


class RunInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after writing a checkpoint; the message names the step and the fix."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
