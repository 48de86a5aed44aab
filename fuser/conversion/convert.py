"""TensorFlow to ONNX: the one conversion the artifact writer and ``--fusion auto``'s timing share.

``to_onnx(concrete, input_names, opset)`` freezes a traced ``tf.function``
and converts it with tf2onnx. What it does beyond ``tf2onnx.convert.from_graph_def``, and
why (each found on real members; docs/building.md, "Real members"):

- **Loops stay loops.** ``convert_variables_to_constants_v2`` lowers every control-flow op
  to Enter/Exit/Merge/Switch by default; tf2onnx cannot convert the TensorList ops of a
  lowered ``While`` (every Keras 3 ``LSTM``, ``GRU``, ``SimpleRNN``, ``Bidirectional``:
  "No Op registered for TensorListReserve"). Here ``While`` loops stay functional (tf2onnx
  makes them an ONNX ``LSTM`` or ``Loop``) while conditionals are lowered as before: an
  unlowered ``cond`` whose branches hold convolutions becomes an ``If`` that ONNX Runtime
  refuses.
- **Exact GELU.** TensorFlow computes ``gelu(approximate=False)`` with ``Erfc``, which
  tf2onnx 1.17 cannot convert at any opset; it is given as ``1 + Erf(-z)``.
- **No copy per optimizer** (tf2onnx 1.17): ``from_graph_def`` deep-copies the whole graph,
  constants included, before every optimizer on every pass, so that a failing one can be
  skipped, and imports the graph once more into a session whose result it discards. Here
  the optimizers run in place; if one fails the conversion is redone as tf2onnx does it.
  Each node's protobuf is rebuilt fresh when tf2onnx rewrites it (with protobuf's upb
  backend the old contents stayed in memory: about the weights' size per optimizer call).
  And the Transpose optimizer no longer crashes on a convolution followed by the addition
  of a scalar (MobileNetV3's ``x + 3``), which made tf2onnx drop that whole pass and keep
  every layout Transpose. Measured on three ImageNet architectures at 64 px: 21 s and
  7.1 GB before, 5.9 s and 3.8 GB after, 722 nodes instead of 1,063.
- **The model is let go before converting.** Once a unit is frozen, the Keras model, its
  weights and the traced and frozen functions are released (``built_to_onnx``: a worker
  loads its member inside the function that builds the unit): tf2onnx's peak then holds
  the GraphDef alone. ResNet50V2 at 96 px in one worker: 2,704 MB before, 2,114 MB after.
- **Nothing unconverted passes.** tf2onnx leaves ops it cannot convert in the graph and
  lets the ONNX checker fail later; here such ops are named, with the member they belong
  to, in one ``FuseError``.

Other tf2onnx versions take ``from_graph_def`` with the Erfc handler.
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from fuser._tf import python_logs_quiet
from fuser.conversion.switch import graphs
from fuser.errors import FuseError
from runtime.convolutions import native_grouped_convolutions

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 19)  # what tf2onnx 1.17 converts to
_LOOPS = ("While", "StatelessWhile")
_LOCK = threading.Lock()  # the conversion swaps module attributes of TensorFlow and tf2onnx


def to_onnx(
    concrete: Any,
    input_names: Sequence[str],
    opset: int,
    *,
    members: Sequence[str] = (),
    owner: str = "the head",
) -> tuple[Any, list[str]]:
    """Freeze ``concrete`` (a traced ``tf.function``) and convert it to an ONNX model.

    ``input_names`` are tensor names of the graph (``x:0``). Returns the model and the
    names of its outputs: the frozen function's outputs, flat, in ``tf.nest`` order.
    ``members`` (their names) let an unconvertible operation be traced to its member;
    ``owner`` names whoever holds the nodes no member's name is found in.

    Raises:
        FuseError: the graph holds operations no ONNX opset has (they are named).
    """
    with _LOCK, _python_logs_quiet():
        graph_def, output_names = _frozen_graph(concrete)
        model = _convert(graph_def, list(input_names), output_names, opset)
    check_operations(model, members, owner)
    return model, output_names


def keras_to_onnx(
    model: Any,
    names: Sequence[str],
    specs: Sequence[Any],
    opset: int,
    *,
    owner: str = "the head",
) -> tuple[Any, list[str]]:
    """A Keras model traced for ONNX (grouped convolutions bare), frozen and converted.

    Its inputs are named ``names`` (``specs`` give their shapes and dtypes); its outputs
    keep the keys of a dict of outputs, or are ``output_0``, ``output_1``... for a list.
    ``owner`` is what an operation ONNX lacks is said to be in (``member "a"``).
    Returns the ONNX model and its output names.
    """
    return built_to_onnx(lambda: model, names, specs, opset, owner=owner)


def built_to_onnx(
    build: Callable[[], Any],
    names: Sequence[str],
    specs: Sequence[Any],
    opset: int,
    *,
    owner: str = "the head",
) -> tuple[Any, list[str]]:
    """``keras_to_onnx`` of the model ``build()`` returns. Once frozen, the model, its
    weights and the traced function are released before the conversion (which holds the
    frozen constants several times over) unless the caller keeps the model: a conversion
    worker, which loads its member in ``build``, peaks about 190 MB lower for 94 MB of
    weights."""
    import gc

    import tensorflow as tf

    with _LOCK, _python_logs_quiet():
        graph_def, outputs, keys = _frozen_keras(build, names, specs)
        gc.collect()  # Keras models hold reference cycles: free the weights now
        converted = _convert(graph_def, [f"{name}:0" for name in names], outputs, opset)
        del graph_def
    check_operations(converted, owner=owner)
    # The frozen function's outputs are flat, in tf.nest order (dict keys sorted).
    flat = tf.nest.flatten({name: name for name in keys})
    renames = dict(zip(outputs, flat))
    renames.update({f"{name}:0": name for name in names})
    rename(converted.graph, renames)
    return converted, [renames[name] for name in outputs]


def rename(graph: Any, renames: dict[str, str]) -> None:
    """Rename values everywhere in ``graph`` and its subgraphs (they read the outer
    graph's values by name)."""
    for each in graphs(graph):
        for value in [*each.input, *each.output, *each.value_info]:
            value.name = renames.get(value.name, value.name)
        for node in each.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
            node.output[:] = [renames.get(name, name) for name in node.output]


def _frozen_keras(
    build: Callable[[], Any], names: Sequence[str], specs: Sequence[Any]
) -> tuple[Any, list[str], list[str]]:
    """The frozen GraphDef of ``build()`` traced for ONNX, its output tensor names and the
    keys of its outputs; nothing of the model stays referenced from here."""
    import tensorflow as tf

    signature = [
        tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=name)
        for name, spec in zip(names, specs)
    ]
    model = build()

    @tf.function(input_signature=signature)
    def serve(*tensors):
        outputs = model(list(tensors), training=False)
        if isinstance(outputs, dict):
            return outputs
        return {f"output_{index}": value for index, value in enumerate(tf.nest.flatten(outputs))}

    with native_grouped_convolutions("onnx"):
        concrete = serve.get_concrete_function()
    graph_def, outputs = _frozen_graph(concrete)
    return graph_def, outputs, list(concrete.structured_outputs)


def _frozen_graph(concrete: Any) -> tuple[Any, list[str]]:
    """``concrete`` frozen, as a GraphDef, and its output tensor names (the frozen function
    itself is let go: it holds the constants once more)."""
    frozen = freeze(concrete)
    return frozen.graph.as_graph_def(), [tensor.name for tensor in frozen.outputs]


def freeze(concrete: Any) -> Any:
    """``convert_variables_to_constants_v2(concrete)`` with ``While`` loops left functional."""
    from tensorflow.python.framework import convert_to_constants

    lower = getattr(convert_to_constants, "disable_lower_using_switch_merge", None)
    if lower is None:  # another TensorFlow: lower everything, as it does by default
        return convert_to_constants.convert_variables_to_constants_v2(concrete)

    def loops_only(graph_def: Any) -> Any:
        from tensorflow.core.framework import graph_pb2

        copy = graph_pb2.GraphDef()
        copy.CopyFrom(graph_def)
        nodes = [*copy.node, *(node for f in copy.library.function for node in f.node_def)]
        for node in nodes:
            if node.op in _LOOPS:
                node.attr["_lower_using_switch_merge"].b = False
        return copy

    convert_to_constants.disable_lower_using_switch_merge = loops_only
    try:
        return convert_to_constants.convert_variables_to_constants_v2(
            concrete, lower_control_flow=False
        )
    finally:
        convert_to_constants.disable_lower_using_switch_merge = lower


def _erfc(ctx: Any, node: Any, name: str, args: Any) -> None:
    """tf2onnx handler: ``Erfc(z)`` becomes ``Add(1, Erf(Neg(z)))``."""
    from tf2onnx import utils

    value = node.input[0]
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(value))
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    negated = ctx.make_node("Neg", [value], name=utils.make_name(f"{node.name}_neg"))
    erf = ctx.make_node("Erf", [negated.output[0]], name=utils.make_name(f"{node.name}_erf"))
    node.type = "Add"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


HANDLERS = {"Erfc": (_erfc, [])}


def _convert(graph_def: Any, input_names: list[str], output_names: list[str], opset: int) -> Any:
    import tf2onnx

    if not tf2onnx.__version__.startswith("1.17."):
        model, _ = tf2onnx.convert.from_graph_def(
            graph_def,
            input_names=input_names,
            output_names=output_names,
            opset=opset,
            custom_op_handlers=dict(HANDLERS),
        )
        return model
    import tensorflow as tf
    from tf2onnx import optimizer, tf_loader
    from tf2onnx.tfonnx import process_tf_graph

    with tf.device("/cpu:0"), tf.Graph().as_default():
        graph_def = tf_loader.tf_optimize(input_names, output_names, graph_def)

    def process() -> Any:
        tf.import_graph_def(graph_def, name="")
        return process_tf_graph(
            tf.compat.v1.get_default_graph(),
            continue_on_error=True,
            opset=opset,
            custom_op_handlers=dict(HANDLERS),
            input_names=input_names,
            output_names=output_names,
        )

    with _fresh_node_protos():
        with tf.Graph().as_default():
            graph = process()
        try:
            with tf.Graph().as_default():
                graph = optimizer.optimize_graph(graph, False, optimizers=_optimizers())
        except Exception:  # an optimizer failed: redo it tf2onnx's way, skipping that one
            with tf.Graph().as_default():
                graph = optimizer.optimize_graph(process(), True, optimizers=_optimizers())
        return graph.make_model("converted by fuser")


def _optimizers() -> collections.OrderedDict:
    """tf2onnx's optimizers, its Transpose optimizer fixed for scalar additions."""
    from tf2onnx import optimizer
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    class TransposeOptimizerForScalars(TransposeOptimizer):
        def _add_handler(self, trans: Any, node: Any) -> Any:
            # tf2onnx 1.17 takes max() of a constant's shape to merge it as a Conv bias:
            # a scalar has none. Such an addition just lets the Transpose through.
            constant = node.inputs[1]
            if constant.is_const() and constant.get_tensor_value(as_list=False).ndim == 0:
                return self._handle_node_having_branches(trans, node)
            return super()._add_handler(trans, node)

    optimizers = collections.OrderedDict(optimizer._get_optimizers())
    optimizers["optimize_transpose"] = TransposeOptimizerForScalars
    return optimizers


@contextlib.contextmanager
def _fresh_node_protos() -> Iterator[None]:
    """Within this block tf2onnx rebuilds a node's NodeProto instead of clearing it: with
    protobuf's upb backend a cleared message keeps its old contents (a constant's tensor)
    in its arena, so memory grew by the weights at every optimizer call."""
    from onnx import NodeProto
    from tf2onnx import graph as tf2onnx_graph

    original = tf2onnx_graph.Node.update_proto

    def update_proto(self: Any, external_tensor_storage: Any = None) -> Any:
        old = self._op
        fresh = NodeProto(name=old.name, op_type=old.op_type, domain=old.domain)
        if old.doc_string:
            fresh.doc_string = old.doc_string
        self._op = fresh
        return original(self, external_tensor_storage)

    tf2onnx_graph.Node.update_proto = update_proto
    try:
        yield
    finally:
        tf2onnx_graph.Node.update_proto = original


@contextlib.contextmanager
def _python_logs_quiet() -> Iterator[None]:
    import logging

    # tf2onnx logs a traceback for every node it cannot convert; check_operations says it
    # in one sentence instead.
    with python_logs_quiet("tensorflow", "tf2onnx", level=logging.CRITICAL):
        yield


def check_operations(model: Any, members: Sequence[str] = (), owner: str = "the head") -> None:
    """Refuse a converted model holding operations no ONNX opset defines, naming each
    TensorFlow op and the member (or fused group) whose graph holds it."""
    import onnx

    found: dict[str, set[str]] = {}
    for graph in graphs(model.graph):
        for node in graph.node:
            if node.domain in ("", "ai.onnx", "ai.onnx.ml") and not onnx.defs.has(
                node.op_type, node.domain
            ):
                found.setdefault(node.op_type, set()).add(_owner(node.name, members, owner))
    if found:
        problems = [
            f"The TensorFlow operation {op} (in {', '.join(sorted(owners))}) has no ONNX "
            "equivalent that tf2onnx can convert; write a SavedModel or .keras artifact "
            "instead, or replace that layer in the member."
            for op, owners in sorted(found.items())
        ]
        raise FuseError(problems)


def _owner(node_name: str, members: Sequence[str], default: str) -> str:
    """Who a node belongs to, from its name: TensorFlow scopes nodes by the Keras layers
    they come from (``member_<name>``, with a ``_1`` TensorFlow may append; ``fused<N>_``
    for a fused group)."""
    for name in sorted(members, key=len, reverse=True):
        if re.search(rf"(?:^|/)member_{re.escape(name)}(?:_\d+)?/", node_name):
            return f'member "{name}"'
    group = re.search(r"(?:^|/)(fused\d+)_", node_name)
    if group:
        return f"fused group {group.group(1)}"
    return default
