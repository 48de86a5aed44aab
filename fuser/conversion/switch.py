"""Two converted ONNX graphs of one model, joined under one ``If`` on the batch size.

A fused model with a ``BatchSwitch`` (``runtime.switch``) converts with tf2onnx to an
``If`` whose branches tf2onnx leaves unoptimized: batch normalizations not folded,
layout transposes not cancelled, so each branch ran measurably slower than the same
graph alone (docs/architecture.md has the figures). So the ONNX writer converts the
model twice, every switch forced to one form (each conversion fully optimized), and
``stitch`` puts the two graphs under one ``If``: both branches then run as fast as
alone, and the ``If`` itself costs microseconds per call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def stitch(
    small: Any,
    large: Any,
    *,
    data_inputs: Sequence[str],
    small_outputs: Sequence[str],
    large_outputs: Sequence[str],
    limit: int,
) -> Any:
    """One model: ``small`` for batches of at most ``limit`` rows, else ``large``.

    Both models take the graph inputs ``data_inputs`` (the first one's first dimension
    is the batch) and possibly weights as further inputs (the large-ensemble conversion);
    ``small_outputs`` and ``large_outputs`` name the same outputs in each, in the same
    order. The result's outputs carry ``small``'s names. Initializers that are equal in
    both are stored once, outside the branches; the others inside theirs.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    def key(tensor: Any) -> tuple:
        content = tensor.raw_data if tensor.HasField("raw_data") else tensor.SerializeToString()
        return (tensor.data_type, tuple(tensor.dims), content)

    # Tensors in both graphs (members outside the switched groups) are stored once, in
    # the outer graph; the rest stay inside their branch. Every outer value a branch
    # reads is an implicit input of the If, which ONNX Runtime hands over at every call,
    # so keeping tensors inside their branch makes the switch cheaper. (Weights converted
    # as graph inputs, for large models, are outside whatever happens; next to the work
    # of such a model the hand-over is noise.)
    keys = {id(model): [key(t) for t in model.graph.initializer] for model in (small, large)}
    shared_keys = set(keys[id(small)]) & set(keys[id(large)])
    shared: dict[tuple, Any] = {}  # content -> the one tensor kept outside

    def branch(model: Any, tag: str, outputs: Sequence[str]) -> Any:
        graph = onnx.GraphProto()
        graph.CopyFrom(model.graph)
        graph.name = f"fuser_{tag}_batches"
        renames = {}
        outside = []
        for index, (tensor, content) in enumerate(zip(graph.initializer, keys[id(model)])):
            if content not in shared_keys:
                renamed = f"{tag}/{tensor.name}"
                renames[tensor.name] = renamed
                tensor.name = renamed  # stays inside the branch
                continue
            if content not in shared:
                shared[content] = onnx.TensorProto()
                shared[content].CopyFrom(tensor)
                shared[content].name = f"shared/{tensor.name}"
            renames[tensor.name] = shared[content].name
            outside.append(index)
        for index in reversed(outside):
            del graph.initializer[index]
        for each in graphs(graph):
            produced = [output for node in each.node for output in node.output]
            if each is not graph:  # a nested graph's own inputs and constants
                produced += [value.name for value in [*each.input, *each.initializer]]
            renames.update({name: f"{tag}/{name}" for name in produced if name})
        for each in graphs(graph):
            for node in each.node:
                node.name = f"{tag}/{node.name}"
                node.input[:] = [renames.get(name, name) for name in node.input]
                node.output[:] = [renames.get(name, name) for name in node.output]
            if each is not graph:
                for value in [*each.input, *each.output, *each.initializer]:
                    value.name = renames.get(value.name, value.name)
        by_name = {value.name: value for value in graph.output}
        results = []
        for name in outputs:
            value = onnx.ValueInfoProto()
            value.CopyFrom(by_name[name])
            value.name = renames.get(name, name)
            results.append(value)
        del graph.input[:], graph.output[:], graph.value_info[:]
        graph.output.extend(results)
        return graph

    then_branch = branch(small, "small", small_outputs)
    else_branch = branch(large, "large", large_outputs)
    inputs = {value.name: value for value in small.graph.input}
    for value in large.graph.input:
        inputs.setdefault(value.name, value)
    order = [*data_inputs, *(name for name in inputs if name not in data_inputs)]
    by_name = {value.name: value for value in small.graph.output}
    nodes = [
        helper.make_node("Shape", [data_inputs[0]], ["fuser_switch/shape"]),
        helper.make_node(
            "Gather", ["fuser_switch/shape", "fuser_switch/zero"], ["fuser_switch/batch"]
        ),
        helper.make_node(
            "LessOrEqual", ["fuser_switch/batch", "fuser_switch/limit"], ["fuser_switch/small"]
        ),
        helper.make_node(
            "If",
            ["fuser_switch/small"],
            list(small_outputs),
            name="fuser_switch",
            then_branch=then_branch,
            else_branch=else_branch,
        ),
    ]
    constants = [
        numpy_helper.from_array(np.array(0, np.int64), "fuser_switch/zero"),
        numpy_helper.from_array(np.array(limit, np.int64), "fuser_switch/limit"),
    ]
    graph = helper.make_graph(
        nodes,
        small.graph.name,
        [inputs[name] for name in order],
        [by_name[name] for name in small_outputs],
        [*constants, *shared.values()],
    )
    versions: dict[str, int] = {}
    for entry in [*small.opset_import, *large.opset_import]:
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in versions.items()]
    )
    model.ir_version = max(small.ir_version, large.ir_version)
    return model


def graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph in it (the branches of ``If`` nodes), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from graphs(subgraph)
