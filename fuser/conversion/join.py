"""Joining converted units under the head into one ONNX model."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fuser.built import Built
from fuser.conversion.convert import rename
from fuser.conversion.unit import Unit


def _content(tensor: Any) -> tuple:
    """What makes two initializers equal: type, shape and a digest of the values."""
    if tensor.HasField("raw_data"):
        values = tensor.raw_data
    else:
        import onnx

        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = ""
        values = copy.SerializeToString(deterministic=True)
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(values).digest()


def join(ensemble: Built, units: list[Unit], head: Any) -> Any:
    """One ONNX model: the units (names prefixed, inputs shared), each fused output's
    member values stacked in member order into the head, the head's outputs named as the
    ensemble's."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.compose import add_prefix_graph

    nodes: list[Any] = []
    initializers: list[Any] = []
    seen: dict[tuple, str] = {}

    def take(graph: Any, prefix: str, *, rename_inputs: bool) -> Any:
        prefixed = add_prefix_graph(
            graph, prefix, rename_inputs=rename_inputs, rename_outputs=True, inplace=False
        )
        duplicate: dict[str, str] = {}
        for tensor in prefixed.initializer:
            content = _content(tensor)
            if content in seen:
                duplicate[tensor.name] = seen[content]
            else:
                seen[content] = tensor.name
                initializers.append(tensor)
        if duplicate:
            rename(prefixed, duplicate)
        nodes.extend(prefixed.node)
        return prefixed

    for number, unit in enumerate(units):
        take(unit.model.graph, f"u{number}/", rename_inputs=False)
    axis = numpy_helper.from_array(np.array([1], np.int64), "fuser_join/axis_1")
    if any(unit.kind == "member" for unit in units):
        initializers.append(axis)
    for slot, spec in enumerate(ensemble.wiring.outputs):
        parts, order = [], []
        for number, unit in enumerate(units):
            value = f"u{number}/out_{slot}"
            if unit.kind == "member":
                expanded = f"fuser_join/u{number}_{slot}"
                nodes.append(
                    helper.make_node(
                        "Unsqueeze", [value, axis.name], [expanded], name=f"{expanded}/unsqueeze"
                    )
                )
                value = expanded
            parts.append(value)
            order += unit.indices
        stacked = f"head/stacked_{spec.name}"
        joined = stacked if order == sorted(order) else f"fuser_join/concat_{slot}"
        nodes.append(
            helper.make_node("Concat", parts, [joined], axis=1, name=f"fuser_join/concat_{slot}")
        )
        if joined != stacked:
            inverse = numpy_helper.from_array(
                np.argsort(order).astype(np.int64), f"fuser_join/member_order_{slot}"
            )
            initializers.append(inverse)
            nodes.append(
                helper.make_node(
                    "Gather", [joined, inverse.name], [stacked], axis=1, name=f"{stacked}/order"
                )
            )
    head_graph = take(head.graph, "head/", rename_inputs=True)
    head_outputs = {value.name: value for value in head_graph.output}
    produced = {name for node in head_graph.node for name in node.output}
    outputs, renames = [], {}
    for spec in ensemble.outputs:
        source = f"head/{spec.name}"
        value = onnx.ValueInfoProto()
        value.CopyFrom(head_outputs[source])
        value.name = spec.name
        outputs.append(value)
        if source in produced:  # the head's node writes the output under its own name
            renames[source] = spec.name
        else:  # a head input passed through: it needs a node of its own
            nodes.append(
                helper.make_node("Identity", [source], [spec.name], name=f"out/{spec.name}")
            )
    inputs = {}
    for unit in units:
        for value in unit.model.graph.input:
            if value.name in unit.inputs and value.name not in inputs:
                inputs[value.name] = value
    graph = helper.make_graph(
        nodes,
        "fused_ensemble",
        [inputs[spec.name] for spec in ensemble.inputs],
        outputs,
        initializers,
    )
    rename(graph, renames)
    opsets: dict[str, int] = {}
    for model in [*(unit.model for unit in units), head]:
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(domain, v) for domain, v in opsets.items()]
    )
    model.ir_version = max(unit.model.ir_version for unit in units)
    model.ir_version = max(model.ir_version, head.ir_version)
    return model
