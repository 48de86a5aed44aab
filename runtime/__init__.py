"""The thin runtime: load one fused artifact and answer with one forward pass.

    >>> import runtime
    >>> model = runtime.load("ensemble.onnx")
    >>> model.predict(x)

An ONNX artifact is served with numpy and onnxruntime alone: this package never imports
the compiler (``fuser``), and imports TensorFlow only to serve a SavedModel or ``.keras``
artifact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime import manifest as manifest_lib
from runtime.backends import open_backend
from runtime.errors import ArtifactError
from runtime.inputs import prepare_feeds
from runtime.integrity import IntegrityError
from runtime.manifest import ManifestError, TensorSpec

__all__ = [
    "ArtifactError",
    "FusedModel",
    "IntegrityError",
    "ManifestError",
    "TensorSpec",
    "load",
]


def load(
    path: str | os.PathLike,
    *,
    verify: bool = True,
    threads: int | None = None,
    custom_objects: Mapping[str, Any] | None = None,
) -> FusedModel:
    """Load a fused artifact: an ``.onnx`` file, a ``.keras`` file or a SavedModel directory.

    Args:
        path: the artifact.
        verify: check the artifact against the SHA-256 digests sealed into its manifest
            before anything parses the model: a damaged or modified artifact is refused.
            ``verify=False`` skips the check (one SHA-256 pass over the artifact) for
            callers who must shave load time and trust their storage.
        threads: ONNX Runtime's intra-op threads for this model (default: one per core).
            ``threads=1`` answers small batches fastest and suits one process per core;
            large batches want every core. ONNX artifacts only: TensorFlow's thread pools
            are process-wide (``tf.config.threading``).
        custom_objects: the custom Keras classes (registered with
            ``keras.saving.register_keras_serializable``) a ``.keras`` artifact's members
            use, by class name (``{"Scale": Scale}``) or registered name
            (``{"rw>Scale": Scale}``), for a process that has not imported the modules
            defining them. Loaded in safe mode all the same. ONNX and SavedModel
            artifacts hold plain graphs, which need no classes: accepted and ignored.

    Raises:
        ArtifactError: the path is missing, damaged, or carries no valid fuser manifest;
            ``IntegrityError`` (a subclass) when it does not match its digests. For a
            ``.keras`` artifact whose custom class is not registered, it names the class
            and the module that defines it.
        ValueError: ``threads`` is not a positive integer, or is given for an artifact
            served by TensorFlow.
        TypeError: ``custom_objects`` is not a mapping of names to classes.
    """
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}.")
    if custom_objects is not None and (
        not isinstance(custom_objects, Mapping)
        or not all(isinstance(name, str) for name in custom_objects)
    ):
        raise TypeError(
            "custom_objects must be a dict of class names to classes, such as "
            f"{{'Scale': Scale}}, or None; got {type(custom_objects).__name__}."
        )
    backend = open_backend(path, verify=verify, threads=threads, custom_objects=custom_objects)
    return FusedModel(backend, source=str(path))


class FusedModel:
    """A loaded fused ensemble. ``predict`` is safe to call from several threads at once."""

    def __init__(self, backend: Any, *, source: str) -> None:
        self._backend = backend
        self.source = source
        self.manifest: dict[str, Any] = backend.manifest
        self.inputs: tuple[TensorSpec, ...] = manifest_lib.specs(self.manifest, "inputs")
        self.outputs: tuple[TensorSpec, ...] = manifest_lib.specs(self.manifest, "outputs")
        self.format: str = self.manifest["artifact"]["format"]

    def __repr__(self) -> str:
        members = len(self.manifest.get("members", []))
        return (
            f"FusedModel({self.source!r}, format={self.format!r}, members={members}, "
            f"head={self.manifest['head'].get('name')!r})"
        )

    def predict(
        self, x: Any, batch_size: int | None = None, *, as_dict: bool = False
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Run the ensemble on a batch.

        Args:
            x: for one input, an array (or nested list) whose first axis is the batch;
                for several inputs, a dict keyed by input name or a sequence in the
                order of ``inputs``.
            batch_size: if given, run at most this many rows at a time (bounds memory).
            as_dict: always answer with a dict output name -> array.

        Returns:
            One array for a one-output ensemble (unless ``as_dict``), else a dict output
            name -> array.

        Raises:
            ValueError: wrong number of inputs, wrong rank or shape, mismatched batches.
            TypeError: values that cannot be cast safely to the input's dtype.
        """
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        feeds = prepare_feeds(self.inputs, x)
        rows = next(iter(feeds.values())).shape[0]
        if rows == 0:
            results = {
                spec.name: np.zeros(
                    (0, *[dim or 0 for dim in spec.shape[1:]]), dtype=np.dtype(spec.dtype)
                )
                for spec in self.outputs
            }
        elif batch_size is None or rows <= batch_size:
            results = self._backend.run(feeds)
        else:
            parts = [
                self._backend.run(
                    {name: value[start : start + batch_size] for name, value in feeds.items()}
                )
                for start in range(0, rows, batch_size)
            ]
            results = {
                spec.name: np.concatenate([part[spec.name] for part in parts])
                for spec in self.outputs
            }
        if len(self.outputs) == 1 and not as_dict:
            return results[self.outputs[0].name]
        return {spec.name: results[spec.name] for spec in self.outputs}
