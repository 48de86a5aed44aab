"""The ONNX artifact: one ``.onnx`` file (and, over 2 GB, an external data file beside it).

Converted by units where it can (``fuser.conversion.units``), else as one model: frozen,
or with the weights as inputs of the traced function when they are large (freezing
costs far more memory than the weights), joined under one ``If`` when groups are
switched on the batch size (``fuser.conversion.switch``). Inputs carry the ensemble's
input names, outputs its output names, the batch dimension is ``batch``; the manifest
travels in ``metadata_props["fuser.manifest"]``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np

from fuser import __version__
from fuser.built import Built
from fuser.conversion import switch as switch_lib
from fuser.conversion import units as units_lib
from fuser.conversion.convert import DEFAULT_OPSET, SUPPORTED_OPSETS, rename, to_onnx
from fuser.formats import placement
from fuser.formats.format import Format
from fuser.formats.placement import TEMPORARY_PREFIX
from runtime import manifest as manifest_lib
from runtime.convolutions import native_grouped_convolutions

__all__ = ["DEFAULT_OPSET", "FORMAT", "SUPPORTED_OPSETS", "check_opset", "data_file_name"]

# Above this many bytes of weights the ONNX conversion takes the weights as inputs of the
# traced function instead of freezing them into the TensorFlow graph: freezing and
# converting cost tens of bytes of memory per byte of weights, but below this the
# frozen graph is better optimised (BatchNormalization folded into convolutions; the
# figures are in docs/architecture.md).
WEIGHTS_AS_INPUTS_BYTES = 128_000_000
# Above this many bytes of weights an ONNX artifact keeps them in an external data file
# beside the model: one protobuf cannot pass 2 GB.
EXTERNAL_DATA_BYTES = 1_500_000_000
# Weights at least this large go to the external data file; smaller ones stay inline.
_EXTERNAL_TENSOR_BYTES = 1024
_DATA_ALIGNMENT = 4096

# The writer's details under this key go to the manifest's build record, not its artifact's.
CONVERSION = "_conversion"


def check_opset(opset: int | None) -> list[str]:
    if opset is None or (isinstance(opset, int) and opset in SUPPORTED_OPSETS):
        return []
    return [
        f"ONNX opset {opset!r} is not supported; choose {SUPPORTED_OPSETS.start} to "
        f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})."
    ]


def write(ensemble: Built, path: Path, opset: int) -> dict[str, Any]:
    import onnx

    why_whole = units_lib.why_whole(ensemble, WEIGHTS_AS_INPUTS_BYTES, EXTERNAL_DATA_BYTES)
    if why_whole is None:
        model, report = units_lib.convert(ensemble, opset, ensemble.conversion)
        output_tensors = {spec.name: spec.name for spec in ensemble.outputs}
        input_tensors = {spec.name: spec.name for spec in ensemble.inputs}
        weights: dict[str, Any] = {}
        conversion = report.to_manifest()
    else:
        model, output_tensors, input_tensors, weights = _convert_to_onnx(ensemble, opset)
        conversion = {"by": "whole", "why": why_whole}
    renames = {tensor: name for name, tensor in input_tensors.items()}
    renames.update({tensor: name for name, tensor in output_tensors.items()})
    rename(model.graph, renames)
    for value in model.graph.input:
        if value.name in renames.values():
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    for value in model.graph.output:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    model.producer_name = "fuser"

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
            location = data_file_name(path)
            _store_weights(model, weights, path.parent / location, location)
            details["external_data"] = [location]
    onnx.save(model, str(path))
    # By path: a model with external data is checked with its data file.
    onnx.checker.check_model(str(path), full_check=True)
    return details


def data_file_name(temporary: Path) -> str:
    """``.NAME.PID-TOKEN.data`` for the artifact NAME: hidden, and unique to this build.

    Its parts are those of the build's temporary, ``.fuser-tmp-PID-TOKEN-NAME``.
    """
    pid, token, final_name = temporary.name[len(TEMPORARY_PREFIX) :].split("-", 2)
    return f".{final_name}.{pid}-{token}.data"


def _fold_weight_transposes(graph: Any, weights: dict[str, Any]) -> None:
    """Transpose weights here, once, where the graph would transpose them on every call.

    tf2onnx turns a TensorFlow convolution kernel into ONNX's layout with a ``Transpose``
    node, and folds it when the kernel is a constant, but not when it is a graph input as
    here. ONNX Runtime folds it at load only while the result is under 1 GB: a fused
    layer over that would be transposed at every request.
    """
    # The weights of a switched group are read in the branches of an If.
    graphs = list(switch_lib.graphs(graph))
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
    through a ``TensorProto``'s bytes: a fused layer can be one tensor over 2 GB.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    used = {name for each in switch_lib.graphs(graph) for node in each.node for name in node.input}
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


def _convert_to_onnx(ensemble: Built, opset: int) -> tuple:
    """Convert the serving function: frozen, or with the weights as inputs when large.

    Returns:
        ``(model, outputs, inputs, weights)``: the ONNX model, the output and input tensor
        names, and, when the weights exceed ``WEIGHTS_AS_INPUTS_BYTES`` or
        ``EXTERNAL_DATA_BYTES``, the weights as ``{graph input name: array}`` (else
        empty): they are then graph inputs of the model until ``_store_weights`` makes
        them initializers.

    A model with groups fused only up to a batch size (``BatchSwitch``) is converted
    once per form and joined under one ``If`` (``fuser.conversion.switch``), switching at the
    smallest of the groups' limits.
    """
    from runtime.switch import forced

    limit = ensemble.switch_batch
    if limit is None:
        return _convert_once(ensemble, opset)
    with forced("small"):
        small, small_outputs, input_tensors, weights = _convert_once(ensemble, opset)
    with forced("large"):
        large, large_outputs, _, _ = _convert_once(ensemble, opset)
    names = [spec.name for spec in ensemble.outputs]
    model = switch_lib.stitch(
        small,
        large,
        data_inputs=list(input_tensors.values()),
        small_outputs=[small_outputs[name] for name in names],
        large_outputs=[large_outputs[name] for name in names],
        limit=limit,
    )
    return model, small_outputs, input_tensors, weights


def _convert_once(ensemble: Built, opset: int) -> tuple:
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


def _weights_as_inputs(ensemble: Built, tf: Any) -> tuple[Any, dict[str, Any]]:
    """The serving function with every weight an input (``Model.stateless_call``).

    The weights never enter the TensorFlow graph: it stays small whatever the weights
    weigh (one protobuf cannot hold more than 2 GB, and freezing and converting large
    constants costs far more memory and time than the weights). tf2onnx converts a graph
    whose weights are inputs (a convolution kernel it must transpose gets a Transpose
    node, folded by ``_fold_weight_transposes``), and ``_store_weights`` turns those
    inputs into initializers, in the model or beside it.
    """

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


def embed(path: Path, text: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = manifest_lib.ONNX_METADATA_KEY, text
    onnx.save(model, str(path))


def remove_unused_data(path: Path, keep: Sequence[str]) -> None:
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


FORMAT = Format(
    kind="onnx",
    label="an .onnx file",
    suffix=".onnx",
    write=write,
    embed=embed,
    stage="converting",
    placed=lambda path, details: remove_unused_data(path, details.get("external_data", [])),
)
