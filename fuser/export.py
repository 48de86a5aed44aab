"""Artifact writers: one per format, all atomic, all verified before they land.

Every write goes the same way: write to a hidden temporary beside the destination,
open it with the runtime's own backend and compare it with the members on the probe
batch, seal the manifest (that verification plus SHA-256 digests of everything else in
the artifact, ``runtime.integrity``), embed it, check the seal as the runtime will, then
move it into place with one rename. A killed build leaves at most a hidden ``.fuser-tmp-*`` entry, which the next
build in that directory removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fuser.errors import FuseError
from runtime import integrity
from runtime import manifest as manifest_lib
from runtime.backends import open_backend

if TYPE_CHECKING:
    from fuser.ensemble import Ensemble

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 19)  # what tf2onnx 1.17 converts to
TEMPORARY_PREFIX = ".fuser-tmp-"
_REFUSED_SUFFIXES = (".h5", ".hdf5", ".pb", ".tflite", ".npy", ".npz", ".json", ".zip")


def output_format(path: Path) -> str:
    """``onnx`` for ``*.onnx``, ``keras`` for ``*.keras``, else ``savedmodel`` (a directory)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".keras":
        return "keras"
    return "savedmodel"


def destination_problems(paths: Sequence[Path], *, force: bool) -> list[str]:
    """Problems with where artifacts would go, found before any work is done."""
    problems = []
    seen = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            problems.append(f"The output {path} is given twice.")
        seen.add(resolved)
        if path.suffix.lower() in _REFUSED_SUFFIXES:
            problems.append(
                f"The output {path} has suffix {path.suffix}; fuser writes .onnx files, .keras "
                "files, or SavedModel directories (any other path)."
            )
        elif path.exists() and not force:
            problems.append(
                f"The output {path} already exists; pass --force (force=True) to replace it."
            )
    return problems


def format_problems(path: Path, members: Sequence[Any]) -> list[str]:
    """Problems with a format that cannot hold some member whole."""
    if output_format(path) != "keras":
        return []
    return [
        f"{member.describe()} is a SavedModel, which a .keras artifact cannot hold whole (Keras "
        f"would keep only a path to {member.source}); write an .onnx file or a SavedModel "
        "directory instead."
        for member in members
        if member.format == "savedmodel"
    ]


def check_opset(opset: int | None) -> list[str]:
    if opset is None or (isinstance(opset, int) and opset in SUPPORTED_OPSETS):
        return []
    return [
        f"ONNX opset {opset!r} is not supported; choose {SUPPORTED_OPSETS.start} to "
        f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})."
    ]


def write(ensemble: Ensemble, path: Path, *, force: bool = False, opset: int | None = None) -> Path:
    """Write, verify and atomically place one artifact of ``ensemble`` at ``path``."""
    problems = destination_problems([path], force=force) + format_problems(path, ensemble.members)
    problems += check_opset(opset)
    if problems:
        raise FuseError(problems)
    kind = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    temporary = path.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        with ensemble.reporter.task(f"Writing {path}"):
            details = _WRITERS[kind](ensemble, temporary, opset or DEFAULT_OPSET)
            backend = open_backend(temporary, read_manifest=False)
            error = ensemble.check(backend.run(ensemble.probe), f"The {kind} artifact {path}")
            del backend
            manifest = ensemble.manifest
            manifest["artifact"] = {"format": kind, **details}
            manifest["verification"]["artifact"] = {
                "probe_batch": ensemble.verification["probe_batch"],
                "tolerance": ensemble.tolerance,
                "max_abs_error": error,
            }
            integrity.seal(manifest, integrity.content_of(kind, temporary))
            _EMBEDDERS[kind](temporary, manifest_lib.dumps(manifest))
            _check_seal(kind, temporary, path)
            _sync(temporary)
            _place(temporary, path)
    finally:
        _remove(temporary)
    ensemble.reporter.note(f"Wrote {path} ({kind}, max abs error {error:.2e} against the members).")
    return path


def _write_onnx(ensemble: Ensemble, path: Path, opset: int) -> dict[str, Any]:
    import onnx
    import tensorflow as tf
    import tf2onnx

    from fuser._tf import python_logs_quiet

    with python_logs_quiet("tensorflow", "tf2onnx"):
        model, output_tensors, input_tensors = _convert_to_onnx(ensemble, opset, tf, tf2onnx)
    renames = {tensor: name for name, tensor in input_tensors.items()}
    renames.update({tensor: name for name, tensor in output_tensors.items()})
    _rename_values(model.graph, renames)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    model.producer_name = "fuser"
    from fuser import __version__

    model.producer_version = __version__
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return {"opset": opset}


def _convert_to_onnx(ensemble: Ensemble, opset: int, tf: Any, tf2onnx: Any) -> tuple:
    """Freeze the serving function and convert it; returns (model, outputs, inputs) names."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    # Traced by serving_function, grouped convolutions as TensorFlow's own op.
    concrete = ensemble.serving_function(jit_compile=False).get_concrete_function()
    # Freezing turns captured variables and constants (a Normalization layer's mean, say)
    # into graph constants; unfrozen, tf2onnx would make them extra graph inputs.
    frozen = convert_variables_to_constants_v2(concrete)
    input_tensors = {spec.name: f"{spec.name}:0" for spec in ensemble.inputs}
    # The frozen function keeps the outputs flat, in tf.nest order (dict keys sorted).
    flat_names = tf.nest.flatten({name: name for name in concrete.structured_outputs})
    output_tensors = {name: tensor.name for name, tensor in zip(flat_names, frozen.outputs)}
    model, _ = tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=list(input_tensors.values()),
        output_names=[output_tensors[spec.name] for spec in ensemble.outputs],
        opset=opset,
    )
    return model, output_tensors, input_tensors


def _rename_values(graph: Any, renames: dict[str, str]) -> None:
    """Rename tensors (``features:0`` -> ``features``) everywhere they appear in ``graph``."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]


def _write_savedmodel(ensemble: Ensemble, path: Path, opset: int) -> dict[str, Any]:
    from keras.export import ExportArchive

    from runtime._keras import native_grouped_convolutions

    # Everything traced here (the archive retraces) takes grouped convolutions as
    # TensorFlow's own op, so the SavedModel needs no XLA to serve them.
    with native_grouped_convolutions():
        archive = ExportArchive()
        archive.track(ensemble.model)
        archive.add_endpoint("serving_default", ensemble.serving_function(jit_compile=ensemble.xla))
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            archive.write_out(str(path), verbose=False)
    return {"signature": "serving_default", "xla": ensemble.xla}


def _write_keras(ensemble: Ensemble, path: Path, opset: int) -> dict[str, Any]:
    ensemble.model.save(str(path))
    return {}


def _embed_onnx(path: Path, text: str) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = manifest_lib.ONNX_METADATA_KEY, text
    onnx.save(model, str(path))


def _embed_savedmodel(path: Path, text: str) -> None:
    asset = path / manifest_lib.SAVEDMODEL_ASSET
    asset.parent.mkdir(exist_ok=True)
    asset.write_text(text)


def _embed_keras(path: Path, text: str) -> None:
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(manifest_lib.KERAS_ZIP_ENTRY, text)


_WRITERS = {"onnx": _write_onnx, "savedmodel": _write_savedmodel, "keras": _write_keras}
_EMBEDDERS = {"onnx": _embed_onnx, "savedmodel": _embed_savedmodel, "keras": _embed_keras}


def _check_seal(kind: str, temporary: Path, path: Path) -> None:
    """Read the sealed artifact back as the runtime will, so a seal that cannot hold never lands."""
    try:
        integrity.read_manifest(kind, temporary)
    except integrity.IntegrityError as error:
        raise FuseError(
            f"The {kind} artifact {path} did not pass its own integrity check after sealing "
            f"({error}); this is a bug in fuser, please report it."
        ) from None


def _sync(path: Path) -> None:
    """Flush the artifact's files to disk before the rename makes them visible."""
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _place(temporary: Path, path: Path) -> None:
    """Move ``temporary`` to ``path`` in one step; an existing ``path`` is swapped out atomically."""
    if not path.exists() or (path.is_file() and temporary.is_file()):
        os.replace(temporary, path)
    elif not _exchange(temporary, path):
        # No atomic exchange on this system: move the old one aside first.
        aside = path.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-old-{path.name}"
        os.replace(path, aside)
        os.replace(temporary, path)
        _remove(aside)
    else:
        _remove(temporary)  # now holds the previous artifact
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False if unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0


def remove_stale_temporaries(directory: Path) -> None:
    """Remove temporaries left by builds that died (their process is gone)."""
    for entry in directory.glob(f"{TEMPORARY_PREFIX}*"):
        pid_text = entry.name[len(TEMPORARY_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            _remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
