"""Members: what a saved model is, how it is found, and how many load at once.

A member is given as a path (``.keras``, legacy ``.h5``, a SavedModel directory),
as ``name=path``, as a ``(name, path)`` pair, or as a ``(name, keras.Model)`` pair for
a model already in memory (which is never modified). Loading runs in a thread pool:
threads beat processes here because a loaded Keras model cannot cross a process
boundary without being serialised and loaded a second time (see README, "Loading").
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fuser._tf import tensorflow
from fuser.errors import FuseError
from runtime.manifest import TensorSpec

FORMATS = ("keras", "h5", "savedmodel", "memory")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Model files of other frameworks, recognised by suffix to say so instead of "not a model".
_FOREIGN_FORMATS = {".onnx": "an ONNX model", ".tflite": "a TensorFlow Lite model"}


@dataclasses.dataclass
class MemberSpec:
    """A member as the user named it, before loading."""

    name: str
    source: Path | None
    model: Any = None  # an in-memory keras.Model, when given one

    def describe(self) -> str:
        where = self.source.name if self.source is not None else "in memory"
        return f'Member "{self.name}" ({where})'


@dataclasses.dataclass
class Member:
    """A loaded member: its signature, provenance and the object that computes it."""

    name: str
    source: Path | None
    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: int
    sha256: str | None
    load_seconds: float
    model: Any  # keras.Model, or a layer calling a SavedModel signature

    def describe(self) -> str:
        where = self.source.name if self.source is not None else "in memory"
        return f'Member "{self.name}" ({where})'

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source.name if self.source is not None else None,
            "format": self.format,
            "sha256": self.sha256,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "parameters": self.parameters,
        }

    def call(self, tensors: Sequence[Any]) -> list[Any]:
        """Apply the member to tensors in the order of ``self.inputs``; return its flat outputs."""
        if self.format == "savedmodel":
            named = dict(zip((spec.name for spec in self.inputs), tensors))
            outputs = self.model(named)
            return [outputs[spec.name] for spec in self.outputs]
        import keras

        structure = getattr(self.model, "_inputs_struct", None)
        if structure is not None:
            arguments = keras.tree.pack_sequence_as(structure, list(tensors))
        else:
            arguments = tensors[0] if len(tensors) == 1 else list(tensors)
        return keras.tree.flatten(self.model(arguments, training=False))


def parse_specs(members: Sequence[Any]) -> list[MemberSpec]:
    """Turn what the user passed into named member specs (no I/O beyond ``Path``)."""
    specs = []
    for item in members:
        if isinstance(item, (str, os.PathLike)):
            text = os.fspath(item)
            name, _, rest = text.partition("=")
            if rest and name and os.sep not in name and "/" not in name:
                specs.append(MemberSpec(name=name, source=Path(rest)))
            else:
                path = Path(text)
                specs.append(MemberSpec(name=_stem(path), source=path))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, target = item
            if isinstance(target, (str, os.PathLike)):
                specs.append(MemberSpec(name=name, source=Path(target)))
            else:
                specs.append(MemberSpec(name=name, source=None, model=target))
        else:
            raise FuseError(
                f"A member must be a path, 'name=path', or a (name, path or keras.Model) pair; "
                f"received {type(item).__name__}."
            )
    return specs


def check_names(specs: Sequence[MemberSpec]) -> list[str]:
    """Problems with the member names: empty list, bad characters, duplicates."""
    if not specs:
        return ["No members were given; an ensemble needs at least one member."]
    problems = []
    seen: dict[str, MemberSpec] = {}
    for spec in specs:
        if not _NAME_PATTERN.match(spec.name):
            problems.append(
                f"{spec.describe()} has an invalid name {spec.name!r}: use letters, digits, "
                "'_', '-' and '.', starting with a letter or digit (name it with name=path)."
            )
        elif spec.name in seen:
            problems.append(
                f"{spec.describe()} has the same name as {seen[spec.name].describe()}; member "
                "names must be unique (name them with name=path)."
            )
        else:
            seen[spec.name] = spec
    return problems


def detect_format(spec: MemberSpec) -> str:
    """The member format of ``spec.source`` by looking at it.

    Raises:
        FuseError: one sentence naming the member, what was expected and what was found.
    """
    path = spec.source
    if path is None:
        return "memory"
    expected = "expected a .keras file, a legacy .h5 file or a SavedModel directory"
    if not path.exists():
        return _refuse(spec, f"{path} does not exist; {expected}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        if not any(path.iterdir()):
            return _refuse(spec, f"{path} is an empty directory; {expected}")
        if (path / "variables").is_dir() or (path / "assets").is_dir():
            return _refuse(spec, f"{path} looks like a SavedModel but has no saved_model.pb")
        return _refuse(spec, f"{path} is a directory without saved_model.pb; {expected}")
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return _refuse(spec, f"{path} cannot be read ({error.strerror})")
    if not head:
        return _refuse(spec, f"{path} is an empty file; {expected}")
    if path.name.endswith(".weights.h5"):
        return _refuse(
            spec,
            f"{path} is a weights-only file (.weights.h5) without the architecture; "
            "save the whole model with model.save('model.keras')",
        )
    if head.startswith(_ZIP_MAGIC):
        return _damaged_zip(spec, path) or "keras"
    if head.startswith(_HDF5_MAGIC):
        return "h5"
    if path.name == "saved_model.pb":
        return _refuse(
            spec, f"{path} is the graph file of a SavedModel; give its directory {path.parent}"
        )
    if path.suffix.lower() in _FOREIGN_FORMATS:
        return _refuse(
            spec,
            f"{path} is named as {_FOREIGN_FORMATS[path.suffix.lower()]}, and fuser does not "
            "take those as members; give the Keras or TensorFlow model it came from (a .keras "
            "file, a legacy .h5 file or a SavedModel directory)",
        )
    if path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        kind = "zip archive" if path.suffix.lower() == ".keras" else "HDF5 file"
        return _refuse(spec, f"{path} is not a {kind}, so it is not a {path.suffix} model")
    return _refuse(spec, f"{path} is not a model file; {expected}")


def _damaged_zip(spec: MemberSpec, path: Path) -> None:
    """Refuse a zip that is truncated or fails a CRC, before Keras says something vaguer."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
        bad = ""
    if bad is not None:
        where = f" (entry {bad!r} fails its CRC check)" if bad else ""
        _refuse(
            spec,
            f"{path} is a damaged zip archive{where}: truncated or corrupted, so it cannot be "
            "read as a .keras model",
        )


def _refuse(spec: MemberSpec, what: str) -> str:
    raise FuseError(f'Member "{spec.name}": {what}.')


def load_members(
    specs: Sequence[MemberSpec],
    *,
    jobs: int | None = None,
    safe_mode: bool = True,
    custom_objects: dict[str, Any] | None = None,
    on_loaded: Callable[[Member], None] | None = None,
) -> tuple[list[Member], float]:
    """Load all members, ``jobs`` at a time, and report every failure at once.

    Returns:
        The members in the order given, and the wall time of loading (TensorFlow's
        import excluded).

    Raises:
        FuseError: one sentence per member that could not be loaded.
    """
    problems = check_names(specs)
    formats: dict[str, str] = {}
    for spec in specs:
        try:
            formats[spec.name] = detect_format(spec)
        except FuseError as error:
            problems.extend(error.problems)
    if problems:
        raise FuseError(problems)

    tensorflow()  # import once here, not racing in the worker threads
    started = time.perf_counter()
    jobs = jobs or min(len(specs), os.cpu_count() or 1)
    loaded: dict[str, Member] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(_load_one, spec, formats[spec.name], safe_mode, custom_objects): spec
            for spec in specs
        }
        for future in concurrent.futures.as_completed(futures):
            try:
                member = future.result()
            except FuseError as error:
                problems.extend(error.problems)
                continue
            loaded[member.name] = member
            if on_loaded is not None:
                on_loaded(member)
    if problems:
        raise FuseError(problems)
    return [loaded[spec.name] for spec in specs], time.perf_counter() - started


def _load_one(
    spec: MemberSpec, member_format: str, safe_mode: bool, custom_objects: dict[str, Any] | None
) -> Member:
    started = time.perf_counter()
    if member_format == "savedmodel":
        inputs, outputs, model = _load_savedmodel(spec)
        parameters = int(sum(int(weight.numpy().size) for weight in model.weights))
    else:
        model = (
            spec.model
            if member_format == "memory"
            else _load_keras(spec, safe_mode, custom_objects)
        )
        inputs, outputs = _keras_signature(spec, model)
        parameters = int(model.count_params())
    return Member(
        name=spec.name,
        source=spec.source,
        format=member_format,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        sha256=sha256_of(spec.source) if spec.source is not None else None,
        load_seconds=time.perf_counter() - started,
        model=model,
    )


def _load_keras(spec: MemberSpec, safe_mode: bool, custom_objects: dict[str, Any] | None) -> Any:
    import keras

    import runtime._switch  # noqa: F401 - a fused ensemble built by fuser can be a member

    try:
        return keras.models.load_model(
            spec.source,
            compile=False,
            safe_mode=safe_mode,
            custom_objects=_by_registered_name(spec.source, custom_objects),
        )
    except Exception as error:
        raise FuseError(
            f"{spec.describe()} could not be loaded: {_explain_load_error(error)}"
        ) from None


def _by_registered_name(path: Path, custom_objects: dict[str, Any] | None) -> dict[str, Any] | None:
    """``custom_objects`` also under the names the file records for them (``package>Class``).

    Keras looks a registered class up by the name it was saved under only, while users
    give it by its class name (``--custom-objects module:Class``); a class registered
    under another package where it is loaded would not be found either.
    """
    if not custom_objects:
        return custom_objects
    keyed = dict(custom_objects)
    for registered in _registered_names(path):
        package, _, name = registered.rpartition(">")
        if package and name in custom_objects:
            keyed.setdefault(registered, custom_objects[name])
    return keyed


def _registered_names(path: Path) -> set[str]:
    """The ``package>Class`` names in a .keras or .h5 model's config (empty if unreadable)."""
    import json
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
        else:
            import h5py

            with h5py.File(path, "r") as file:
                text = file.attrs.get("model_config")
            config = json.loads(text) if text is not None else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return set()
    names: set[str] = set()
    pending = [config]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            names.update(
                value
                for key in ("registered_name", "class_name")
                if isinstance(value := node.get(key), str) and ">" in value
            )
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return names


def _explain_load_error(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if "safe_mode" in text or "unsafe_deserialization" in text or "Lambda" in text:
        return (
            "it contains a Lambda layer or other arbitrary code, which safe mode refuses to "
            "run; if you trust this file, rebuild with --unsafe (safe_mode=False)."
        )
    if "Could not locate class" in text or "Unknown layer" in text or "custom_objects" in text:
        # Keras wraps the error of the layer inside the model's ("<class ...Functional'>
        # could not be deserialized ... Could not locate class 'Scale'"): name the layer's.
        match = re.search(r"(?:Could not locate class|Unknown layer:?) '?([\w.]*\w)", text)
        what = f"the custom class {match.group(1)!r}" if match else "a custom class"
        return (
            f"it uses {what}, which is not registered; pass --custom-objects module:name "
            "(or custom_objects=) for classes you trust."
        )
    first = text.split(". ")[0]
    return first[:300] + ("…" if len(first) > 300 else "")


def _keras_signature(
    spec: MemberSpec, model: Any
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    try:
        input_tensors = list(model.inputs)
        output_tensors = list(model.outputs)
    except (AttributeError, ValueError):
        raise FuseError(
            f"{spec.describe()} is a subclassed model without a known input signature; "
            "save it as a functional or Sequential model, or export it as a SavedModel."
        ) from None
    output_names = list(getattr(model, "output_names", None) or [])
    if len(output_names) != len(output_tensors):
        output_names = [f"output_{index}" for index in range(len(output_tensors))]
    inputs = tuple(
        TensorSpec(_tensor_name(tensor.name), tuple(tensor.shape), str(tensor.dtype))
        for tensor in input_tensors
    )
    outputs = tuple(
        TensorSpec(name, tuple(tensor.shape), str(tensor.dtype))
        for name, tensor in zip(output_names, output_tensors)
    )
    return inputs, outputs


def _load_savedmodel(
    spec: MemberSpec,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], Any]:
    """Read the ``serving_default`` signature from the protobuf, then load the graph once."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    path = spec.source
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception:
        raise FuseError(f"{spec.describe()} has a saved_model.pb that cannot be parsed.") from None
    signatures: dict[str, Any] = {}
    for meta_graph in proto.meta_graphs:
        signatures.update(
            # "__saved_model_init_op" and the like are TensorFlow's own, not callable ones.
            (name, signature)
            for name, signature in meta_graph.signature_def.items()
            if not name.startswith("__")
        )
    if "serving_default" not in signatures:
        found = ", ".join(sorted(signatures)) or "none"
        raise FuseError(
            f"{spec.describe()} is a SavedModel without a 'serving_default' signature "
            f"(signatures found: {found}); export it with model.export() or give "
            "tf.saved_model.save a serving_default signature."
        )
    signature = signatures["serving_default"]
    inputs = tuple(
        _spec_from_tensor_info(spec, name, info, tf)
        for name, info in sorted(signature.inputs.items())
    )
    outputs = tuple(
        _spec_from_tensor_info(spec, name, info, tf)
        for name, info in sorted(signature.outputs.items(), key=lambda item: _natural_key(item[0]))
    )
    from fuser._savedmodel_layer import SavedModelBranch

    try:
        layer = SavedModelBranch(str(path), call_endpoint="serving_default")
    except Exception as error:
        raise FuseError(
            f"{spec.describe()} could not be loaded as a SavedModel: {_explain_load_error(error)}"
        ) from None
    return inputs, outputs, layer


def _spec_from_tensor_info(spec: MemberSpec, name: str, info: Any, tf: Any) -> TensorSpec:
    if info.tensor_shape.unknown_rank:
        raise FuseError(
            f"{spec.describe()} has a signature tensor {name!r} of unknown rank; export the "
            "model with a fixed input signature."
        )
    try:
        dtype = tf.dtypes.as_dtype(info.dtype).name
    except TypeError:  # DT_INVALID: a sparse or composite tensor, not a plain one
        raise FuseError(
            f"{spec.describe()} has a signature tensor {name!r} without a known dtype (it is "
            "not a plain tensor); export the model with a signature of plain tensors."
        ) from None
    shape = tuple(dim.size if dim.size >= 0 else None for dim in info.tensor_shape.dim)
    return TensorSpec(name, shape, dtype)


def _tensor_name(name: str) -> str:
    return name.split(":")[0]


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _stem(path: Path) -> str:
    name = path.name.rstrip("/") or path.resolve().name
    for suffix in (".keras", ".hdf5", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a directory's relative paths and contents in sorted order."""
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
        return digest.hexdigest()
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        _hash_file(file, digest)
    return digest.hexdigest()


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
