"""One backend per artifact kind. Each opens an artifact and runs a batch of named inputs.

A backend is deliberately small: ``manifest`` (the embedded record, or ``None`` when
opened without one, as the compiler does to verify an artifact before it embeds the
manifest) and ``run(feeds) -> {output name: array}``. Only the ONNX backend is imported
on the serving path of an ONNX artifact; TensorFlow is imported inside the other two.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime import manifest as manifest_lib
from runtime import readers
from runtime.convolutions import native_grouped_convolutions
from runtime.custom_objects import explain_load_error, keyed_by_registered_name
from runtime.errors import ArtifactError
from runtime.quiet import import_tensorflow
from runtime.readers import artifact_format


class Backend(Protocol):
    manifest: dict[str, Any] | None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def open_backend(
    path: str | os.PathLike,
    *,
    read_manifest: bool = True,
    verify: bool = True,
    threads: int | None = None,
    custom_objects: Mapping[str, Any] | None = None,
) -> Backend:
    """Open ``path`` with the backend its form calls for.

    Args:
        path: the artifact.
        read_manifest: read and check the embedded manifest (the compiler opens its own
            unfinished artifacts without one).
        verify: check the artifact against the SHA-256 digests its manifest records,
            before the model itself is parsed (only with ``read_manifest``).
        threads: ONNX Runtime's intra-op threads. TensorFlow's pools are process-wide,
            so it is refused for the other two kinds rather than silently ignored.
        custom_objects: custom Keras classes for a ``.keras`` artifact; the plain graphs
            of ONNX and SavedModel artifacts need none, so they ignore them.
    """
    kind = artifact_format(path)
    verify = verify and read_manifest
    if kind == "onnx":
        return OnnxBackend(Path(path), read_manifest=read_manifest, verify=verify, threads=threads)
    if threads is not None:
        raise ValueError(
            f"threads applies to ONNX artifacts; {path} is a {kind} artifact served by "
            "TensorFlow, whose threads are set process-wide with tf.config.threading."
        )
    if kind == "keras":
        return KerasBackend(
            Path(path), read_manifest=read_manifest, verify=verify, custom_objects=custom_objects
        )
    return SavedModelBackend(Path(path), read_manifest=read_manifest, verify=verify)


class OnnxBackend:
    """ONNX Runtime on the CPU. ``InferenceSession.run`` is safe to call from many threads."""

    def __init__(
        self,
        path: Path,
        *,
        read_manifest: bool = True,
        verify: bool = True,
        threads: int | None = None,
    ) -> None:
        self.path = path
        # A model replaced while it loads (``fuser build --force``: a new model, and its
        # new external data file, the old one removed) is read again, once.
        for attempt in range(2):
            before = _identity(path)
            try:
                self._open(path.read_bytes(), read_manifest, verify, threads)
                break
            except ArtifactError:
                if attempt or _identity(path) == before:
                    raise
        self.output_names = [output.name for output in self.session.get_outputs()]
        if read_manifest and self.manifest is None:
            raise readers.no_manifest("onnx", path)

    def _open(self, data: bytes, read_manifest: bool, verify: bool, threads: int | None) -> None:
        """Check ``data`` (the model file's bytes) against its seal and parse it."""
        import onnxruntime

        path = self.path
        # External data files lie beside the model itself, also when it is reached
        # through a symbolic link.
        directory = path.resolve().parent
        self.manifest = readers.onnx_manifest(path, data, verify=verify) if read_manifest else None
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        # The model is parsed from the bytes checked above, never reopened. External data
        # files are read by ONNX Runtime from the folder after their check: a file that
        # someone swaps in between goes unnoticed (the seal detects damage and edits at
        # rest; it is not a signature, and whoever can write the folder can re-seal).
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(directory)
        )
        try:
            self.session = onnxruntime.InferenceSession(
                data, options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own untyped errors
            raise ArtifactError(
                f"Artifact {path} could not be opened by ONNX Runtime: {_first_line(error)}"
            ) from None
        if self.manifest is not None:
            check_signature(
                self.manifest,
                str(path),
                "ONNX graph",
                {value.name: _onnx_tensor(value) for value in self.session.get_inputs()},
                {value.name: _onnx_tensor(value) for value in self.session.get_outputs()},
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values))


class SavedModelBackend:
    """A SavedModel's ``serving_default`` signature, through TensorFlow (imported here only)."""

    def __init__(self, path: Path, *, read_manifest: bool = True, verify: bool = True) -> None:
        self.path = path
        self.manifest = None
        if read_manifest:
            self.manifest = readers.savedmodel_manifest(path, verify=verify)
            if self.manifest is None:
                raise readers.no_manifest("savedmodel", path)

        tf = import_tensorflow()

        self._tf = tf
        try:
            if _graph_form(path):
                self.signature = _SessionSignature(tf, path)
            else:
                loaded = tf.saved_model.load(str(path))
                if "serving_default" not in loaded.signatures:
                    raise ArtifactError(f"Artifact {path} has no 'serving_default' signature.")
                self._loaded = loaded  # keeps the variables the signature refers to alive
                self.signature = loaded.signatures["serving_default"]
        except ArtifactError:
            raise
        except Exception as error:
            raise ArtifactError(
                f"Artifact {path} could not be loaded as a SavedModel: {_first_line(error)}"
            ) from None
        if self.manifest is not None:
            check_signature(
                self.manifest,
                str(path),
                "serving_default signature",
                {
                    name: _tf_tensor(spec)
                    for name, spec in self.signature.structured_input_signature[1].items()
                },
                {
                    name: _tf_tensor(spec)
                    for name, spec in self.signature.structured_outputs.items()
                },
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = self._tf
        outputs = self.signature(**{name: tf.constant(value) for name, value in feeds.items()})
        return {name: np.asarray(tensor) for name, tensor in outputs.items()}


def _graph_form(path: Path) -> bool:
    """Whether a SavedModel is in TensorFlow's graph form (a MetaGraph with a signature
    and a saver, no object graph): what fuser joins from units (docs/architecture.md)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    return bool(proto.meta_graphs) and not proto.meta_graphs[0].HasField("object_graph_def")


class _SessionSignature:
    """The ``serving_default`` signature of a SavedModel in graph form, run in a session
    as TensorFlow Serving runs it (``tf.saved_model.load`` would first rebuild the graph
    as a function, about 2.5x slower); called like a loaded signature."""

    def __init__(self, tf: Any, path: Path) -> None:
        graph = tf.Graph()
        with graph.as_default():
            self._session = tf.compat.v1.Session(graph=graph)
            meta = tf.compat.v1.saved_model.loader.load(self._session, ["serve"], str(path))
        if "serving_default" not in meta.signature_def:
            raise ArtifactError(f"Artifact {path} has no 'serving_default' signature.")
        signature = meta.signature_def["serving_default"]
        self._inputs = {name: info.name for name, info in signature.inputs.items()}
        self._outputs = {name: info.name for name, info in signature.outputs.items()}
        self.structured_input_signature = ((), _specs(tf, signature.inputs))
        self.structured_outputs = _specs(tf, signature.outputs)

    def __call__(self, **feeds: Any) -> dict[str, np.ndarray]:
        return self._session.run(
            self._outputs, {self._inputs[name]: np.asarray(value) for name, value in feeds.items()}
        )


def _specs(tf: Any, infos: Any) -> dict[str, Any]:
    return {
        name: tf.TensorSpec(tf.TensorShape(info.tensor_shape), tf.as_dtype(info.dtype))
        for name, info in infos.items()
    }


class KerasBackend:
    """A ``.keras`` file loaded with Keras in safe mode, called inside one ``tf.function``.

    Custom classes its members use (``custom_objects``, by class or registered name) are
    deserialised as Keras would with their modules imported; safe mode still refuses
    arbitrary code (Lambda layers).
    """

    def __init__(
        self,
        path: Path,
        *,
        read_manifest: bool = True,
        verify: bool = True,
        custom_objects: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.manifest = None
        if read_manifest:
            self.manifest = readers.keras_manifest(path, verify=verify)
            if self.manifest is None:
                raise readers.no_manifest("keras", path)

        tf = import_tensorflow()  # before Keras imports it, loudly
        import keras

        import runtime.cascade  # registers Cascade, the routing of --head cascade
        import runtime.switch  # noqa: F401 - registers BatchSwitch, which fused models may hold

        try:
            self.model = keras.models.load_model(
                path,
                compile=False,
                safe_mode=True,
                custom_objects=keyed_by_registered_name(path, custom_objects),
            )
        except Exception as error:
            reason = explain_load_error(path, error, custom_objects) or _first_line(error)
            raise ArtifactError(f"Artifact {path} could not be loaded by Keras: {reason}") from None
        model = self.model
        self._function = tf.function(lambda feeds: model(feeds, training=False))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Traced per input shape; fused grouped convolutions as TensorFlow's own op.
        with native_grouped_convolutions():
            outputs = self._function(feeds)
        return {name: tensor.numpy() for name, tensor in outputs.items()}


# A tensor as the model declares it: its dtype (numpy's name), and its dimensions (None
# for a free one), or None when its rank is unknown.
Declared = tuple[str, tuple[int | None, ...] | None]


def check_signature(
    manifest: dict[str, Any],
    source: str,
    model: str,
    inputs: dict[str, Declared],
    outputs: dict[str, Declared],
) -> None:
    """Refuse a manifest whose inputs or outputs are not those of the ``model`` it travels
    with: other names, dtypes, ranks or fixed sizes (``predict`` would fail on them).

    Raises:
        ManifestError: naming ``source`` and the manifest field that does not match.
    """
    for key, declared in (("inputs", inputs), ("outputs", outputs)):
        what = f"the {model}'s {key[:-1]}"
        for index, spec in enumerate(manifest[key]):
            field, name = f"manifest field {key}[{index}]", spec["name"]
            if name not in declared:
                problem = (
                    f"{field}.name is {name!r}, but the {model}'s {key} are {sorted(declared)}"
                )
            elif declared[name][0] != spec["dtype"]:
                problem = f"{field}.dtype is {spec['dtype']!r}, but {what} {name!r} is {declared[name][0]}"
            elif not _same_shape(spec["shape"], declared[name][1]):
                problem = (
                    f"{field}.shape is {manifest_lib.format_shape(spec['shape'])}, but {what} "
                    f"{name!r} has shape {manifest_lib.format_shape(declared[name][1])}"
                )
            else:
                continue
            raise manifest_lib.ManifestError(
                f"The manifest in {source} does not describe its model: {problem}."
            )
        unlisted = sorted(set(declared) - {spec["name"] for spec in manifest[key]})
        if unlisted:
            raise manifest_lib.ManifestError(
                f"The manifest in {source} does not describe its model: manifest field {key} "
                f"lacks {what}s {unlisted}."
            )


def _same_shape(shape: list[int | None], declared: tuple[int | None, ...] | None) -> bool:
    if declared is None:
        return True
    return len(shape) == len(declared) and all(
        want is None or got is None or want == got for want, got in zip(shape, declared)
    )


_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bool)": "bool",
    **{f"tensor({name})": name for name in ("int8", "int16", "int32", "int64")},
    **{f"tensor({name})": name for name in ("uint8", "uint16", "uint32", "uint64")},
}


def _onnx_tensor(value: Any) -> Declared:
    """An ONNX Runtime ``NodeArg``: symbolic dimensions (``batch``) are free, and no
    dimensions at all mean an unknown rank (ONNX Runtime says ``[]`` for both that and a
    scalar, which no fused input or output is)."""
    dims = value.shape
    return (
        _ONNX_DTYPES.get(value.type, value.type),
        tuple(dim if isinstance(dim, int) and dim > 0 else None for dim in dims) if dims else None,
    )


def _tf_tensor(spec: Any) -> Declared:
    shape = spec.shape
    return spec.dtype.name, None if shape.rank is None else tuple(shape.as_list())


def _identity(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten; None if it is gone."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
