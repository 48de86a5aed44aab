"""The artifact formats: one ``Format`` each, and which one a path asks for.

A format owns its suffix (how an output path names it), what it can hold, its writer and
how its manifest travels inside it; ``fuser.formats.writer`` runs every write the same way
(verify, seal, place) and ``runtime.readers`` reads each format back. To add a format,
add a module beside this one with its ``FORMAT`` (a ``format.Format``) and list it in
``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuser.formats import keras, onnx, savedmodel
from fuser.formats.format import Format

# The formats by kind; the first whose suffix an output path ends with is written.
FORMATS: dict[str, Format] = {
    each.kind: each for each in (onnx.FORMAT, keras.FORMAT, savedmodel.FORMAT)
}


# Suffixes that name files of other kinds: refused as outputs rather than taken as folders.
REFUSED_SUFFIXES = (".h5", ".hdf5", ".pb", ".tflite", ".npy", ".npz", ".json", ".zip")


def output_format(path: Path) -> str:
    """The format an output path asks for: by its suffix, else a SavedModel folder."""
    suffix = path.suffix.lower()
    for each in FORMATS.values():
        if each.suffix is not None and suffix == each.suffix:
            return each.kind
    return "savedmodel"


def format_of(path: Path) -> Format:
    return FORMATS[output_format(path)]


def format_problems(path: Path, members: Sequence[Any]) -> list[str]:
    """Problems with a format that cannot hold some member whole."""
    holder = format_of(path)
    return [problem for member in members if (problem := holder.cannot_hold(member))]
