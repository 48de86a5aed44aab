"""Errors the runtime raises for artifacts it cannot serve."""


class ArtifactError(ValueError):
    """The artifact is missing, damaged, or not a fuser artifact. The message names the file."""
