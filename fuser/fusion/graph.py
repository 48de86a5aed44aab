"""Reading a member's graph for horizontal fusion: its steps and its architecture signature.

Members trained from the same code (different seeds, data slices) have isomorphic graphs:
the same layers, configs and connections; only names and weights differ. ``trace`` reads a
functional member's graph as steps, checks each against the registry of lowerings
(``fuser.fusion.lowerings``) and computes a signature that is equal exactly for members
that can be fused together. A keras.ops call's constants (``1.0`` in ``x + 1.0``) are part
of the signature, so members computing ``x + 1.0`` and ``x + 2.0`` never group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fuser.fusion.lowerings import ACTIVATIONS, LAYERS, OPERATIONS
from fuser.fusion.steps import Graph, OpStep, Slot, Step, Unsupported, activation_name, op_label
from fuser.members import Member

# Config keys that hold weights rather than architecture.
_WEIGHT_CONFIG_KEYS = {"Normalization": ("mean", "variance")}


def trace(member: Member) -> Graph:
    """The member's graph, or ``Unsupported`` naming the layer that prevents fusion."""
    if member.format == "savedmodel":
        raise Unsupported(
            f"{member.describe()} is a SavedModel; its layers are not visible, only its signature."
        )
    model = member.model
    functional = getattr(model, "_functional", None) or model
    if not hasattr(functional, "_nodes_by_depth"):
        raise Unsupported(f"{member.describe()} is a subclassed model; its graph is not visible.")
    positions: dict[int, tuple[str, int, int]] = {
        id(tensor): ("input", index, 0) for index, tensor in enumerate(functional.inputs)
    }
    for spec in member.inputs:
        if spec.dtype != "float32":
            raise Unsupported(
                f"{member.describe()} takes input {spec.name!r} of dtype {spec.dtype}; "
                "fusion supports float32 inputs."
            )
        if any(dim is None for dim in spec.shape[1:]):
            raise Unsupported(
                f"{member.describe()} takes input {spec.name!r} of shape {spec.shape}; "
                "fusion needs every dimension but the batch fixed."
            )
    import keras

    steps: list[Step] = []
    signature: list[Any] = []
    of_member = member.describe()[:1].lower() + member.describe()[1:]
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.is_input or node.operation is None:
                continue
            if isinstance(node.operation, keras.layers.Layer):
                step, entry = _trace_layer(node, positions, of_member)
            else:
                step, entry = _trace_operation(node, positions, of_member)
            for index, tensor in enumerate(node.outputs):
                positions[id(tensor)] = ("step", len(steps), index)
            steps.append(step)
            signature.append(entry)
    graph_outputs = []
    for tensor in functional.outputs:
        if id(tensor) not in positions:
            raise Unsupported(f"{member.describe()} has an output outside its layer graph.")
        graph_outputs.append(positions[id(tensor)])
    if len(graph_outputs) != len(member.outputs):
        raise Unsupported(f"{member.describe()} has nested outputs.")
    return Graph(steps, graph_outputs, (tuple(signature), tuple(graph_outputs)))


def _inbound(node: Any, positions: dict[int, tuple[str, int, int]], where: str) -> tuple:
    """Where the node's tensor arguments come from (earlier steps or the inputs)."""
    tensors = node.arguments.keras_tensors
    if any(id(tensor) not in positions for tensor in tensors):
        raise Unsupported(f"{where} reads a tensor from outside the model.")
    return tuple(positions[id(tensor)] for tensor in tensors)


def _trace_layer(node: Any, positions: dict, of_member: str) -> tuple[Step, Any]:
    """A layer call as a step and its signature entry, or ``Unsupported`` naming the layer."""
    layer = node.operation
    kind = type(layer).__name__
    where = f"layer {layer.name!r} ({kind}) of {of_member}"
    entry = LAYERS.get(kind)
    if entry is None or not type(layer).__module__.startswith("keras."):
        raise Unsupported(f"{where} has no fused lowering.")
    inbound = _inbound(node, positions, where)
    extra = sorted(set(node.arguments.kwargs) - {"training", "mask"})
    if extra:
        raise Unsupported(f"{where} is called with arguments {', '.join(extra)}.")
    config = layer.get_config()
    dtype = getattr(layer, "compute_dtype", "float32")
    if dtype != "float32":
        raise Unsupported(f"{where} computes in {dtype}; fusion supports float32.")
    if config.get("data_format", "channels_last") != "channels_last":
        raise Unsupported(f"{where} uses data_format={config['data_format']!r}.")
    if "activation" in config and activation_name(config["activation"]) not in ACTIVATIONS:
        raise Unsupported(f"{where} uses the activation {activation_name(config['activation'])!r}.")
    if entry.check is not None:
        entry.check(layer, where)
    signature = (kind, _architecture(layer), _weight_shapes(layer), inbound)
    return Step(layer, inbound), signature


def _trace_operation(node: Any, positions: dict, of_member: str) -> tuple[OpStep, Any]:
    """A keras.ops call as a step and its signature entry, or ``Unsupported`` naming it."""
    import keras

    op = node.operation
    kind = type(op).__name__
    where = f"operation {op.name!r} ({op_label(op)}) of {of_member}"
    entry = OPERATIONS.get(kind)
    if entry is None or not type(op).__module__.startswith("keras.src.ops."):
        raise Unsupported(f"{where} is a tensor operation (not a layer) without a fused lowering.")
    inbound = _inbound(node, positions, where)
    tensors = node.arguments.keras_tensors
    for tensor in [*tensors, *node.outputs]:
        if str(tensor.dtype) != "float32":
            raise Unsupported(f"{where} computes in {tensor.dtype}; fusion supports float32.")
    slots = {id(tensor): Slot(index) for index, tensor in enumerate(tensors)}

    def slot(value: Any) -> Any:
        return slots[id(value)] if isinstance(value, keras.KerasTensor) else value

    args = tuple(keras.tree.map_structure(slot, tuple(node.arguments.args)))
    kwargs = tuple(sorted(keras.tree.map_structure(slot, dict(node.arguments.kwargs)).items()))
    try:
        config = dict(op.get_config())
    except NotImplementedError:
        raise Unsupported(f"{where} has no config to rebuild it from.") from None
    config.pop("name", None)
    try:
        constants = (_constant_key(args), _constant_key(kwargs), _constant_key(config))
    except TypeError as error:
        raise Unsupported(
            f"{where} takes an argument of type {error}, which fuser cannot compare between "
            "members."
        ) from None
    shapes = [tuple(tensor.shape[1:]) for tensor in tensors]
    output = tuple(node.outputs[0].shape[1:])
    if any(dim is None for shape in [*shapes, output] for dim in shape):
        raise Unsupported(f"{where} acts on a tensor whose shape is not fixed but for the batch.")
    if entry.check is not None:
        entry.check(
            op, where, shapes=shapes, output=output, config=config, args=args, kwargs=kwargs
        )
    return OpStep(op, inbound, args, kwargs), ("op", kind, constants, inbound)


def _constant_key(value: Any) -> Any:
    """A hashable key comparing a constant by value: arrays by dtype, shape and bytes."""
    if isinstance(value, Slot):
        return ("tensor", value.index)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_constant_key(item) for item in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((key, _constant_key(item)) for key, item in value.items())))
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(type(value).__name__)
        return ("array", str(array.dtype), array.shape, array.tobytes())
    raise TypeError(type(value).__name__)


def _architecture(layer: Any) -> str:
    config = dict(layer.get_config())
    config.pop("name", None)
    config.pop("trainable", None)
    for key in _WEIGHT_CONFIG_KEYS.get(type(layer).__name__, ()):
        config.pop(key, None)
    return repr(sorted(config.items(), key=lambda item: item[0]))


def _weight_shapes(layer: Any) -> tuple:
    return tuple(tuple(weight.shape) for weight in layer.weights)
