"""An ensemble in memory, fused and verified: its model, its manifest, and ``save``.

``fuser.build`` makes one; ``save`` writes it as an artifact (``fuser.formats``). The
model is a Keras functional model (inputs by name, a dict of named outputs); its
``tf.function`` was traced and verified for TensorFlow at build time.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fuser import __version__
from fuser.conversion.units import ConversionOptions
from fuser.formats.writer import Output, output, write, write_all
from fuser.fusion.plan import FusionPlan
from fuser.heads import Head
from fuser.members import Member
from fuser.progress import Reporter
from fuser.tasks import Task
from fuser.validate import Wiring
from fuser.verify import Verifier
from runtime import manifest as manifest_lib
from runtime.convolutions import native_grouped_convolutions
from runtime.inputs import prepare_feeds
from runtime.manifest import TensorSpec

if TYPE_CHECKING:
    from fuser.options import BuildOptions


class Ensemble:
    """A fused ensemble in memory: one Keras model, compiled, verified, ready to save.

    Attributes:
        model: the fused ``keras.Model`` (inputs by name, a dict of named outputs).
        members: the loaded members, in order; ``named_members`` maps name -> member.
        inputs, outputs: the fused signature (``runtime.TensorSpec``).
        manifest: the record every artifact carries (without the artifact's own part).
        verification: the probe batch check of the fused model.
        nonfinite: when the build allowed NaN and inf (``allow_nonfinite``), the counts
            each member gave on the probe batch (see ``fuser.validate.nonfinite_counts``);
            else None.
    """

    def __init__(
        self,
        members: Sequence[Member],
        wiring: Wiring,
        head: Head,
        *,
        model: Any,
        function: Any,
        outputs: Sequence[TensorSpec] | None = None,
        assemble: Callable[[list[Member]], tuple[list[Member], Any, Any, float]] | None = None,
        load: Callable[[list[Member], list[Member], str], list[Member]] | None = None,
        tasks: dict[str, Task],
        verifier: Verifier,
        fusion: FusionPlan,
        options: BuildOptions,
        verification: dict[str, Any],
        validation: dict[str, Any] | None,
        nonfinite: dict[str, dict[str, dict[str, int]]] | None,
        build_info: dict[str, Any],
        conversion: ConversionOptions,
        reporter: Reporter,
    ) -> None:
        self.members = list(members)
        self.named_members = {member.name: member for member in self.members}
        self.wiring = wiring
        self.head = head
        self._model = model
        self._assemble = assemble
        self._load = load
        self.tasks = dict(tasks)
        self.inputs: tuple[TensorSpec, ...] = wiring.inputs
        if outputs is None:
            outputs = [
                TensorSpec(name, tuple(tensor.shape), "float32")
                for name, tensor in model.output.items()
            ]
        self.outputs: tuple[TensorSpec, ...] = tuple(outputs)
        self.fusion = fusion
        self.xla = options.xla
        self.uncertainty, self.expose_members = options.uncertainty, options.expose_members
        self.tolerance = options.tolerance
        self.verifier = verifier
        self.verification = verification
        self.validation = validation
        self.nonfinite = nonfinite
        self.conversion = conversion
        self.reporter = reporter
        self._function = function
        self._build_info = build_info

    @property
    def model(self) -> Any:
        """The fused ``keras.Model``. A rebuild that took members from their records
        (``fuser.members.records``) assembles it on first use: it loads those members, fuses,
        compiles and verifies as the build does."""
        if self._model is None:
            members, self._model, self._function, error = self._assemble(self.members)
            self.members = list(members)
            self.named_members = {member.name: member for member in self.members}
            self.verification["max_abs_error"] = error
        return self._model

    def load_recorded(self, which: Sequence[Member], why: str) -> None:
        """Load members taken from their records after all (``why`` is said)."""
        if which:
            self.members = self._load(self.members, list(which), why)
            self.named_members = {member.name: member for member in self.members}

    @property
    def assembled(self) -> bool:
        """Whether the fused Keras model exists yet (see ``model``)."""
        return self._model is not None

    @property
    def probe(self) -> dict[str, np.ndarray]:
        """The probe batch every artifact is verified on."""
        return self.verifier.probe

    @property
    def probe_values(self) -> dict[str, np.ndarray]:
        """Each member's own outputs on the probe batch (``(members, rows, ...)`` per output)."""
        return self.verifier.probe_values

    @property
    def switch_batch(self) -> int | None:
        """Up to this batch size the switched groups run fused, above as plain branches;
        None without switched groups."""
        return self.verifier.switch_batch

    @property
    def tensorflow_function(self) -> Any:
        """The fused model's ``tf.function`` as traced and verified for TensorFlow (with XLA
        when the build asked for it): what a SavedModel saved whole serves."""
        _ = self.model  # assembled on first use
        return self._function

    def serving_function(self, *, jit_compile: bool = False, target: str = "tensorflow") -> Any:
        """The fused model in a new ``tf.function`` (see ``serving_function``)."""
        return serving_function(self.model, self.inputs, jit_compile=jit_compile, target=target)

    def predict(self, x: Any, *, as_dict: bool | None = None) -> Any:
        """Run the fused model: one array for one output, else a dict name -> array."""
        feeds = prepare_feeds(self.inputs, x)
        outputs = self.tensorflow_function(*(feeds[spec.name] for spec in self.inputs))
        results = {name: value.numpy() for name, value in outputs.items()}
        if as_dict or (as_dict is None and len(results) > 1):
            return results
        return results[self.outputs[0].name]

    def verify(self, run: Any, what: str) -> float:
        """Check ``run(feeds) -> {output: array}`` against the members (``fuser.verify``)."""
        return self.verifier.verify(run, what)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest every artifact of this ensemble carries (artifact part excluded)."""
        routing = self.verifier.routing_checks
        return {
            "format": manifest_lib.FORMAT,
            "format_version": manifest_lib.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": _versions(),
            "members": [member.to_manifest() for member in self.members],
            "head": {"name": self.head.name, "params": self.head.params()},
            "tasks": {name: task.to_manifest() for name, task in self.tasks.items()},
            "validation": self.validation,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "fusion": {**self.fusion.to_manifest(), "xla": self.xla},
            "build": dict(self._build_info),
            "verification": {
                **self._fused_model_record(),
                **self._nonfinite_record(),
                **({"routing": dict(routing)} if routing else {}),
            },
            "artifact": {},
        }

    def _fused_model_record(self) -> dict[str, Any]:
        """The fused Keras model's check, once it was assembled and verified."""
        if self.verification.get("max_abs_error") is None:
            return {}
        return {"fused_model": dict(self.verification)}

    def _nonfinite_record(self) -> dict[str, Any]:
        """For a build that allowed NaN and inf: the flag, and the counts per member."""
        if self.nonfinite is None:
            return {}
        values = {
            member: {name: dict(record) for name, record in outputs.items()}
            for member, outputs in self.nonfinite.items()
        }
        return {"nonfinite_allowed": True, "nonfinite_values": values}

    def save(
        self,
        path: str | os.PathLike | Output,
        *,
        force: bool = False,
        opset: int | None = None,
    ) -> Path:
        """Write one artifact (the path's form picks the format), verified, atomically.

        ``path`` may be an ``Output`` checked already (``fuser.formats.output``).

        Raises:
            FuseError: the path exists and ``force`` is false, or the format cannot hold a member.
            VerificationError: the written artifact disagrees with the members.
        """
        destination = path if isinstance(path, Output) else output(path, force=force)
        return write(self, destination, opset=opset)

    def save_all(
        self,
        paths: Sequence[str | os.PathLike | Output],
        *,
        force: bool = False,
        opset: int | None = None,
    ) -> list[Path]:
        """Write several artifacts, each as ``save`` does; their paths in the order given.
        A SavedModel is written first and, joined from units, verified in a fresh process
        while the others are written (``fuser.formats.writer.write_all``).

        Raises:
            FuseError, VerificationError: as ``save``; artifacts written before stay.
        """
        destinations = [
            path if isinstance(path, Output) else output(path, force=force) for path in paths
        ]
        return write_all(self, destinations, opset=opset)


def serving_function(
    model: Any,
    inputs: Sequence[TensorSpec],
    *,
    jit_compile: bool = False,
    target: str = "tensorflow",
) -> Any:
    """``model`` in a ``tf.function`` with a fixed signature (dynamic batch) returning named
    float32 outputs, traced now.

    ``target`` is who will run the traced graph: ``"tensorflow"`` (verification, the
    SavedModel) or ``"onnx"`` (the graph tf2onnx converts); see
    ``runtime.convolutions.native_grouped_convolutions``.
    """
    import tensorflow as tf

    signature = [
        tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name) for spec in inputs
    ]

    @tf.function(input_signature=signature, jit_compile=jit_compile)
    def serve(*tensors):
        outputs = model(list(tensors), training=False)
        return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}

    with native_grouped_convolutions(target):
        serve.get_concrete_function()
    return serve


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"fuser": __version__, "python": platform.python_version()}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
