"""What an artifact format is, as the build writes it (``registry`` lists them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Format:
    """One artifact format, as the build writes it."""

    kind: str  # as the manifest names it: "onnx", "savedmodel", "keras"
    label: str  # for messages: "an .onnx file"
    suffix: str | None  # what an output path ends with; None: any other path (a folder)
    write: Callable[[Any, Path, int], dict[str, Any]]  # (ensemble, path, opset) -> details
    embed: Callable[[Path, str], None]  # put the manifest's text inside the artifact
    stage: str = "writing"  # how a failure of ``write`` is named (``converting`` for ONNX)
    # Why it cannot hold a member whole, or None (a .keras file holds no SavedModel).
    cannot_hold: Callable[[Any], str | None] = lambda member: None
    # Called after the artifact is placed (ONNX: the old external data files go).
    placed: Callable[[Path, dict[str, Any]], None] = lambda path, details: None
