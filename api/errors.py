"""The error hierarchy every part of aitrain raises.

Messages say what was found, what was expected, and end with a ``HINT:`` line
saying how to fix it. The CLI prints them without a traceback.
"""

from __future__ import annotations


class AitrainError(Exception):
    """Base of every error aitrain raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nHINT: {self.hint}"
        return self.message


class ConfigError(AitrainError):
    """The composed configuration is invalid (unknown key, wrong type, bad degrees)."""

    exit_code = 2


class BackendError(AitrainError):
    """A backend could not plan, submit or run a job."""


class FabricError(AitrainError):
    """The fabric probe, check or tune could not run."""


class JobFailedError(AitrainError):
    """The job ran and failed (a rank exited non-zero, or it was interrupted)."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code
