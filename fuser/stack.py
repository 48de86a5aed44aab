"""Horizontal fusion: members with the same architecture become one stacked computation.

Members trained from the same code (different seeds, data slices) have isomorphic
graphs: the same layers, configs and connections, only names and weights differ.
For such a group, each layer runs once for all G members instead of G times:

- a ``Dense`` layer is a 1x1 convolution that runs along the batch: the rows are
  the pixels of one long image, ``(1, 1, batch, features)``. The first on the shared
  input is one convolution over the concatenated kernels (one matmul), later ones a
  grouped convolution (``groups=G``: one batched matmul) whose bias and activation ONNX
  Runtime fuses into it. Measured on an Intel Xeon VM, this beat both the plain branches
  and a batched ``MatMul`` at every batch size (``benchmarks/fusion.py``; on an AMD EPYC
  VM it lost to the plain branches at batch 4096, hence ``fuser.costs``): a batched matmul
  needs its bias and activation as separate passes over ``G x batch x features``
  values, which at batch 4096 made it slower than the plain graph;
- the first ``Conv`` on the shared input is one convolution over the concatenated
  filters, later ones a grouped convolution (``groups=G``, ONNX ``Conv`` ``group=G``);
- per-channel layers (batch normalization, pooling, activations, ``Normalization``)
  run once on the members' channels side by side;
- keras.ops calls in a functional graph (``x + 3.0``, ``ops.hard_sigmoid(x)``, an SE
  block's ``gate * x``), operations rather than layers, run once too: their constants
  are part of the architecture (members computing ``x + 1.0`` and ``x + 2.0`` are never
  grouped), and a constant along the last axis is repeated for each member's channels.

A stacked tensor lives in one of three layouts, converted where a layer needs another:

- ``shared``: the same ``(batch, *shape)`` tensor for every member (the input, and
  whatever weight-free or identical layers do to it);
- ``wide``: ``(batch, *shape[:-1], G * C)``, the members' channels side by side;
- ``line``: ``(1, 1, batch, G * features)`` for one-dimensional member tensors, the
  batch as the width of an image, for ``Dense`` layers as convolutions.

Everything is built from Keras' own layers and ``keras.ops``, so a ``.keras`` artifact
still loads in safe mode. The lowering is exact up to float32 summation order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuser.errors import brief, library_of
from fuser.members import Member

MODES = ("auto", "off", "stack")
# --fusion auto keeps a group with more weights than this plain (float32 bytes). Measured
# with 8 MLPs through ONNX Runtime (stacked against plain): 138 MB of weights, 1.2x
# faster at batch 1 and 1.1x at 4096, 2.8x the resident memory; 2.17 GB, 1.08x at batch 1,
# 3.5x the memory (8 GB), 2.8x the load time. Speed gained stops paying for memory.
AUTO_MAX_BYTES = 256_000_000

ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "linear",
        "relu",
        "relu6",
        "sigmoid",
        "hard_sigmoid",
        "tanh",
        "elu",
        "selu",
        "gelu",
        "silu",
        "swish",
        "softplus",
        "softsign",
        "exponential",
        "leaky_relu",
        "mish",
        "hard_silu",
        "hard_swish",
        "celu",
        "log_sigmoid",
        "tanh_shrink",
        "sparse_plus",
        "squareplus",
    }
)
# Activations over the last axis: per member, never across members.
LAST_AXIS_ACTIVATIONS = frozenset({"softmax", "log_softmax", "sparsemax"})

IDENTITY_LAYERS = frozenset(
    {
        "Dropout",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "ActivityRegularization",
        "Identity",
    }
)
ELEMENTWISE_LAYERS = frozenset({"Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Rescaling"})
# Layers that treat every channel on its own: they run unchanged on members side by side.
CHANNELWISE_LAYERS = frozenset(
    {
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "GlobalMaxPooling3D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "ZeroPadding3D",
        "Cropping1D",
        "Cropping2D",
        "Cropping3D",
        "UpSampling1D",
        "UpSampling2D",
        "UpSampling3D",
    }
)
MERGE_LAYERS = frozenset({"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"})
CONV_LAYERS = frozenset({"Conv1D", "Conv2D"})
WEIGHTED_LAYERS = frozenset(
    {"Dense", "BatchNormalization", "LayerNormalization", "Normalization", "DepthwiseConv2D"}
    | CONV_LAYERS
)
SHAPE_LAYERS = frozenset({"Flatten", "Reshape", "Concatenate"})
SUPPORTED_LAYERS = (
    IDENTITY_LAYERS
    | ELEMENTWISE_LAYERS
    | CHANNELWISE_LAYERS
    | MERGE_LAYERS
    | WEIGHTED_LAYERS
    | SHAPE_LAYERS
    | {"InputLayer"}
)
# Config keys that hold weights rather than architecture.
_WEIGHT_CONFIG_KEYS = {"Normalization": ("mean", "variance")}

# keras.ops calls in a functional graph (``x + 1.0``, ``ops.hard_sigmoid(x)``, as in
# MobileNetV3 and ConvNeXt): operations that are not layers, told apart by type, never by
# class name (``Add``, ``Multiply``, ``Reshape``, ``Softmax``... name layers too).
# Elementwise on one tensor; static arguments (alpha, x_min...) live in the op's config.
UNARY_OPS = frozenset(
    {
        "Relu",
        "Relu6",
        "Sigmoid",
        "HardSigmoid",
        "Silu",
        "HardSilu",
        "Tanh",
        "Gelu",
        "Elu",
        "Selu",
        "Celu",
        "LeakyRelu",
        "Softplus",
        "Softsign",
        "LogSigmoid",
        "HardTanh",
        "SparsePlus",
        "Squareplus",
        "SoftShrink",
        "HardShrink",
        "TanhShrink",
        "Exp",
        "Expm1",
        "Log",
        "Log1p",
        "Sqrt",
        "Rsqrt",
        "Square",
        "Reciprocal",
        "Abs",
        "Absolute",
        "Negative",
        "Sign",
        "Erf",
        "Clip",
        "Floor",
        "Ceil",
        "Round",
        "Sin",
        "Cos",
    }
)
# Elementwise on two arguments, tensors or constants, broadcasting; the order is kept.
BINARY_OPS = frozenset(
    {"Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Power"}
)
# Over each member's last axis, never across members.
LAST_AXIS_OPS = frozenset({"Softmax", "LogSoftmax"})
SHAPE_OPS = frozenset({"Reshape", "Cast"})
SUPPORTED_OPS = UNARY_OPS | BINARY_OPS | LAST_AXIS_OPS | SHAPE_OPS


class Unsupported(Exception):
    """A member's graph cannot be stacked; the message names the layer (or operation) and why."""


@dataclass(frozen=True)
class Step:
    """One layer call of a member's graph, in topological order."""

    layer: Any
    inbound: tuple[tuple[str, int, int], ...]  # ("input", i, 0) or ("step", j, k)


@dataclass(frozen=True)
class Slot:
    """Where a tensor sat among an operation's arguments: ``OpStep.inbound[index]``."""

    index: int


@dataclass(frozen=True)
class OpStep(Step):
    """A keras.ops call (``layer`` is the operation): its arguments as given, each tensor
    replaced by a ``Slot``, so constants (``1.0`` in ``1.0 - x``) keep their place."""

    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()  # sorted by name


@dataclass
class Graph:
    """A member's graph as steps, plus where its outputs come from."""

    steps: list[Step]
    outputs: list[tuple[str, int, int]]
    signature: Any


@dataclass
class Group:
    """Members stacked into one computation, with the lowering chosen for each layer."""

    members: list[Member]
    graphs: list[Graph]
    layers: list[dict[str, str]] = field(default_factory=list)
    measured: Any = None  # fuser.costs.Measurement, when --fusion auto timed the group
    # Stacked only up to this many rows, plain branches above (a switch on the batch size).
    max_stacked_batch: int | None = None

    def to_manifest(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "members": [member.name for member in self.members],
            "layers": self.layers,
        }
        if self.max_stacked_batch is not None:
            record["max_stacked_batch"] = self.max_stacked_batch
        if self.measured is not None:
            record["measured"] = self.measured.to_manifest()
        return record


@dataclass
class FusionPlan:
    """Which members are stacked, which stay plain branches and why."""

    mode: str
    groups: list[Group]
    plain: dict[str, str]  # member name -> why it is not stacked

    def to_manifest(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "groups": [group.to_manifest() for group in self.groups],
            "plain": dict(self.plain),
        }

    def demote(self, group: Group, reason: str) -> None:
        """Turn a group whose lowering failed back into plain branches."""
        self.groups.remove(group)
        for member in group.members:
            self.plain[member.name] = reason

    def notes(self) -> list[str]:
        lines = []
        for group in self.groups:
            names = ", ".join(member.name for member in group.members)
            line = f"Stacked {len(group.members)} same-architecture members: {names}."
            if group.max_stacked_batch is not None:
                line = (
                    f"Stacked {len(group.members)} same-architecture members up to batch "
                    f"{group.max_stacked_batch}, plain branches above (both forms are in the "
                    f"artifact, the batch size picks one): {names}."
                )
            if group.measured is not None:
                line += f" Measured, stacked vs plain: {group.measured.describe()}."
            lines.append(line)
        reasons: dict[str, list[str]] = {}
        for name, reason in self.plain.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            lines.append(f"Not stacked ({', '.join(names)}): {reason}")
        return lines


def check_mode(mode: str) -> list[str]:
    if mode not in MODES:
        return [f"fusion must be one of {', '.join(MODES)}, got {mode!r}."]
    return []


def plan_fusion(
    members: Sequence[Member],
    input_order: dict[str, list[str]],
    output_order: dict[str, list[int]],
    mode: str = "auto",
) -> FusionPlan:
    """Group isomorphic members and decide which groups to stack.

    ``stack`` stacks every group of two or more whose layers all have a lowering;
    ``auto`` only those that are not slower stacked than as plain branches at any batch
    size, and those faster stacked at small batches only up to a batch size (see
    ``_auto_keeps_plain``). ``off`` stacks nothing. The reason for every member left
    plain is kept.
    """
    if mode == "off":
        return FusionPlan(mode, [], {m.name: "fusion is off (--fusion off)." for m in members})
    plain: dict[str, str] = {}
    buckets: dict[Any, list[tuple[Member, Graph]]] = {}
    for member in members:
        try:
            graph = trace(member)
        except Unsupported as reason:
            plain[member.name] = str(reason)
            continue
        except Exception as error:  # a graph this planner misreads stays plain, never fails
            where = library_of(error) or type(error).__name__
            plain[member.name] = (
                f"its layer graph could not be read for stacking ({where}: {brief(error)})."
            )
            continue
        key = (graph.signature, tuple(input_order[member.name]), tuple(output_order[member.name]))
        buckets.setdefault(key, []).append((member, graph))
    groups = []
    for bucket in buckets.values():
        if len(bucket) == 1:
            ((member, _),) = bucket
            plain[member.name] = "no other member has the same architecture."
            continue
        group = Group([member for member, _ in bucket], [graph for _, graph in bucket])
        reason = _auto_keeps_plain(group) if mode == "auto" else None
        if reason is not None:
            for member in group.members:
                plain[member.name] = reason
            continue
        groups.append(group)
    return FusionPlan(mode, groups, plain)


def _auto_keeps_plain(group: Group) -> str | None:
    """Why ``--fusion auto`` keeps ``group`` plain, or None to stack it.

    Up to ``costs.MEASURE_MAX_BYTES`` of weights, both forms are timed here, with ONNX
    Runtime (``fuser.costs``): which wins depends on the CPU. Where stacked wins at small
    batches and loses at large ones, a switch on the batch size is timed too and, if it
    is never slower than plain, kept (``group.max_stacked_batch``): the group's weights
    are then in the artifact twice, which at most 32 MB each costs little. Above,
    measuring would cost seconds and gigabytes, and a fixed rule decides, from
    measurements on two CPUs:
    dense groups are stacked (1.1 to 1.9x faster at 35 and 138 MB of weights, at every
    batch size), groups with convolutions or pooling are not (slower at large batches),
    nor groups over ``AUTO_MAX_BYTES``.
    """
    from fuser import costs

    size = sum(member.parameters for member in group.members) * 4
    if size > AUTO_MAX_BYTES:
        return (
            f"--fusion auto keeps groups with more than {AUTO_MAX_BYTES // 10**6} MB of weights "
            f"plain (this one: {size / 10**6:,.0f} MB): stacked, ONNX Runtime holds about 3x "
            "the weights in memory and loads 3x slower, for no speed gain at that size; "
            "--fusion stack stacks them."
        )
    if size <= costs.MEASURE_MAX_BYTES:
        try:
            measured = costs.measure(group)
        except (Unsupported, costs.FormsDisagree) as reason:
            return str(reason)
        except Exception as error:  # converting or timing either form failed
            where = library_of(error) or type(error).__name__
            return (
                "--fusion auto could not convert and time the two forms, so they stay plain "
                f"({where}: {brief(error)})"
            )
        group.measured = measured
        try:
            return _decide(group, measured)
        finally:
            measured.converted = None  # the two ONNX models, up to 2 x 32 MB
    spatial = _spatial_layer(group.graphs[0])
    if spatial is not None:
        return (
            f"--fusion auto keeps groups over {costs.MEASURE_MAX_BYTES // 10**6} MB with "
            f"{spatial} layers plain: stacked, they were measured slower at large batches "
            "(ONNX Runtime's grouped convolution); --fusion stack stacks them."
        )
    return None


def _decide(group: Group, measured: Any) -> str | None:
    """Why ``group`` stays plain after its timing, or None to stack it (maybe switched)."""
    from fuser import costs

    if measured.stacked_wins:
        return None
    losing = ", ".join(map(str, measured.losing_batches))
    slower = f"--fusion auto measured the stacked form slower than plain branches at batch {losing}"
    if measured.stacked_limit is not None:
        try:
            measured.switch = costs.measure_switch(group, measured)
        except costs.FormsDisagree as reason:
            return str(reason)
        except Exception as error:
            slower += f" and timing a switch between both forms failed ({brief(error)})"
        else:
            if not measured.switch_losing_batches:
                group.max_stacked_batch = measured.stacked_limit
                return None
            worse = ", ".join(map(str, measured.switch_losing_batches))
            slower += (
                f", and a switch to plain above batch {measured.stacked_limit} was slower "
                f"than plain at batch {worse}"
            )
    return (
        f"{slower} (ONNX Runtime on this machine, stacked vs plain: {measured.describe()}); "
        "--fusion stack stacks them."
    )


def _spatial_layer(graph: Graph) -> str | None:
    """The kind of the first convolution or pooling layer of ``graph``, if any."""
    spatial = CONV_LAYERS | {"DepthwiseConv2D"} | CHANNELWISE_LAYERS
    for step in graph.steps:
        kind = type(step.layer).__name__
        if kind in spatial and not isinstance(step, OpStep):
            return kind
    return None


def trace(member: Member) -> Graph:
    """The member's layer graph, or ``Unsupported`` naming the layer that prevents stacking."""
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
                "stacking supports float32 inputs."
            )
        if any(dim is None for dim in spec.shape[1:]):
            raise Unsupported(
                f"{member.describe()} takes input {spec.name!r} of shape {spec.shape}; "
                "stacking needs every dimension but the batch fixed."
            )
    import keras

    steps: list[Step] = []
    signature: list[Any] = []
    of_member = _lower_first(member.describe())
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.is_input or node.operation is None:
                continue
            if isinstance(node.operation, keras.layers.Layer):
                step, entry = _trace_layer(node, positions, of_member)
            else:
                step, entry = _trace_op(node, positions, of_member)
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


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


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
    if kind not in SUPPORTED_LAYERS or not type(layer).__module__.startswith("keras."):
        raise Unsupported(f"{where} has no stacked lowering.")
    inbound = _inbound(node, positions, where)
    extra = sorted(set(node.arguments.kwargs) - {"training", "mask"})
    if extra:
        raise Unsupported(f"{where} is called with arguments {', '.join(extra)}.")
    _check_layer(layer, where)
    entry = (kind, _architecture(layer), _weight_shapes(layer), inbound)
    return Step(layer, inbound), entry


# keras.ops calls: what can be stacked -----------------------------------------------------


def op_label(op: Any) -> str:
    """How a user wrote the operation: ``keras.ops.hard_sigmoid`` for ``HardSigmoid``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", type(op).__name__)
    return "keras.ops." + re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def _trace_op(node: Any, positions: dict, of_member: str) -> tuple[OpStep, Any]:
    """A keras.ops call as a step and its signature entry, or ``Unsupported`` naming it.

    The entry holds the call's constants (arguments other than tensors, and the static
    ones in the op's config), so members computing ``x + 1.0`` and ``x + 2.0`` are never
    stacked together.
    """
    import keras

    op = node.operation
    kind = type(op).__name__
    where = f"operation {op.name!r} ({op_label(op)}) of {of_member}"
    if kind not in SUPPORTED_OPS or not type(op).__module__.startswith("keras.src.ops."):
        raise Unsupported(
            f"{where} is a tensor operation (not a layer) without a stacked lowering."
        )
    inbound = _inbound(node, positions, where)
    tensors = node.arguments.keras_tensors
    for tensor in [*tensors, *node.outputs]:
        if str(tensor.dtype) != "float32":
            raise Unsupported(f"{where} computes in {tensor.dtype}; stacking supports float32.")
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
    _check_op(kind, config, args, kwargs, shapes, tuple(node.outputs[0].shape[1:]), where)
    return OpStep(op, inbound, args, kwargs), ("op", kind, constants, inbound)


def _check_op(
    kind: str,
    config: dict[str, Any],
    args: tuple,
    kwargs: tuple,
    shapes: list[tuple],
    output: tuple,
    where: str,
) -> None:
    """Refuse the calls of a supported op that its lowering does not cover."""
    if kind not in BINARY_OPS and len(shapes) != 1:
        raise Unsupported(f"{where} takes {len(shapes)} tensors; expected one.")
    if any(dim is None for shape in [*shapes, output] for dim in shape):
        raise Unsupported(f"{where} acts on a tensor whose shape is not fixed but for the batch.")
    if kind in BINARY_OPS:
        if len(args) + len(kwargs) != 2 or not shapes:
            raise Unsupported(f"{where} is not called with two arguments.")
        if len({len(shape) for shape in shapes}) > 1:
            ranks = " and ".join(str(len(shape) + 1) for shape in shapes)
            raise Unsupported(f"{where} broadcasts tensors of rank {ranks}.")
        for value in [*args, *(value for _, value in kwargs)]:
            if isinstance(value, Slot):
                continue
            shape = np.shape(value)
            try:
                along_last_axis = np.broadcast_shapes(shapes[0], shape) == shapes[0]
            except ValueError:
                along_last_axis = False
            if not along_last_axis or math.prod(shape[:-1]) != 1:
                raise Unsupported(
                    f"{where} takes a constant of shape {shape}; stacking supports scalars and "
                    "constants along the last axis."
                )
    elif kind in LAST_AXIS_OPS:
        axis = config.get("axis", -1)
        if not isinstance(axis, int) or axis not in (-1, len(shapes[0])):
            raise Unsupported(f"{where} acts on axis {axis!r}, not on the last one.")
    elif kind == "Reshape":
        target = tuple(config.get("newshape") or ())
        if (
            len(target) < 2
            or target[0] not in (-1, None)
            or math.prod(output) != math.prod(shapes[0])
        ):
            raise Unsupported(
                f"{where} reshapes to {target}, moving values across the batch axis; stacking "
                "supports reshapes that keep the batch first."
            )


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


def _check_layer(layer: Any, where: str) -> None:
    config = layer.get_config()
    dtype = getattr(layer, "compute_dtype", "float32")
    if dtype != "float32":
        raise Unsupported(f"{where} computes in {dtype}; stacking supports float32.")
    kind = type(layer).__name__
    if config.get("data_format", "channels_last") != "channels_last":
        raise Unsupported(f"{where} uses data_format={config['data_format']!r}.")
    last_axis_only = {
        "BatchNormalization": "renorm",
        "LayerNormalization": "rms_scaling",
        "Normalization": None,
        "Softmax": None,
    }
    if kind in last_axis_only:
        flag = last_axis_only[kind]
        if not _only_last_axis(config.get("axis"), layer) or (flag and config.get(flag)):
            raise Unsupported(f"{where} acts on axes other than the last one (or uses {flag}).")
    if "activation" in config:
        name = _activation_name(config["activation"])
        if name not in ELEMENTWISE_ACTIVATIONS | LAST_AXIS_ACTIVATIONS:
            raise Unsupported(f"{where} uses the activation {name!r}.")
    if kind == "Concatenate" and not isinstance(config.get("axis"), int):
        raise Unsupported(f"{where} has no integer axis.")
    if kind == "DepthwiseConv2D" and config.get("depth_multiplier", 1) < 1:
        raise Unsupported(f"{where} has no positive depth multiplier.")


def _only_last_axis(axis: Any, layer: Any) -> bool:
    """Whether ``axis`` names only the last axis of the layer's input."""
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return False
        (axis,) = axis
    if axis == -1:
        return True
    return axis is not None and _has_input(layer) and axis == len(layer.input.shape) - 1


def _has_input(layer: Any) -> bool:
    try:
        layer.input  # noqa: B018 - raises for layers called more than once
    except (AttributeError, ValueError):
        return False
    return True


def _activation_name(activation: Any) -> str:
    if isinstance(activation, str):
        return activation
    if isinstance(activation, dict):
        return str(activation.get("config", activation.get("class_name", "")))
    return getattr(activation, "__name__", repr(activation))


def _architecture(layer: Any) -> str:
    config = dict(layer.get_config())
    config.pop("name", None)
    config.pop("trainable", None)
    for key in _WEIGHT_CONFIG_KEYS.get(type(layer).__name__, ()):
        config.pop(key, None)
    return repr(sorted(config.items(), key=lambda item: item[0]))


def _weight_shapes(layer: Any) -> tuple:
    return tuple(tuple(weight.shape) for weight in layer.weights)


# ---------------------------------------------------------------------------------------
# Lowering


@dataclass
class Value:
    """A stacked tensor: its layout and each member's shape (batch excluded)."""

    tensor: Any
    layout: str  # "shared" | "wide" | "line"
    shape: tuple[int, ...]


class _Lowering:
    """Builds one group's stacked sub-graph on the fused model's inputs."""

    def __init__(self, group: Group, prefix: str) -> None:
        import keras
        from keras import ops

        self.keras, self.ops = keras, ops
        self.group = group
        self.size = len(group.members)
        self.prefix = prefix
        self.records: list[dict[str, str]] = []
        self.names: set[str] = set()

    # layouts ----------------------------------------------------------------------------

    def mid(self, value: Value) -> Any:
        """``(batch, G, *shape)``."""
        ops, size, shape = self.ops, self.size, value.shape
        if value.layout == "shared":
            return ops.repeat(ops.expand_dims(value.tensor, 1), size, axis=1)
        if value.layout == "line":
            return ops.reshape(value.tensor, (-1, size, *shape))
        rank = len(shape)
        tensor = ops.reshape(value.tensor, (-1, *shape[:-1], size, shape[-1]))
        if rank == 1:
            return tensor
        return ops.transpose(tensor, (0, rank, *range(1, rank), rank + 1))

    def from_mid(self, tensor: Any, shape: tuple[int, ...]) -> Value:
        """A ``(batch, G, *shape)`` tensor as ``wide``."""
        ops, size, rank = self.ops, self.size, len(shape)
        if rank > 1:
            tensor = ops.transpose(tensor, (0, *range(2, rank + 1), 1, rank + 1))
        tensor = ops.reshape(tensor, (-1, *shape[:-1], size * shape[-1]))
        return Value(tensor, "wide", shape)

    def wide(self, value: Value) -> Value:
        if value.layout == "wide":
            return value
        if value.layout == "shared":
            reps = [1] * len(value.shape) + [self.size]
            return Value(self.ops.tile(value.tensor, reps), "wide", value.shape)
        tensor = self.ops.reshape(value.tensor, (-1, self.size * value.shape[0]))  # line
        return Value(tensor, "wide", value.shape)

    def line(self, value: Value) -> Value:
        """``(1, 1, batch, G * features)``; a rank-N member tensor is flattened on the way."""
        if value.layout == "line":
            return value
        ops, size = self.ops, self.size
        features = math.prod(value.shape)
        if value.layout == "wide" and len(value.shape) == 1:
            tensor = value.tensor
        else:
            tensor = self.mid(value)
        return Value(ops.reshape(tensor, (1, 1, -1, size * features)), "line", (features,))

    # helpers ----------------------------------------------------------------------------

    def name(self, layer: Any, suffix: str = "") -> str:
        """A new layer's name, unique in the model (a member may have layers ``d`` and
        ``d_activation``, and ``d``'s activation becomes a layer of its own)."""
        base = name = f"{self.prefix}_{layer.name}{suffix}"
        count = 1
        while name in self.names:
            count += 1
            name = f"{base}_{count}"
        self.names.add(name)
        return name

    def record(self, layer: Any, lowering: str, why: str) -> None:
        """What ``layer`` (or keras.ops operation) became, and why."""
        self.records.append(
            {"layer": layer.name, "type": _kind(layer), "lowering": lowering, "why": why}
        )

    def weights(self, layers: Sequence[Any]) -> list[list[np.ndarray]]:
        """Per member, the layer's weights as NumPy arrays."""
        return [[np.asarray(w) for w in layer.get_weights()] for layer in layers]

    def activation(self, value: Value, activation: Any, name: str) -> Value:
        kind = _activation_name(activation)
        if kind == "linear":
            return value
        layer = self.keras.layers.Activation(activation, name=name)
        if kind in LAST_AXIS_ACTIVATIONS:
            return self.apply_last_axis(value, layer)
        return Value(layer(value.tensor), value.layout, value.shape)

    def elementwise(self, layer: Any, arguments: list[Value], apply: Any) -> Value:
        """``apply`` (a merge layer's or a binary operation's call on a list of tensors) on
        ``arguments``, broadcasting between them as within each member: in their common
        layout where their shapes are equal, with members side by side (``wide``) where
        only axes other than the last differ (an SE block's ``(1, 1, C)`` gate), with
        members apart (``mid``) where the last axes differ."""
        shapes = [value.shape for value in arguments]
        if len({len(shape) for shape in shapes}) > 1 or not all(shapes):
            raise Unsupported(
                f"{_describe(layer)} combines tensors of shapes {', '.join(map(str, shapes))} "
                "(batch aside); stacking supports inputs of one rank, at least 1."
            )
        shape = tuple(int(dim) for dim in np.broadcast_shapes(*shapes))
        layouts = {value.layout for value in arguments}
        same = len(set(shapes)) == 1
        if same:
            self.record(layer, "once, elementwise", "elementwise across inputs")
        elif len({shape[-1] for shape in shapes}) == 1:
            self.record(
                layer,
                "once, members side by side, broadcast",
                "the inputs' shapes differ on axes other than the last",
            )
        else:
            self.record(layer, "once, members apart, broadcast", "the inputs' last axes differ")
        if layouts == {"shared"} or (same and layouts == {"line"}):
            return Value(apply([value.tensor for value in arguments]), layouts.pop(), shape)
        if same or len({shape[-1] for shape in shapes}) == 1:
            return Value(apply([self.wide(value).tensor for value in arguments]), "wide", shape)
        return self.from_mid(apply([self.mid(value) for value in arguments]), shape)

    def reshape(self, layer: Any, value: Value, target: tuple[int, ...], shared: Any) -> Value:
        """Each member's tensor reshaped to ``target``; ``shared`` reshapes a shared one."""
        if value.layout == "shared":
            self.record(layer, "once, shared", "same input for every member")
            return Value(shared(value.tensor), "shared", target)
        if len(target) == 1:
            self.record(layer, "per member flatten", "flattens each member's tensor")
            return self.line(value)
        self.record(layer, "per member reshape", "keeps members apart")
        tensor = self.ops.reshape(self.mid(value), (-1, self.size, *target))
        return self.from_mid(tensor, target)

    def apply_last_axis(self, value: Value, layer: Any) -> Value:
        """A layer acting on each member's last axis (softmax): never mix members' channels."""
        if value.layout == "shared":
            return Value(layer(value.tensor), value.layout, value.shape)
        tensor = layer(self.mid(value))
        if value.layout == "line":
            tensor = self.ops.reshape(tensor, (1, 1, -1, self.size * value.shape[0]))
            return Value(tensor, "line", value.shape)
        return self.from_mid(tensor, value.shape)

    # the lowering -----------------------------------------------------------------------

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        graphs = self.group.graphs
        values: dict[tuple[str, int, int], Value] = {
            ("input", index, 0): Value(tensor, "shared", tuple(tensor.shape[1:]))
            for index, tensor in enumerate(inputs)
        }
        for index, step in enumerate(graphs[0].steps):
            arguments = [values[position] for position in step.inbound]
            if isinstance(step, OpStep):  # the same constants in every member (its signature)
                values[("step", index, 0)] = self.lower_op(step, arguments)
                continue
            layers = [graph.steps[index].layer for graph in graphs]
            values[("step", index, 0)] = self.lower(layers, arguments)
        return [self.mid(values[position]) for position in graphs[0].outputs]

    def lower(self, layers: list[Any], arguments: list[Value]) -> Value:
        first = layers[0]
        kind = type(first).__name__
        method = getattr(self, f"lower_{kind}", None)
        families = (
            (IDENTITY_LAYERS, self.lower_identity),
            (ELEMENTWISE_LAYERS, self.lower_elementwise),
            (CHANNELWISE_LAYERS, self.lower_channelwise),
            (MERGE_LAYERS, self.lower_merge),
        )
        for family, candidate in families:
            if method is None and kind in family:
                method = candidate
        if method is None:
            raise Unsupported(f"layer {first.name!r} ({kind}) has no stacked lowering.")
        return method(layers, arguments)

    def clone(self, layer: Any, suffix: str = "") -> Any:
        config = layer.get_config()
        config["name"] = self.name(layer, suffix)
        return type(layer).from_config(config)

    def lower_identity(self, layers, arguments):
        self.record(layers[0], "identity", "inactive at inference")
        return arguments[0]

    def lower_elementwise(self, layers, arguments):
        (value,) = arguments
        layer = self.clone(layers[0])
        kind = type(layers[0]).__name__
        if kind == "Softmax" or (
            kind == "Activation"
            and _activation_name(layers[0].get_config()["activation"]) in LAST_AXIS_ACTIVATIONS
        ):
            self.record(layers[0], "once, per member's last axis", "no weights")
            return self.apply_last_axis(value, layer)
        self.record(layers[0], "once, elementwise", "no weights")
        return Value(layer(value.tensor), value.layout, value.shape)

    def lower_channelwise(self, layers, arguments):
        (value,) = arguments
        layer = self.clone(layers[0])
        if value.layout == "line":
            value = self.wide(value)
        tensor = layer(value.tensor)
        shape = tuple(tensor.shape[1:])
        if value.layout == "wide":
            shape = (*shape[:-1], shape[-1] // self.size)
        self.record(layers[0], "once, members' channels side by side", "acts on each channel")
        return Value(tensor, value.layout, shape)

    def lower_merge(self, layers, arguments):
        return self.elementwise(layers[0], arguments, self.clone(layers[0]))

    def lower_Flatten(self, layers, arguments):
        (value,) = arguments
        if value.layout == "shared":
            self.record(layers[0], "once, shared", "same input for every member")
            return Value(self.clone(layers[0])(value.tensor), "shared", (math.prod(value.shape),))
        self.record(layers[0], "per member flatten", "flattens each member's tensor")
        return self.line(value)

    def lower_Reshape(self, layers, arguments):
        (value,) = arguments
        target = _reshape_target(layers[0].get_config()["target_shape"], value.shape)
        return self.reshape(layers[0], value, target, self.clone(layers[0]))

    def lower_Concatenate(self, layers, arguments):
        axis = layers[0].get_config()["axis"]
        if {value.layout for value in arguments} == {"shared"}:
            self.record(layers[0], "once, shared", "same inputs for every member")
            tensor = self.clone(layers[0])([value.tensor for value in arguments])
            return Value(tensor, "shared", tuple(tensor.shape[1:]))
        rank = len(arguments[0].shape)
        axis = axis if axis >= 0 else rank + 1 + axis  # in (batch, *shape)
        tensor = self.ops.concatenate([self.mid(value) for value in arguments], axis=axis + 1)
        shape = tuple(tensor.shape[2:])
        self.record(layers[0], "per member concatenation", "keeps members apart")
        return self.from_mid(tensor, shape)

    def lower_Dense(self, layers, arguments):
        (value,) = arguments
        first = layers[0]
        config = first.get_config()
        use_bias = config["use_bias"]
        weights = self.weights(layers)
        units = config["units"]
        kernel = np.concatenate([w[0] for w in weights], axis=-1)
        parts = [kernel]
        if use_bias:
            parts.append(np.concatenate([w[1] for w in weights]))
        if value.layout == "shared" and len(value.shape) > 1:
            dense = self.keras.layers.Dense(
                units * self.size, use_bias=use_bias, name=self.name(first)
            )
            tensor = dense(value.tensor)
            dense.set_weights(parts)
            self.record(
                first,
                "one matmul over the concatenated kernels",
                "every member reads the same input: one matmul instead of G",
            )
            result = Value(tensor, "wide", (*value.shape[:-1], units))
        else:
            if len(value.shape) != 1:
                raise Unsupported(
                    f"layer {first.name!r} (Dense) acts on rank-{len(value.shape)} tensors "
                    "that differ between members."
                )
            if value.layout == "shared":
                tensor, groups = self.ops.reshape(value.tensor, (1, 1, -1, value.shape[0])), 1
                lowering = "one 1x1 convolution over the concatenated kernels, along the batch"
                why = "every member reads the same input: one matmul instead of G"
            else:
                tensor, groups = self.line(value).tensor, self.size
                lowering = f"grouped 1x1 convolution (groups={groups}), along the batch"
                why = "one batched matmul with fused bias and activation instead of G matmuls"
            dense = self.keras.layers.Conv2D(
                units * self.size, 1, groups=groups, use_bias=use_bias, name=self.name(first)
            )
            tensor = dense(tensor)
            parts[0] = kernel[None, None]
            dense.set_weights(parts)
            self.record(first, lowering, why)
            result = Value(tensor, "line", (units,))
        return self.activation(result, config["activation"], self.name(first, "_activation"))

    def lower_BatchNormalization(self, layers, arguments):
        (value,) = arguments
        first = layers[0]
        config = first.get_config()
        params = [self._batchnorm_params(layer) for layer in layers]
        if value.layout == "shared" and all(
            all(np.array_equal(a, b) for a, b in zip(params[0], other)) for other in params[1:]
        ):
            self.record(first, "once, shared", "identical in every member, same input")
            layer = self.clone(first)
            return Value(layer(value.tensor), "shared", value.shape)
        if value.layout != "line":
            value = self.wide(value)
        layer = self.keras.layers.BatchNormalization(
            axis=-1, epsilon=config["epsilon"], name=self.name(first)
        )
        tensor = layer(value.tensor)
        layer.set_weights([np.concatenate(part) for part in zip(*params)])
        self.record(first, "once, members' channels side by side", "acts on each channel")
        return Value(tensor, value.layout, value.shape)

    @staticmethod
    def _batchnorm_params(layer: Any) -> list[np.ndarray]:
        scale, offset = _scale_offset(layer, int(layer.moving_mean.shape[0]))
        return [scale, offset, np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)]

    def lower_LayerNormalization(self, layers, arguments):
        (value,) = arguments
        first = layers[0]
        config = first.get_config()
        norm = self.keras.layers.LayerNormalization(
            axis=-1, epsilon=config["epsilon"], center=False, scale=False, name=self.name(first)
        )
        channels = value.shape[-1]
        if value.layout == "shared":
            normalized = Value(norm(value.tensor), "shared", value.shape)
        else:
            normalized = self.from_mid(norm(self.mid(value)), value.shape)
        scales, offsets = zip(*(_scale_offset(layer, channels) for layer in layers))
        normalized = self.wide(normalized)
        affine = self.keras.layers.BatchNormalization(
            axis=-1, epsilon=0.0, name=self.name(first, "_affine")
        )
        tensor = affine(normalized.tensor)
        affine.set_weights(
            [
                np.concatenate(scales),
                np.concatenate(offsets),
                np.zeros(channels * self.size, np.float32),
                np.ones(channels * self.size, np.float32),
            ]
        )
        self.record(
            first,
            "normalization per member, then one affine over members side by side",
            "statistics per member, scale and offset per channel",
        )
        return Value(tensor, "wide", value.shape)

    def lower_Normalization(self, layers, arguments):
        (value,) = arguments
        first = layers[0]
        config = first.get_config()
        means = [np.asarray(layer.mean, np.float32).reshape(-1) for layer in layers]
        variances = [np.asarray(layer.variance, np.float32).reshape(-1) for layer in layers]
        invert = config.get("invert", False)
        if value.layout == "shared" and all(
            np.array_equal(means[0], m) and np.array_equal(variances[0], v)
            for m, v in zip(means[1:], variances[1:])
        ):
            self.record(first, "once, shared", "identical statistics in every member")
            layer = self.keras.layers.Normalization(
                axis=-1, mean=means[0], variance=variances[0], invert=invert, name=self.name(first)
            )
            return Value(layer(value.tensor), "shared", value.shape)
        if value.layout != "line":
            value = self.wide(value)
        layer = self.keras.layers.Normalization(
            axis=-1,
            mean=np.concatenate(means),
            variance=np.concatenate(variances),
            invert=invert,
            name=self.name(first),
        )
        self.record(first, "once, members' channels side by side", "statistics per channel")
        return Value(layer(value.tensor), value.layout, value.shape)

    def _conv(self, layers, arguments, *, depthwise: bool):
        (value,) = arguments
        first = layers[0]
        config = dict(first.get_config())
        activation = config.pop("activation", "linear")
        weights = self.weights(layers)
        use_bias = config["use_bias"]
        config["name"] = self.name(first)
        config["activation"] = "linear"
        shared = value.layout == "shared"
        if depthwise:
            value = self.wide(value)
            kernel = np.concatenate([w[0] for w in weights], axis=2)
            lowering = "one depthwise convolution over members side by side"
            why = "acts on each channel"
        elif shared and config.get("groups", 1) == 1:
            kernel = np.concatenate([w[0] for w in weights], axis=-1)
            config["filters"] = config["filters"] * self.size
            lowering = "one convolution over the concatenated filters"
            why = "every member reads the same input: one convolution instead of G"
        else:
            value = self.wide(value)
            kernel = np.concatenate([w[0] for w in weights], axis=-1)
            config["filters"] = config["filters"] * self.size
            config["groups"] = config.get("groups", 1) * self.size
            lowering = f"grouped convolution (groups={config['groups']})"
            why = "one convolution replaces G"
        layer = type(first).from_config(config)
        tensor = layer(value.tensor)
        parts = [kernel]
        if use_bias:
            parts.append(np.concatenate([w[1] for w in weights]))
        layer.set_weights(parts)
        self.record(first, lowering, why)
        channels = tensor.shape[-1] // self.size
        result = Value(tensor, "wide", (*tensor.shape[1:-1], channels))
        return self.activation(result, activation, self.name(first, "_activation"))

    def lower_Conv1D(self, layers, arguments):
        return self._conv(layers, arguments, depthwise=False)

    def lower_Conv2D(self, layers, arguments):
        return self._conv(layers, arguments, depthwise=False)

    def lower_DepthwiseConv2D(self, layers, arguments):
        return self._conv(layers, arguments, depthwise=True)

    # keras.ops calls --------------------------------------------------------------------

    def lower_op(self, step: OpStep, arguments: list[Value]) -> Value:
        """A keras.ops call, once for the group: its constants are every member's."""
        kind = type(step.layer).__name__
        method = getattr(self, f"lower_op_{kind}", None)
        families = (
            (UNARY_OPS, self.lower_op_elementwise),
            (BINARY_OPS, self.lower_op_binary),
            (LAST_AXIS_OPS, self.lower_op_last_axis),
        )
        for family, candidate in families:
            if method is None and kind in family:
                method = candidate
        if method is None:
            raise Unsupported(f"{_describe(step.layer)} has no stacked lowering.")
        return method(step, arguments)

    def call_op(self, step: OpStep, tensors: Sequence[Any], constant: Any = None) -> Any:
        """The step's operation, new and uniquely named, called on ``tensors`` in the
        places of its tensor arguments and its constants (through ``constant``) in theirs."""
        op = step.layer
        fresh = type(op).from_config({**op.get_config(), "name": self.name(op)})

        def argument(value: Any) -> Any:
            if isinstance(value, Slot):
                return tensors[value.index]
            return value if constant is None else constant(value)

        return fresh(
            *[argument(value) for value in step.args],
            **{name: argument(value) for name, value in step.kwargs},
        )

    def lower_op_elementwise(self, step, arguments):
        (value,) = arguments
        self.record(step.layer, "once, elementwise", "no weights")
        return Value(self.call_op(step, [value.tensor]), value.layout, value.shape)

    def lower_op_last_axis(self, step, arguments):
        (value,) = arguments
        self.record(step.layer, "once, per member's last axis", "no weights")
        return self.apply_last_axis(value, lambda tensor: self.call_op(step, [tensor]))

    def lower_op_binary(self, step, arguments):
        if len(arguments) > 1:
            return self.elementwise(
                step.layer, arguments, lambda tensors: self.call_op(step, tensors)
            )
        (value,) = arguments
        constants = [
            item for item in [*step.args, *dict(step.kwargs).values()] if not isinstance(item, Slot)
        ]
        if value.layout == "shared" or all(np.size(item) == 1 for item in constants):
            self.record(step.layer, "once, with its constant", "the same constant for every member")
            return Value(self.call_op(step, [value.tensor]), value.layout, value.shape)

        def tiled(item: Any) -> Any:  # along the last axis (checked by trace): per member
            if np.size(item) == 1:
                return item
            array = np.asarray(item)
            return np.tile(array.reshape(-1), self.size)

        self.record(
            step.layer,
            "once, with its constant repeated for each member's channels",
            "a constant along the last axis, the same for every member",
        )
        return Value(self.call_op(step, [value.tensor], tiled), value.layout, value.shape)

    def lower_op_Reshape(self, step, arguments):
        (value,) = arguments
        target = _reshape_target(step.layer.get_config()["newshape"][1:], value.shape)
        return self.reshape(
            step.layer, value, target, lambda tensor: self.ops.reshape(tensor, (-1, *target))
        )

    def lower_op_Cast(self, step, arguments):
        self.record(step.layer, "identity", "a cast from float32 to float32")
        return arguments[0]


def _kind(operation: Any) -> str:
    """A layer's class name (``Multiply``), or an operation's ``keras.ops.multiply``."""
    import keras

    if isinstance(operation, keras.layers.Layer):
        return type(operation).__name__
    return op_label(operation)


def _describe(operation: Any) -> str:
    """``layer 'gate' (Multiply)`` or ``operation 'add' (keras.ops.add)``, for messages."""
    import keras

    what = "layer" if isinstance(operation, keras.layers.Layer) else "operation"
    return f"{what} {operation.name!r} ({_kind(operation)})"


def _reshape_target(target: Sequence[int | None], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A member's reshape target without the batch, its one free dimension (-1) resolved."""
    target = tuple(-1 if dim is None else int(dim) for dim in target)
    if -1 in target:
        known = math.prod(dim for dim in target if dim != -1)
        target = tuple(math.prod(shape) // known if dim == -1 else dim for dim in target)
    return target


def _scale_offset(layer: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A normalization layer's gamma and beta, ones and zeros where it has none."""
    gamma = np.ones(channels) if layer.gamma is None else np.asarray(layer.gamma)
    beta = np.zeros(channels) if layer.beta is None else np.asarray(layer.beta)
    return gamma.astype(np.float32), beta.astype(np.float32)


def lower(group: Group, inputs: Sequence[Any], prefix: str) -> list[Any]:
    """Build the group's stacked sub-graph on ``inputs`` (the member's input order).

    Returns one ``(batch, G, ...)`` tensor per member output, and records on the group
    the lowering chosen for each layer and why.
    """
    lowering = _Lowering(group, prefix)
    outputs = lowering.run(inputs)
    group.layers = lowering.records
    return outputs
