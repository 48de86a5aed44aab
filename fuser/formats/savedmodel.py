"""The SavedModel artifact: a folder TensorFlow Serving and ``saved_model_cli`` run as is.

A ``serving_default`` signature with named inputs and a dict of named outputs; the
manifest travels in ``assets/fuser.json``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from fuser.built import Built
from fuser.conversion import graph_units
from fuser.formats.format import Format
from fuser.formats.onnx import CONVERSION
from runtime import manifest as manifest_lib
from runtime.convolutions import native_grouped_convolutions


def write(ensemble: Built, path: Path, opset: int) -> dict[str, Any]:
    """The SavedModel joined from the units' graphs (``fuser.conversion.graph_units``);
    where it cannot be, the fused model saved whole (``write_whole``)."""
    import shutil

    why = graph_units.why_whole(ensemble)
    if why is None:
        try:
            conversion = graph_units.write(ensemble, path)
        except graph_units.NotByUnits as error:
            shutil.rmtree(path, ignore_errors=True)
            why = str(error)
        else:
            return {"signature": "serving_default", "xla": False, CONVERSION: conversion}
    details = write_whole(ensemble, path)
    details[CONVERSION] = {"by": "whole", "why": why}
    return details


def write_whole(ensemble: Built, path: Path) -> dict[str, Any]:
    """The serving function the build traced and verified, and the variables it reads,
    saved as one ``tf.Module``.

    Keras' ``ExportArchive`` walks every layer of the model in SavedModel mode (retracing
    the functions it meets), traces gradient functions for every op type, and stores the
    weights twice (its tracked copies and those the endpoint captures): slower to write,
    larger and slower to load than the module written here (docs/architecture.md). A
    model holding resources this module does not track (lookup tables) is
    written by ``ExportArchive`` as before.
    """
    import shutil

    import tensorflow as tf

    function = ensemble.tensorflow_function
    module = tf.Module()
    module.weights = [getattr(variable, "value", variable) for variable in ensemble.model.variables]
    module.serve = function
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    try:
        # Saving traces the function again: grouped convolutions as TensorFlow's own op.
        with (
            native_grouped_convolutions(),
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
        ):
            tf.saved_model.save(
                module,
                str(path),
                signatures={"serving_default": function.get_concrete_function()},
                options=options,
            )
    except (ValueError, AssertionError, tf.errors.OpError):
        shutil.rmtree(path, ignore_errors=True)
        _write_savedmodel_with_keras(ensemble, path)
    return {"signature": "serving_default", "xla": ensemble.xla}


def _write_savedmodel_with_keras(ensemble: Built, path: Path) -> None:
    from keras.export import ExportArchive

    # Everything traced here (the archive retraces) takes grouped convolutions as
    # TensorFlow's own op, so the SavedModel needs no XLA to serve them.
    with native_grouped_convolutions():
        archive = ExportArchive()
        archive.track(ensemble.model)
        archive.add_endpoint("serving_default", ensemble.serving_function(jit_compile=ensemble.xla))
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            archive.write_out(str(path), verbose=False)


def embed(path: Path, text: str) -> None:
    asset = path / manifest_lib.SAVEDMODEL_ASSET
    asset.parent.mkdir(exist_ok=True)
    asset.write_text(text)


FORMAT = Format(
    kind="savedmodel", label="a SavedModel folder", suffix=None, write=write, embed=embed
)
