"""The SavedModel by units: each member's TensorFlow graph traced once, cached, joined.

Saving the fused model with ``tf.saved_model.save`` traces every member again and builds
TensorFlow's object graph, checkpoint functions and signature wrapper around thousands of
variables: about half a minute for five ImageNet architectures, paid again in full when
one member changed, after loading every member to assemble the fused model. So, as for
ONNX (``fuser.conversion.units``), the SavedModel writer works by units:

- a **graph unit** per unit (member or fused group, ``fuser.conversion.unit``): its Keras
  model traced for TensorFlow (grouped convolutions as TensorFlow's own op), kept as a
  GraphDef whose captured variables are named placeholders, with their values; cached
  under the same kind of key as an ONNX unit (``fuser.conversion.cache``), so a rebuild
  traces only the member that changed and loads no other;
- the head, traced the same way from the members' outputs stacked in member order;
- the **join**: one graph in which every unit's nodes are prefixed, its inputs are the
  fused inputs and its variables are variables of the graph, each fused output's member
  values stacked into the head; a ``serving_default`` signature; TensorFlow's V2 saver
  nodes; the variables written with one ``SaveV2``. No Python object per operation or
  variable is made: a few seconds for the five architectures.

The result is a SavedModel in TensorFlow's graph form (a MetaGraph with a signature and a
saver, as ``tf.compat.v1.saved_model`` writes): TensorFlow Serving, ``saved_model_cli``,
``tf.saved_model.load`` and the runtime (through a session) run it as any other. It is
verified against the members like every artifact (``fuser.formats.writer``).

Not by units (``why_whole``; the fused model is saved with ``tf.saved_model.save``):
groups switched on the batch size and the cascade head (control flow between members),
``--xla``, and members holding resources other than variables (lookup tables).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from fuser.built import Built
from fuser.conversion import cache
from fuser.conversion.unit import Unit, units_of
from fuser.conversion.units import head_model, unit_model
from fuser.members.records import write_atomically
from runtime.convolutions import native_grouped_convolutions

_FORMAT = 1  # of a stored graph unit


class NotByUnits(Exception):
    """A unit's graph holds what the join cannot carry (the message says what)."""


@dataclasses.dataclass
class GraphUnit:
    """A traced graph: placeholders for its inputs and captured variables, named outputs."""

    graph: Any  # GraphDef
    inputs: list[str]  # placeholder node names, in the unit's input order
    outputs: dict[str, str]  # output key -> tensor name
    variables: list[tuple[str, np.ndarray]]  # placeholder node name, value


def why_whole(ensemble: Built) -> str | None:
    """Why the SavedModel is saved whole rather than by units, or None."""
    if ensemble.switch_batch is not None:
        return "a group is switched on the batch size"
    if getattr(ensemble.head, "routes", False):
        return "the cascade head routes rows between members"
    if ensemble.xla:
        return "--xla compiles the fused function"
    return None


def trace(model: Any, names: list[str], specs: list[Any]) -> GraphUnit:
    """``model`` (inputs ``names``, a dict of outputs) traced for TensorFlow as a unit.

    Raises:
        NotByUnits: the graph captures a resource that is not a variable.
    """
    import tensorflow as tf

    signature = [
        tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=name)
        for name, spec in zip(names, specs)
    ]

    @tf.function(input_signature=signature)
    def serve(*tensors):
        return model(list(tensors), training=False)

    with native_grouped_convolutions():
        concrete = serve.get_concrete_function()
    graph = concrete.graph.as_graph_def()
    nodes = {node.name: node for node in graph.node}
    by_handle = {id(variable.handle): variable for variable in concrete.variables}
    variables = []
    for external, internal in concrete.graph.captures:
        name = internal.op.name
        variable = by_handle.get(id(external))
        if variable is not None:
            variables.append((name, variable.numpy()))
        elif external.dtype == tf.resource:
            raise NotByUnits(f"its graph captures a resource that is not a variable ({name})")
        else:  # a constant the trace captured: it becomes one in the graph
            _constant(nodes[name], np.asarray(external.numpy()))
    inputs = [tensor.op.name for tensor in concrete.inputs[: len(signature)]]
    outputs = {key: tensor.name for key, tensor in concrete.structured_outputs.items()}
    return GraphUnit(graph, inputs, outputs, variables)


def write(ensemble: Built, path: Path) -> dict[str, Any]:
    """Write ``ensemble``'s SavedModel at ``path`` by units; what was done, for the
    manifest's build record.

    Raises:
        NotByUnits: a unit cannot be joined (nothing is left at ``path``).
    """
    started = time.perf_counter()
    folder = cache.cache_folder(ensemble.conversion)
    units = units_of(ensemble.members, ensemble.wiring, ensemble.fusion)
    found: dict[int, GraphUnit] = {}
    keys: dict[int, str | None] = {}
    for number, unit in enumerate(units):
        keys[number] = None
        if folder is not None:
            keys[number] = cache.key(unit, ensemble.inputs, None, target="savedmodel")
        if keys[number] is not None:
            stored = _cached(folder, keys[number])
            if stored is not None:
                found[number] = stored
    missing = [
        member
        for number, unit in enumerate(units)
        if number not in found
        for member in unit.members
        if member.model is None
    ]
    if missing:
        ensemble.load_recorded(missing, "their SavedModel units are not in the cache")
        units = units_of(ensemble.members, ensemble.wiring, ensemble.fusion)
    graphs, report = [], []
    for number, unit in enumerate(units):
        graph = found.get(number)
        source = "cache"
        if graph is None:
            model, _ = unit_model(unit)
            graph = trace(model, unit.inputs, list(unit.members[0].inputs))
            del model
            source = "this process"
            if keys[number] is not None:
                _store(folder, keys[number], graph)
        graphs.append(graph)
        report.append(
            {
                "members": [member.name for member in unit.members],
                "kind": unit.kind,
                "traced": source,
            }
        )
    model, names, specs = head_model(ensemble)
    head = trace(model, names, specs)
    del model
    join(ensemble, units, graphs, head, path)
    if folder is not None:
        cache.prune(folder)
    return {"by": "units", "seconds": round(time.perf_counter() - started, 2), "units": report}


def join(
    ensemble: Built, units: list[Unit], graphs: list[GraphUnit], head: GraphUnit, path: Path
) -> None:
    """One SavedModel at ``path``: the units' graphs (nodes prefixed ``u<n>/``, inputs the
    fused inputs, variables the graph's), each fused output's member values stacked in
    member order into the head (``head/``), its outputs the ensemble's; a
    ``serving_default`` signature and a V2 saver over every variable."""
    import tensorflow as tf
    from tensorflow.core.framework import graph_pb2
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2, saver_pb2
    from tensorflow.python.framework import meta_graph, versions

    graph = graph_pb2.GraphDef()
    graph.versions.producer = versions.GRAPH_DEF_VERSION
    graph.versions.min_consumer = versions.GRAPH_DEF_VERSION_MIN_CONSUMER
    for spec in ensemble.inputs:
        node = graph.node.add(name=spec.name, op="Placeholder")
        node.attr["dtype"].type = tf.as_dtype(spec.dtype).as_datatype_enum
        node.attr["shape"].shape.CopyFrom(_shape(spec.shape))
    variables: list[tuple[str, np.ndarray]] = []
    outputs: list[dict[str, str]] = []
    for number, (unit, unit_graph) in enumerate(zip(units, graphs)):
        renames = dict(zip(unit_graph.inputs, unit.inputs))
        outputs.append(_take(graph, unit_graph, f"u{number}/", renames, variables))
    index_one = _const(graph, "fuser_join/axis_1", np.array(1, np.int32))
    stacked = {}
    for slot, spec in enumerate(ensemble.wiring.outputs):
        parts, order = [], []
        for number, unit in enumerate(units):
            value = outputs[number][f"out_{slot}"]
            if unit.kind == "member":
                expanded = graph.node.add(
                    name=f"fuser_join/u{number}_{slot}", op="ExpandDims", input=[value, index_one]
                )
                expanded.attr["T"].type = tf.float32.as_datatype_enum
                expanded.attr["Tdim"].type = tf.int32.as_datatype_enum
                value = expanded.name
            parts.append(value)
            order += unit.indices
        if len(parts) == 1:
            (value,) = parts
        else:
            concat = graph.node.add(
                name=f"fuser_join/concat_{slot}", op="ConcatV2", input=[*parts, index_one]
            )
            concat.attr["N"].i = len(parts)
            concat.attr["T"].type = tf.float32.as_datatype_enum
            concat.attr["Tidx"].type = tf.int32.as_datatype_enum
            value = concat.name
        if order != sorted(order):
            indices = _const(
                graph, f"fuser_join/member_order_{slot}", np.argsort(order).astype(np.int32)
            )
            gather = graph.node.add(
                name=f"fuser_join/stacked_{slot}", op="GatherV2", input=[value, indices, index_one]
            )
            for attr in ("Tparams", "Tindices", "Taxis"):
                gather.attr[attr].type = (
                    tf.float32 if attr == "Tparams" else tf.int32
                ).as_datatype_enum
            gather.attr["batch_dims"].i = 0
            value = gather.name
        stacked[f"stacked_{spec.name}"] = value
    renames = {name: stacked[name] for name in head.inputs}
    produced = _take(graph, head, "head/", renames, variables)
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for spec in ensemble.inputs:
        info = signature.inputs[spec.name]
        info.name = f"{spec.name}:0"
        info.dtype = tf.as_dtype(spec.dtype).as_datatype_enum
        info.tensor_shape.CopyFrom(_shape(spec.shape))
    for spec in ensemble.outputs:
        node = graph.node.add(name=f"outputs/{spec.name}", op="Identity")
        node.input.append(produced[spec.name])
        node.attr["T"].type = tf.float32.as_datatype_enum
        info = signature.outputs[spec.name]
        info.name = f"{node.name}:0"
        info.dtype = tf.float32.as_datatype_enum
        info.tensor_shape.CopyFrom(_shape(spec.shape))
    saver = _saver(graph, variables)
    meta = meta_graph_pb2.MetaGraphDef()
    meta.meta_info_def.tags.append("serve")
    meta.meta_info_def.tensorflow_version = tf.version.VERSION
    meta.meta_info_def.tensorflow_git_version = tf.version.GIT_VERSION
    meta.meta_info_def.stripped_op_list.CopyFrom(meta_graph.stripped_op_list_for_graph(graph))
    meta.graph_def.CopyFrom(graph)
    if saver is not None:
        meta.saver_def.CopyFrom(saver_pb2.SaverDef(**saver))
    meta.signature_def["serving_default"].CopyFrom(signature)
    saved = saved_model_pb2.SavedModel(saved_model_schema_version=1, meta_graphs=[meta])
    path.mkdir()
    (path / "variables").mkdir()
    if variables:
        tf.raw_ops.SaveV2(
            prefix=str(path / "variables" / "variables"),
            tensor_names=[name for name, _ in variables],
            shape_and_slices=[""] * len(variables),
            tensors=[value for _, value in variables],
        )
    (path / "saved_model.pb").write_bytes(saved.SerializeToString())


def _take(
    graph: Any,
    unit: GraphUnit,
    prefix: str,
    renames: dict[str, str],
    variables: list[tuple[str, np.ndarray]],
) -> dict[str, str]:
    """Add ``unit``'s nodes and functions to ``graph`` under ``prefix``: its input
    placeholders become the tensors ``renames`` names, its variable placeholders
    variables (appended to ``variables``). Returns its outputs' tensor names in ``graph``."""
    tag = re.sub(r"[^A-Za-z0-9_]", "_", prefix.rstrip("/"))
    functions = {
        function.signature.name: f"{function.signature.name}_{tag}"
        for function in unit.graph.library.function
    }
    values = dict(unit.variables)

    def name_of(reference: str) -> str:
        control = reference.startswith("^")
        node, _, port = reference.lstrip("^").partition(":")
        node = renames.get(node, prefix + node)
        return ("^" if control else "") + node + (f":{port}" if port else "")

    for original in unit.graph.node:
        if original.name in renames:
            continue
        node = graph.node.add()
        node.CopyFrom(original)
        node.name = prefix + original.name
        node.input[:] = [name_of(reference) for reference in original.input]
        if "_class" in node.attr:
            del node.attr["_class"]  # colocation with nodes by their unprefixed names
        if original.name in values:
            _variable(node, values[original.name])
            variables.append((node.name, values[original.name]))
        _rename_functions(node, functions)
    for original in unit.graph.library.function:
        function = graph.library.function.add()
        function.CopyFrom(original)
        function.signature.name = functions[original.signature.name]
        for node in function.node_def:
            _rename_functions(node, functions)
    for gradient in unit.graph.library.gradient:
        if gradient.function_name in functions and gradient.gradient_func in functions:
            graph.library.gradient.add(
                function_name=functions[gradient.function_name],
                gradient_func=functions[gradient.gradient_func],
            )
    return {key: name_of(tensor) for key, tensor in unit.outputs.items()}


def _rename_functions(node: Any, functions: dict[str, str]) -> None:
    """Point a node's calls and function attributes at the renamed functions."""
    if not functions:
        return
    if node.op in functions:
        node.op = functions[node.op]
    for attr in node.attr.values():
        if attr.HasField("func") and attr.func.name in functions:
            attr.func.name = functions[attr.func.name]
        elif attr.HasField("list"):
            for function in attr.list.func:
                if function.name in functions:
                    function.name = functions[function.name]


def _variable(node: Any, value: np.ndarray) -> None:
    """Make a captured variable's placeholder the variable itself (a ``VarHandleOp``)."""
    import tensorflow as tf

    node.op = "VarHandleOp"
    del node.input[:]
    node.ClearField("attr")
    node.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
    node.attr["shape"].shape.CopyFrom(_shape(value.shape))
    node.attr["shared_name"].s = node.name.encode()
    node.attr["container"].s = b""


def _constant(node: Any, value: np.ndarray) -> None:
    """Make a captured constant's placeholder a ``Const`` holding it."""
    import tensorflow as tf

    node.op = "Const"
    del node.input[:]
    node.ClearField("attr")
    node.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))


def _const(graph: Any, name: str, value: np.ndarray) -> str:
    node = graph.node.add(name=name)
    _constant(node, value)
    return name


def _shape(shape: Any) -> Any:
    from tensorflow.core.framework import tensor_shape_pb2

    proto = tensor_shape_pb2.TensorShapeProto()
    for size in shape:
        proto.dim.add(size=-1 if size is None else int(size))
    return proto


def _saver(graph: Any, variables: list[tuple[str, np.ndarray]]) -> dict[str, Any] | None:
    """TensorFlow's V2 saver over ``variables`` (checkpoint keys: their node names), as
    ``tf.compat.v1.train.Saver`` builds it: what TensorFlow Serving restores them with."""
    import tensorflow as tf

    if not variables:
        return None
    filename = _const(graph, "save/Const", np.array(b"model", dtype=object))
    names = _const(graph, "save/tensor_names", np.array([n.encode() for n, _ in variables], object))
    slices = _const(graph, "save/shape_and_slices", np.array([b""] * len(variables), object))
    dtypes = [tf.as_dtype(value.dtype).as_datatype_enum for _, value in variables]
    reads = []
    for number, (name, _) in enumerate(variables):
        read = graph.node.add(name=f"save/read_{number}", op="ReadVariableOp", input=[name])
        read.attr["dtype"].type = dtypes[number]
        reads.append(read.name)
    save = graph.node.add(name="save/SaveV2", op="SaveV2", input=[filename, names, slices, *reads])
    save.attr["dtypes"].list.type.extend(dtypes)
    done = graph.node.add(
        name="save/control_dependency", op="Identity", input=[filename, "^save/SaveV2"]
    )
    done.attr["T"].type = tf.string.as_datatype_enum
    restore = graph.node.add(name="save/RestoreV2", op="RestoreV2", input=[filename, names, slices])
    restore.attr["dtypes"].list.type.extend(dtypes)
    assigns = []
    for number, (name, _) in enumerate(variables):
        assign = graph.node.add(
            name=f"save/assign_{number}",
            op="AssignVariableOp",
            input=[name, f"save/RestoreV2:{number}"],
        )
        assign.attr["dtype"].type = dtypes[number]
        assigns.append(f"^{assign.name}")
    graph.node.add(name="save/restore_all", op="NoOp", input=assigns)
    return {
        "filename_tensor_name": "save/Const:0",
        "save_tensor_name": "save/control_dependency:0",
        "restore_op_name": "save/restore_all",
        "max_to_keep": 5,
        "keep_checkpoint_every_n_hours": 10000.0,
        "version": 2,  # SaverDef.V2
    }


def _store(folder: Path, key: str, unit: GraphUnit) -> None:
    """Keep a traced unit in the cache: its GraphDef, names and variable values in one
    ``.npz``; a cache that cannot be written is skipped."""
    meta = {
        "format": _FORMAT,
        "inputs": unit.inputs,
        "outputs": unit.outputs,
        "variables": [name for name, _ in unit.variables],
    }
    arrays = {f"v{number}": value for number, (_, value) in enumerate(unit.variables)}
    buffer = io.BytesIO()
    np.savez(
        buffer,
        graph=np.frombuffer(unit.graph.SerializeToString(), np.uint8),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        **arrays,
    )
    try:
        write_atomically(folder / cache.UNITS / f"{key}.npz", buffer.getvalue())
    except OSError:
        return


def _cached(folder: Path, key: str) -> GraphUnit | None:
    """A unit from the cache, or None (missing or damaged: traced again)."""
    import os

    from tensorflow.core.framework import graph_pb2

    path = folder / cache.UNITS / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(stored["meta"].tobytes())
            if meta.get("format") != _FORMAT:
                return None
            graph = graph_pb2.GraphDef.FromString(stored["graph"].tobytes())
            variables = [
                (name, stored[f"v{number}"]) for number, name in enumerate(meta["variables"])
            ]
        os.utime(path)  # recently used: pruned last
    except Exception:
        return None
    return GraphUnit(graph, list(meta["inputs"]), dict(meta["outputs"]), variables)
