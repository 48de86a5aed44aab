"""Errors of the build side. Kept free of TensorFlow so the CLI can import them cheaply."""

from __future__ import annotations

from collections.abc import Iterable


class FuseError(ValueError):
    """Bad input to a build: unusable members, incompatible signatures, bad options.

    Carries every problem found, so the user fixes them all in one round. ``str(error)``
    is the problems, one sentence per line.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class VerificationError(RuntimeError):
    """A fused model or an artifact disagrees with its members beyond tolerance."""
