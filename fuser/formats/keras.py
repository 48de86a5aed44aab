"""The ``.keras`` artifact: the fused functional model, for further work in Keras.

It loads in safe mode (the layers fuser adds are registered: ``runtime.switch``,
``runtime.cascade``); the manifest is a ``fuser.json`` entry of the zip. It cannot hold a
SavedModel member whole: Keras would keep only a path to it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from fuser.built import Built
from fuser.formats.format import Format
from runtime import manifest as manifest_lib


def write(ensemble: Built, path: Path, opset: int) -> dict[str, Any]:
    ensemble.model.save(str(path))
    return {}


def embed(path: Path, text: str) -> None:
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(manifest_lib.KERAS_ZIP_ENTRY, text)


def cannot_hold(member: Any) -> str | None:
    if member.format != "savedmodel":
        return None
    return (
        f"{member.describe()} is a SavedModel, which a .keras artifact cannot hold whole (Keras "
        f"would keep only a path to {member.source}); write an .onnx file or a SavedModel "
        "directory instead."
    )


FORMAT = Format(
    kind="keras",
    label="a .keras file",
    suffix=".keras",
    write=write,
    embed=embed,
    cannot_hold=cannot_hold,
)
