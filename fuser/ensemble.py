"""The build: load, validate, fuse, compile, verify. ``build`` returns an ``Ensemble``."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuser import __version__
from fuser.errors import FuseError, VerificationError
from fuser.fuse import assemble
from fuser.heads import Head, make_head
from fuser.members import Member, load_members, parse_specs
from fuser.progress import Reporter
from fuser.validate import Plan, plan
from runtime import manifest as manifest_lib
from runtime.inputs import prepare_feeds
from runtime.manifest import TensorSpec

DEFAULT_PROBE_BATCH = 8
DEFAULT_TOLERANCE = 1e-4


def build(
    members: Sequence[Any],
    head: str | Head = "mean",
    *,
    jobs: int | None = None,
    input_name: str | None = None,
    xla: bool = False,
    safe_mode: bool = True,
    custom_objects: dict[str, Any] | None = None,
    probe_batch: int = DEFAULT_PROBE_BATCH,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool = False,
) -> Ensemble:
    """Load ``members``, check they fit together, and fuse them into one verified model.

    Args:
        members: paths (``.keras``, ``.h5``, SavedModel directories), ``"name=path"``
            strings, or ``(name, path_or_keras_model)`` pairs.
        head: the combining head (see ``fuser.heads.HEADS``).
        jobs: members loaded at once (default: one per core, at most one per member).
        input_name: name of the fused input when members have one input each
            (default: the first member's input name).
        xla: compile the fused function with XLA.
        safe_mode: refuse members that carry arbitrary code (Keras ``safe_mode``).
        custom_objects: classes to deserialise Keras members with, for registered layers.
        probe_batch: rows of the probe batch the build verifies itself on.
        tolerance: largest allowed error (absolute, and relative to the value's size)
            between the fused model and the members run one by one.
        progress: show progress on stderr.

    Raises:
        FuseError: a bad member, incompatible members or a bad option, naming each.
        VerificationError: the fused model disagrees with its members.
    """
    _check_options(jobs=jobs, probe_batch=probe_batch, tolerance=tolerance)
    head = make_head(head)
    reporter = Reporter(enabled=progress)
    specs = parse_specs(members)
    with reporter.task("Importing TensorFlow and loading members", total=len(specs)) as advance:
        loaded, load_wall = load_members(
            specs,
            jobs=jobs,
            safe_mode=safe_mode,
            custom_objects=custom_objects,
            on_loaded=lambda member: advance(member.name),
        )
    load_sum = sum(member.load_seconds for member in loaded)
    reporter.note(
        f"Loaded {len(loaded)} members in {load_wall:.2f} s "
        f"(sum of the single loads {load_sum:.2f} s, {jobs or min(len(loaded), os.cpu_count() or 1)} at once)."
    )
    wiring = plan(loaded, input_name=input_name)
    with reporter.task("Fusing and compiling"):
        ensemble = Ensemble(
            loaded,
            wiring,
            head,
            xla=xla,
            probe_batch=probe_batch,
            tolerance=tolerance,
            build_info={
                "load_seconds": round(load_wall, 4),
                "load_seconds_sum": round(load_sum, 4),
            },
        )
    reporter.note(
        f"Fused model matches its members: max abs error {ensemble.verification['max_abs_error']:.2e} "
        f"on a probe batch of {probe_batch}."
    )
    ensemble.reporter = reporter
    return ensemble


def _check_options(*, jobs: int | None, probe_batch: int, tolerance: float) -> None:
    problems = []
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        problems.append(f"jobs must be a positive integer, got {jobs!r}.")
    if not isinstance(probe_batch, int) or isinstance(probe_batch, bool) or probe_batch < 1:
        problems.append(f"probe_batch must be a positive integer, got {probe_batch!r}.")
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        problems.append(f"tolerance must be a positive number, got {tolerance!r}.")
    if problems:
        raise FuseError(problems)


class Ensemble:
    """A fused ensemble in memory: one Keras model, compiled, verified, ready to save.

    Attributes:
        model: the fused ``keras.Model`` (inputs by name, a dict of named outputs).
        members: the loaded members, in order; ``named_members`` maps name -> member.
        inputs, outputs: the fused signature (``runtime.TensorSpec``).
        manifest: the record every artifact carries (without the artifact's own part).
        verification: the probe batch check of the fused model.
    """

    def __init__(
        self,
        members: Sequence[Member],
        wiring: Plan,
        head: Head,
        *,
        xla: bool = False,
        probe_batch: int = DEFAULT_PROBE_BATCH,
        tolerance: float = DEFAULT_TOLERANCE,
        build_info: dict[str, Any] | None = None,
    ) -> None:
        import tensorflow as tf

        self.members = list(members)
        self.named_members = {member.name: member for member in self.members}
        self.head = head
        self.inputs: tuple[TensorSpec, ...] = wiring.inputs
        self.outputs: tuple[TensorSpec, ...] = wiring.outputs
        self.xla = xla
        self.tolerance = tolerance
        self.reporter = Reporter(enabled=False)
        self.model = assemble(self.members, wiring, head)
        self._function = self.serving_function(jit_compile=xla)
        self.probe = _probe_batch(self.inputs, probe_batch)
        self.reference = self._reference(wiring, tf)
        error = self.check(self.predict(self.probe, as_dict=True), "The fused model")
        self.verification = {
            "probe_batch": probe_batch,
            "tolerance": tolerance,
            "max_abs_error": error,
        }
        self._build_info = build_info or {}

    def serving_function(self, *, jit_compile: bool = False) -> Any:
        """A ``tf.function`` with a fixed signature (dynamic batch) returning named outputs."""
        import tensorflow as tf

        model = self.model
        signature = [
            tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name)
            for spec in self.inputs
        ]

        @tf.function(input_signature=signature, jit_compile=jit_compile)
        def serve(*tensors):
            outputs = model(list(tensors), training=False)
            return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}

        return serve

    def predict(self, x: Any, *, as_dict: bool | None = None) -> Any:
        """Run the fused model: one array for one output, else a dict name -> array."""
        feeds = prepare_feeds(self.inputs, x)
        outputs = self._function(*feeds.values())
        results = {spec.name: outputs[spec.name].numpy() for spec in self.outputs}
        if as_dict or (as_dict is None and len(results) > 1):
            return results
        return results[self.outputs[0].name]

    def check(self, results: dict[str, np.ndarray], what: str) -> float:
        """Compare results on the probe batch with the members run one by one.

        Returns the max abs error. Raises ``VerificationError`` beyond tolerance.
        """
        worst = 0.0
        for spec in self.outputs:
            got = np.asarray(results[spec.name], dtype=np.float64)
            want = self.reference[spec.name]
            if got.shape != want.shape:
                raise VerificationError(
                    f"{what} returns output '{spec.name}' of shape {got.shape}, but the members "
                    f"give {want.shape}."
                )
            difference = np.abs(got - want)
            if not np.all(np.isfinite(got) == np.isfinite(want)):
                raise VerificationError(
                    f"{what} returns non-finite values in output '{spec.name}' where the members do not."
                )
            finite = np.isfinite(want)
            error = float(difference[finite].max()) if finite.any() else 0.0
            bound = self.tolerance * (1.0 + np.abs(want[finite]))
            if np.any(difference[finite] > bound):
                raise VerificationError(
                    f"{what} differs from its members by up to {error:.3g} on output "
                    f"'{spec.name}' (tolerance {self.tolerance:g}); the build is refused."
                )
            worst = max(worst, error)
        return worst

    def _reference(self, wiring: Plan, tf: Any) -> dict[str, np.ndarray]:
        """The head applied in NumPy to the members' outputs, each member run on its own."""
        per_output: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for member in self.members:
            tensors = [tf.constant(self.probe[name]) for name in wiring.input_order[member.name]]
            outputs = [np.asarray(value) for value in member.call(tensors)]
            for slot, index in enumerate(wiring.output_order[member.name]):
                per_output[slot].append(outputs[index].astype(np.float64))
        return {
            spec.name: self.head.reference(np.stack(per_output[slot]))
            for slot, spec in enumerate(self.outputs)
        }

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest every artifact of this ensemble carries (artifact part excluded)."""
        return {
            "format": manifest_lib.FORMAT,
            "format_version": manifest_lib.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": _versions(),
            "members": [member.to_manifest() for member in self.members],
            "head": {"name": self.head.name, "params": self.head.params()},
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "fusion": {"groups": [], "xla": self.xla},
            "build": dict(self._build_info),
            "verification": {"fused_model": dict(self.verification)},
            "artifact": {},
        }

    def save(
        self, path: str | os.PathLike, *, force: bool = False, opset: int | None = None
    ) -> Path:
        """Write one artifact (the path's form picks the format), verified, atomically.

        Raises:
            FuseError: the path exists and ``force`` is false, or the format cannot hold a member.
            VerificationError: the written artifact disagrees with the members.
        """
        from fuser import export

        return export.write(self, Path(path), force=force, opset=opset)


def _probe_batch(inputs: Sequence[TensorSpec], rows: int) -> dict[str, np.ndarray]:
    """Deterministic probe inputs: standard normal floats, small non-negative integers."""
    rng = np.random.default_rng(0)
    probe = {}
    for spec in inputs:
        shape = (rows, *[dim if dim is not None else 8 for dim in spec.shape[1:]])
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            probe[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            probe[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            probe[spec.name] = rng.integers(0, 2, shape).astype(dtype)
    return probe


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"fuser": __version__, "python": platform.python_version()}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
