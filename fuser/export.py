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
import os
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fuser import onnx_switch, onnx_units, placement
from fuser.errors import FuseError, stage
from fuser.onnx_convert import DEFAULT_OPSET, SUPPORTED_OPSETS, to_onnx
from fuser.placement import TEMPORARY_PREFIX
from runtime import integrity
from runtime import manifest as manifest_lib
from runtime.backends import open_backend

if TYPE_CHECKING:
    from fuser.ensemble import Ensemble

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
        else:
            problems += placement.destination_problems(path, output_format(path), force=force)
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
    placement.remove_stale_temporaries(path.parent)
    temporary = placement.temporary_beside(path)
    # Named now: whatever fails after the writer made it, the data file goes too.
    data_file = path.parent / _external_data_name(temporary)
    external: list[str] = []
    placed = False
    try:
        with ensemble.reporter.task(f"Writing {path}"):
            subject = f"the {kind} artifact {path}"
            with stage("converting" if kind == "onnx" else "writing", subject):
                details = _WRITERS[kind](ensemble, temporary, opset or DEFAULT_OPSET)
            with stage("verifying", subject):
                backend = open_backend(temporary, read_manifest=False)
                error = ensemble.verify(backend.run, f"The {kind} artifact {path}")
                del backend
            manifest = ensemble.manifest
            conversion = details.pop(CONVERSION, None)
            if conversion is not None:
                manifest["build"]["onnx_conversion"] = conversion
            manifest["artifact"] = {"format": kind, **details}
            memory = peak_memory_mb()
            manifest["build"]["peak_memory_mb"] = memory
            manifest["verification"]["artifact"] = {
                "probe_batch": ensemble.verification["probe_batch"],
                "tolerance": ensemble.tolerance,
                "max_abs_error": error,
            }
            external = details.get("external_data", [])
            integrity.seal(manifest, integrity.content_of(kind, temporary, external))
            _EMBEDDERS[kind](temporary, manifest_lib.dumps(manifest))
            _check_seal(kind, temporary, path)
            for item in [temporary, *(path.parent / name for name in external)]:
                _sync(item)
            # External data files already have their final, hidden, build-unique names:
            # the one rename of the model below switches to them.
            placement.place(temporary, path, kind, force=force)
            placed = True
    finally:
        placement.remove(temporary)
        if not placed:
            placement.remove(data_file)
    if kind == "onnx":
        _remove_unused_data(path, keep=external)
    ensemble.reporter.note(
        f"Wrote {path} ({kind}, max abs error {error:.2e} against the members; peak memory "
        f"of the build so far {memory:,.0f} MB)."
    )
    return path


# The writers' details under this key go to the manifest's build record, not its artifact's.
CONVERSION = "_conversion"


def peak_memory_mb() -> float:
    """The largest resident memory this process has had, in MB (Linux reports kB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# Above this many bytes of weights the ONNX conversion takes the weights as inputs of the
# traced function instead of freezing them into the TensorFlow graph: freezing and
# converting cost about 40 bytes of memory and 0.16 s per byte of weights (measured: 8
# MLPs with 138 MB of weights, 6.5 GB and 24 s; as inputs, 1.2 GB and 1.8 s), but below
# it the frozen graph is better optimised (BatchNormalization folded into convolutions:
# 8 stacked CNNs answered 30% faster).
WEIGHTS_AS_INPUTS_BYTES = 128_000_000
# Above this many bytes of weights an ONNX artifact keeps them in an external data file
# beside the model: one protobuf cannot pass 2 GB.
EXTERNAL_DATA_BYTES = 1_500_000_000
# Weights at least this large go to the external data file; smaller ones stay inline.
_EXTERNAL_TENSOR_BYTES = 1024
_DATA_ALIGNMENT = 4096


def _write_onnx(ensemble: Ensemble, path: Path, opset: int) -> dict[str, Any]:
    import onnx

    why_whole = onnx_units.why_whole(ensemble, WEIGHTS_AS_INPUTS_BYTES, EXTERNAL_DATA_BYTES)
    if why_whole is None:
        model, report = onnx_units.convert(ensemble, opset, ensemble.conversion)
        output_tensors = {spec.name: spec.name for spec in ensemble.outputs}
        input_tensors = {spec.name: spec.name for spec in ensemble.inputs}
        weights: dict[str, Any] = {}
        conversion = report.to_manifest()
    else:
        model, output_tensors, input_tensors, weights = _convert_to_onnx(ensemble, opset)
        conversion = {"by": "whole", "why": why_whole}
    renames = {tensor: name for name, tensor in input_tensors.items()}
    renames.update({tensor: name for name, tensor in output_tensors.items()})
    _rename_values(model.graph, renames)
    for value in model.graph.input:
        if value.name in renames.values():
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    for value in model.graph.output:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    model.producer_name = "fuser"
    from fuser import __version__

    model.producer_version = __version__
    details: dict[str, Any] = {"opset": opset, CONVERSION: conversion}
    if ensemble.switch_batch is not None:
        details["switch_batch"] = ensemble.switch_batch  # for every switched group
    if weights:
        _fold_weight_transposes(model.graph, weights)
        size = sum(array.nbytes for array in weights.values())
        if size <= EXTERNAL_DATA_BYTES:
            _store_weights(model, weights, None, "")
        else:
            location = _external_data_name(path)
            _store_weights(model, weights, path.parent / location, location)
            details["external_data"] = [location]
    onnx.save(model, str(path))
    # By path: a model with external data is checked with its data file.
    onnx.checker.check_model(str(path), full_check=True)
    return details


def _external_data_name(temporary: Path) -> str:
    """``.NAME.PID-TOKEN.data`` for the artifact NAME: hidden, and unique to this build.

    Its parts are those of the build's temporary, ``.fuser-tmp-PID-TOKEN-NAME``.
    """
    pid, token, final_name = temporary.name[len(TEMPORARY_PREFIX) :].split("-", 2)
    return f".{final_name}.{pid}-{token}.data"


def _fold_weight_transposes(graph: Any, weights: dict[str, Any]) -> None:
    """Transpose weights here, once, where the graph would transpose them on every call.

    tf2onnx turns a TensorFlow convolution kernel into ONNX's layout with a ``Transpose``
    node, and folds it when the kernel is a constant, but not when it is a graph input as
    here. ONNX Runtime folds it at load only while the result is under 1 GB: a stacked
    layer over that would be transposed at every request (seconds, measured).
    """
    # The weights of a switched group are read in the branches of an If.
    graphs = list(onnx_switch.graphs(graph))
    consumers = Counter(name for each in graphs for node in each.node for name in node.input)
    outputs = {value.name for each in graphs for value in each.output}
    folded = set()
    # Subgraphs first: rewriting a graph's nodes copies them, If nodes with their branches.
    for each in reversed(graphs):
        kept = []
        for node in each.node:
            source = node.input[0] if node.input else None
            if (
                node.op_type == "Transpose"
                and source in weights
                and consumers[source] == 1
                and source not in outputs
            ):
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                # No perm means reversed axes, in ONNX and in NumPy alike.
                weights[node.output[0]] = np.transpose(weights.pop(source), perm)
                folded.add(source)
            else:
                kept.append(node)
        del each.node[:]
        each.node.extend(kept)
    inputs = [value for value in graph.input if value.name not in folded]
    del graph.input[:]
    graph.input.extend(inputs)


def _store_weights(model: Any, weights: dict[str, Any], data: Path | None, location: str) -> None:
    """Make the weights (graph inputs of ``model`` until now) initializers.

    With ``data`` None they go inside the model. Else every weight goes to the file
    ``data`` (named ``location`` in the model), aligned to 4 KiB, and so does every other
    initializer of at least 1 KB (the frozen weights of a SavedModel member, say); smaller
    initializers stay inline. The weights are written straight from their arrays, never
    through a ``TensorProto``'s bytes: a stacked layer can be one tensor over 2 GB.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    used = {name for each in onnx_switch.graphs(graph) for node in each.node for name in node.input}
    used.update(value.name for value in graph.output)
    kept = [value for value in graph.input if value.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    # ONNX stores tensors little-endian, in C order.
    arrays = {
        name: np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        for name, array in weights.items()
        if name in used  # else pruned as unused by the conversion
    }
    if data is None:
        for name, array in arrays.items():
            graph.initializer.append(onnx.numpy_helper.from_array(array, name))
        return

    def place(handle: Any, tensor: Any, content: memoryview) -> None:
        offset = handle.tell() + (-handle.tell() % _DATA_ALIGNMENT)
        handle.seek(offset)
        handle.write(content)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", content.nbytes)):
            tensor.external_data.add(key=key, value=str(value))

    with open(data, "wb") as handle:
        for tensor in graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= _EXTERNAL_TENSOR_BYTES:
                content = memoryview(tensor.raw_data)
                tensor.ClearField("raw_data")
                place(handle, tensor, content)
        for name, array in arrays.items():
            tensor = graph.initializer.add()
            tensor.name = name
            tensor.dims.extend(array.shape)
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            place(handle, tensor, memoryview(array.reshape(-1).view(np.uint8)))


def _convert_to_onnx(ensemble: Ensemble, opset: int) -> tuple:
    """Convert the serving function: frozen, or with the weights as inputs when large.

    Returns:
        ``(model, outputs, inputs, weights)``: the ONNX model, the output and input tensor
        names, and, when the weights exceed ``WEIGHTS_AS_INPUTS_BYTES`` or
        ``EXTERNAL_DATA_BYTES``, the weights as ``{graph input name: array}`` (else
        empty): they are then graph inputs of the model until ``_store_weights`` makes
        them initializers.

    A model with groups stacked only up to a batch size (``BatchSwitch``) is converted
    once per form and joined under one ``If`` (``fuser.onnx_switch``), switching at the
    smallest of the groups' limits.
    """
    from runtime._switch import forced

    limit = ensemble.switch_batch
    if limit is None:
        return _convert_once(ensemble, opset)
    with forced("small"):
        small, small_outputs, input_tensors, weights = _convert_once(ensemble, opset)
    with forced("large"):
        large, large_outputs, _, _ = _convert_once(ensemble, opset)
    names = [spec.name for spec in ensemble.outputs]
    model = onnx_switch.stitch(
        small,
        large,
        data_inputs=list(input_tensors.values()),
        small_outputs=[small_outputs[name] for name in names],
        large_outputs=[large_outputs[name] for name in names],
        limit=limit,
    )
    return model, small_outputs, input_tensors, weights


def _convert_once(ensemble: Ensemble, opset: int) -> tuple:
    import tensorflow as tf

    variables = [*ensemble.model.trainable_variables, *ensemble.model.non_trainable_variables]
    size = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    weights: dict[str, Any] = {}
    if size > min(WEIGHTS_AS_INPUTS_BYTES, EXTERNAL_DATA_BYTES):
        function, weights = _weights_as_inputs(ensemble, tf)
    else:
        # Grouped convolutions as TensorFlow's own op, bare, as ONNX's Conv takes them.
        function = ensemble.serving_function(target="onnx")
    concrete = function.get_concrete_function()
    # Freezing turns captured variables and constants (a Normalization layer's mean, say)
    # into graph constants; unfrozen, tf2onnx would make them extra graph inputs. With
    # the weights as inputs there are no variables left: the graph stays small.
    input_tensors = {spec.name: f"{spec.name}:0" for spec in ensemble.inputs}
    model, frozen_outputs = to_onnx(
        concrete,
        [*input_tensors.values(), *weights],
        opset,
        members=[member.name for member in ensemble.members],
    )
    # The frozen function keeps the outputs flat, in tf.nest order (dict keys sorted).
    flat_names = tf.nest.flatten({name: name for name in concrete.structured_outputs})
    output_tensors = dict(zip(flat_names, frozen_outputs))
    return model, output_tensors, input_tensors, weights


def _weights_as_inputs(ensemble: Ensemble, tf: Any) -> tuple[Any, dict[str, Any]]:
    """The serving function with every weight an input (``Model.stateless_call``).

    The weights never enter the TensorFlow graph: it stays small whatever the weights
    weigh (one protobuf cannot hold more than 2 GB, and freezing and converting large
    constants costs far more memory and time than the weights). tf2onnx converts a graph
    whose weights are inputs (a convolution kernel it must transpose gets a Transpose
    node, folded by ``_fold_weight_transposes``), and ``_store_weights`` turns those
    inputs into initializers, in the model or beside it.
    """
    from runtime._keras import native_grouped_convolutions

    model = ensemble.model
    trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
    variables = [*trainable, *non_trainable]
    names = [f"fuser_weight_{index}" for index in range(len(variables))]
    signature = [
        tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name)
        for spec in ensemble.inputs
    ] + [
        tf.TensorSpec(variable.shape, tf.as_dtype(variable.dtype), name=name)
        for variable, name in zip(variables, names)
    ]
    count = len(ensemble.inputs)

    @tf.function(input_signature=signature)
    def serve(*tensors):
        inputs, values = list(tensors[:count]), list(tensors[count:])
        outputs, _ = model.stateless_call(
            values[: len(trainable)], values[len(trainable) :], inputs, training=False
        )
        return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}

    with native_grouped_convolutions("onnx"):
        serve.get_concrete_function()
    weights = {
        f"{name}:0": np.asarray(variable.numpy()) for name, variable in zip(names, variables)
    }
    return serve, weights


def _rename_values(graph: Any, renames: dict[str, str]) -> None:
    """Rename tensors (``features:0`` -> ``features``) everywhere they appear in ``graph``,
    its subgraphs included (they read the outer graph's values by name)."""
    for each in onnx_switch.graphs(graph):
        for value in [*each.input, *each.output, *each.value_info]:
            value.name = renames.get(value.name, value.name)
        for node in each.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
            node.output[:] = [renames.get(name, name) for name in node.output]


def _write_savedmodel(ensemble: Ensemble, path: Path, opset: int) -> dict[str, Any]:
    """The serving function the build traced and verified, and the variables it reads,
    saved as one ``tf.Module``.

    Keras' ``ExportArchive`` walks every layer of the model in SavedModel mode (retracing
    the functions it meets), traces gradient functions for every op type, and stores the
    weights twice (its tracked copies and those the endpoint captures): measured on five
    ImageNet architectures, 81 s and 346 MB against 33 s and 177 MB here, loading 3x
    faster. A model holding resources this module does not track (lookup tables) is
    written by ``ExportArchive`` as before.
    """
    import shutil

    import tensorflow as tf

    from runtime._keras import native_grouped_convolutions

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


def _write_savedmodel_with_keras(ensemble: Ensemble, path: Path) -> None:
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


def _write_keras(ensemble: Ensemble, path: Path, opset: int) -> dict[str, Any]:
    ensemble.model.save(str(path))
    return {}


def _embed_onnx(path: Path, text: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
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


def _remove_unused_data(path: Path, keep: Sequence[str]) -> None:
    """Remove the external data of this output's previous artifacts and of dead builds.

    Data files of builds to the same output still running in other processes are kept:
    they are not placed yet (the last build to place its model wins, as for the model).
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{8}}\.data")
    for entry in path.parent.glob(f".{glob_escape(path.name)}.*.data"):
        match = pattern.fullmatch(entry.name)
        if match is None or entry.name in keep:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not placement.alive(pid):
            placement.remove(entry)


def _sync(path: Path) -> None:
    """Flush the artifact's files to disk before the rename makes them visible."""
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
