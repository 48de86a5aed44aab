"""Every layer and keras.ops operation horizontal fusion can lower: one registry.

Each entry pairs a kind's support check (called while a member's graph is read, before
anything is built) with its lowering (called with the group's layers, one per member, and
the fused values of their inputs). To make a new layer kind fusable, add one function here
with ``@layers("Kind", check=...)``; an operation, ``@operations(...)``.

What the main lowerings compute, for a group of G members:

- ``Dense`` is a 1x1 convolution that runs along the batch: the rows are the pixels of
  one long image, ``(1, 1, batch, features)``. On the shared input it is one convolution
  over the concatenated kernels (one matmul), later a grouped convolution (``groups=G``:
  one batched matmul) whose bias and activation ONNX Runtime fuses into it (a batched
  ``MatMul`` needs them as separate passes over ``G x batch x features`` values);
- the first ``Conv`` on the shared input is one convolution over the concatenated
  filters, later ones a grouped convolution (``groups=G``, ONNX ``Conv`` ``group=G``);
- per-channel layers (batch normalization, pooling, activations, ``Normalization``)
  run once on the members' channels side by side;
- keras.ops calls (``x + 3.0``, ``ops.hard_sigmoid(x)``, an SE block's ``gate * x``) run
  once too: their constants are part of the architecture (see ``fuser.fusion.graph``),
  and a constant along the last axis is repeated for each member's channels.

Everything is built from Keras' own layers and ``keras.ops``, so a ``.keras`` artifact
still loads in safe mode; the lowering is exact up to float32 summation order.

Over 400 lines: the registry is the point of this file, one place for every kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuser.fusion.layouts import LAST_AXIS_ACTIVATIONS, Context, Value, reshape_target
from fuser.fusion.steps import OpStep, Slot, Unsupported, activation_name, describe

# Activations a layer may apply elementwise: they run once on the members side by side.
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
ACTIVATIONS = ELEMENTWISE_ACTIVATIONS | LAST_AXIS_ACTIVATIONS
# Layers whose kernels make a group's weights (and its computation) grow with G.
CONVOLUTIONS = frozenset({"Conv1D", "Conv2D", "DepthwiseConv2D"})


@dataclass(frozen=True)
class Lowering:
    """How one kind is fused: ``lower(context, layers_or_step, arguments) -> Value``, and
    ``check(node_thing, where, **facts)``, which raises ``Unsupported`` for the calls of
    the kind its lowering does not cover (None: every call is covered)."""

    lower: Callable[..., Value]
    check: Callable[..., None] | None = None


LAYERS: dict[str, Lowering] = {}
OPERATIONS: dict[str, Lowering] = {}


def layers(*kinds: str, check: Callable[..., None] | None = None) -> Callable:
    """Register a lowering for the layer classes named ``kinds``."""
    return _registrar(LAYERS, kinds, check)


def operations(*kinds: str, check: Callable[..., None] | None = None) -> Callable:
    """Register a lowering for the keras.ops operation classes named ``kinds``."""
    return _registrar(OPERATIONS, kinds, check)


def _registrar(
    registry: dict[str, Lowering], kinds: Sequence[str], check: Callable[..., None] | None
) -> Callable:
    def register(function: Callable[..., Value]) -> Callable[..., Value]:
        for kind in kinds:
            registry[kind] = Lowering(function, check)
        return function

    return register


def lower(group: Any, inputs: Sequence[Any], prefix: str) -> list[Any]:
    """Build ``group``'s fused sub-graph on ``inputs`` (the member's input order).

    Returns one ``(batch, G, ...)`` tensor per member output, and records on the group
    the lowering chosen for each layer and why (``group.layers``).
    """
    graphs = group.graphs
    context = Context(len(group.members), prefix)
    values: dict[tuple[str, int, int], Value] = {
        ("input", index, 0): Value(tensor, "shared", tuple(tensor.shape[1:]))
        for index, tensor in enumerate(inputs)
    }
    for index, step in enumerate(graphs[0].steps):
        arguments = [values[position] for position in step.inbound]
        if isinstance(step, OpStep):  # the same constants in every member (its signature)
            entry = OPERATIONS.get(type(step.layer).__name__)
            if entry is None:
                raise Unsupported(f"{describe(step.layer)} has no fused lowering.")
            values[("step", index, 0)] = entry.lower(context, step, arguments)
            continue
        members_layers = [graph.steps[index].layer for graph in graphs]
        entry = LAYERS.get(type(members_layers[0]).__name__)
        if entry is None:
            raise Unsupported(f"{describe(members_layers[0])} has no fused lowering.")
        values[("step", index, 0)] = entry.lower(context, members_layers, arguments)
    group.layers = context.records
    return [context.mid(values[position]) for position in graphs[0].outputs]


# Layers without weights -----------------------------------------------------------------


@layers(
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
)
def identity(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    context.record(layers[0], "identity", "inactive at inference")
    return arguments[0]


def _last_axis_only(layer: Any, where: str, *, flag: str | None = None) -> None:
    """Refuse a layer acting on axes other than the last (or with ``flag`` set)."""
    config = layer.get_config()
    axis = config.get("axis")
    if isinstance(axis, (list, tuple)):
        axis = axis[0] if len(axis) == 1 else None
    last = axis == -1 or (
        axis is not None and _has_input(layer) and axis == len(layer.input.shape) - 1
    )
    if not last or (flag and config.get(flag)):
        raise Unsupported(f"{where} acts on axes other than the last one (or uses {flag}).")


def _has_input(layer: Any) -> bool:
    try:
        layer.input  # noqa: B018 - raises for layers called more than once
    except (AttributeError, ValueError):
        return False
    return True


def _check_softmax(layer: Any, where: str) -> None:
    if type(layer).__name__ == "Softmax":
        _last_axis_only(layer, where)


@layers("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Rescaling", check=_check_softmax)
def elementwise(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    layer = context.clone(layers[0])
    kind = type(layers[0]).__name__
    if kind == "Softmax" or (
        kind == "Activation"
        and activation_name(layers[0].get_config()["activation"]) in LAST_AXIS_ACTIVATIONS
    ):
        context.record(layers[0], "once, per member's last axis", "no weights")
        return context.apply_last_axis(value, layer)
    context.record(layers[0], "once, elementwise", "no weights")
    return Value(layer(value.tensor), value.layout, value.shape)


@layers(
    *(f"{kind}{rank}D" for kind in ("MaxPooling", "AveragePooling") for rank in (1, 2, 3)),
    *(f"Global{kind}{rank}D" for kind in ("MaxPooling", "AveragePooling") for rank in (1, 2, 3)),
    *(f"{kind}{rank}D" for kind in ("ZeroPadding", "Cropping", "UpSampling") for rank in (1, 2, 3)),
)
def channelwise(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    """Layers that treat every channel on its own run unchanged on members side by side."""
    (value,) = arguments
    layer = context.clone(layers[0])
    if value.layout == "line":
        value = context.wide(value)
    tensor = layer(value.tensor)
    shape = tuple(tensor.shape[1:])
    if value.layout == "wide":
        shape = (*shape[:-1], shape[-1] // context.size)
    context.record(layers[0], "once, members' channels side by side", "acts on each channel")
    return Value(tensor, value.layout, shape)


@layers("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
def merge(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    return context.elementwise(layers[0], arguments, context.clone(layers[0]))


@layers("Flatten")
def flatten(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    if value.layout == "shared":
        context.record(layers[0], "once, shared", "same input for every member")
        return Value(context.clone(layers[0])(value.tensor), "shared", (math.prod(value.shape),))
    context.record(layers[0], "per member flatten", "flattens each member's tensor")
    return context.line(value)


@layers("Reshape")
def reshape(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    target = reshape_target(layers[0].get_config()["target_shape"], value.shape)
    return context.reshape(layers[0], value, target, context.clone(layers[0]))


def _check_concatenate(layer: Any, where: str) -> None:
    if not isinstance(layer.get_config().get("axis"), int):
        raise Unsupported(f"{where} has no integer axis.")


@layers("Concatenate", check=_check_concatenate)
def concatenate(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    axis = layers[0].get_config()["axis"]
    if {value.layout for value in arguments} == {"shared"}:
        context.record(layers[0], "once, shared", "same inputs for every member")
        tensor = context.clone(layers[0])([value.tensor for value in arguments])
        return Value(tensor, "shared", tuple(tensor.shape[1:]))
    rank = len(arguments[0].shape)
    axis = axis if axis >= 0 else rank + 1 + axis  # in (batch, *shape)
    tensor = context.ops.concatenate([context.mid(value) for value in arguments], axis=axis + 1)
    context.record(layers[0], "per member concatenation", "keeps members apart")
    return context.from_mid(tensor, tuple(tensor.shape[2:]))


# Layers with weights --------------------------------------------------------------------


@layers("Dense")
def dense(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    first = layers[0]
    config = first.get_config()
    use_bias = config["use_bias"]
    weights = context.weights(layers)
    units = config["units"]
    kernel = np.concatenate([w[0] for w in weights], axis=-1)
    parts = [kernel]
    if use_bias:
        parts.append(np.concatenate([w[1] for w in weights]))
    if value.layout == "shared" and len(value.shape) > 1:
        layer = context.keras.layers.Dense(
            units * context.size, use_bias=use_bias, name=context.name(first)
        )
        tensor = layer(value.tensor)
        layer.set_weights(parts)
        context.record(
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
            tensor, groups = context.ops.reshape(value.tensor, (1, 1, -1, value.shape[0])), 1
            lowering = "one 1x1 convolution over the concatenated kernels, along the batch"
            why = "every member reads the same input: one matmul instead of G"
        else:
            tensor, groups = context.line(value).tensor, context.size
            lowering = f"grouped 1x1 convolution (groups={groups}), along the batch"
            why = "one batched matmul with fused bias and activation instead of G matmuls"
        layer = context.keras.layers.Conv2D(
            units * context.size, 1, groups=groups, use_bias=use_bias, name=context.name(first)
        )
        tensor = layer(tensor)
        parts[0] = kernel[None, None]
        layer.set_weights(parts)
        context.record(first, lowering, why)
        result = Value(tensor, "line", (units,))
    return context.activation(result, config["activation"], context.name(first, "_activation"))


def _check_batch_normalization(layer: Any, where: str) -> None:
    _last_axis_only(layer, where, flag="renorm")


@layers("BatchNormalization", check=_check_batch_normalization)
def batch_normalization(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    first = layers[0]
    params = [_batchnorm_params(layer) for layer in layers]
    if value.layout == "shared" and all(
        all(np.array_equal(a, b) for a, b in zip(params[0], other)) for other in params[1:]
    ):
        context.record(first, "once, shared", "identical in every member, same input")
        return Value(context.clone(first)(value.tensor), "shared", value.shape)
    if value.layout != "line":
        value = context.wide(value)
    layer = context.keras.layers.BatchNormalization(
        axis=-1, epsilon=first.get_config()["epsilon"], name=context.name(first)
    )
    tensor = layer(value.tensor)
    layer.set_weights([np.concatenate(part) for part in zip(*params)])
    context.record(first, "once, members' channels side by side", "acts on each channel")
    return Value(tensor, value.layout, value.shape)


def _batchnorm_params(layer: Any) -> list[np.ndarray]:
    scale, offset = _scale_offset(layer, int(layer.moving_mean.shape[0]))
    return [scale, offset, np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)]


def _check_layer_normalization(layer: Any, where: str) -> None:
    _last_axis_only(layer, where, flag="rms_scaling")


@layers("LayerNormalization", check=_check_layer_normalization)
def layer_normalization(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    first = layers[0]
    norm = context.keras.layers.LayerNormalization(
        axis=-1,
        epsilon=first.get_config()["epsilon"],
        center=False,
        scale=False,
        name=context.name(first),
    )
    channels = value.shape[-1]
    if value.layout == "shared":
        normalized = Value(norm(value.tensor), "shared", value.shape)
    else:
        normalized = context.from_mid(norm(context.mid(value)), value.shape)
    scales, offsets = zip(*(_scale_offset(layer, channels) for layer in layers))
    normalized = context.wide(normalized)
    affine = context.keras.layers.BatchNormalization(
        axis=-1, epsilon=0.0, name=context.name(first, "_affine")
    )
    tensor = affine(normalized.tensor)
    affine.set_weights(
        [
            np.concatenate(scales),
            np.concatenate(offsets),
            np.zeros(channels * context.size, np.float32),
            np.ones(channels * context.size, np.float32),
        ]
    )
    context.record(
        first,
        "normalization per member, then one affine over members side by side",
        "statistics per member, scale and offset per channel",
    )
    return Value(tensor, "wide", value.shape)


def _check_normalization(layer: Any, where: str) -> None:
    _last_axis_only(layer, where)


@layers("Normalization", check=_check_normalization)
def normalization(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    first = layers[0]
    means = [np.asarray(layer.mean, np.float32).reshape(-1) for layer in layers]
    variances = [np.asarray(layer.variance, np.float32).reshape(-1) for layer in layers]
    invert = first.get_config().get("invert", False)
    if value.layout == "shared" and all(
        np.array_equal(means[0], m) and np.array_equal(variances[0], v)
        for m, v in zip(means[1:], variances[1:])
    ):
        context.record(first, "once, shared", "identical statistics in every member")
        layer = context.keras.layers.Normalization(
            axis=-1, mean=means[0], variance=variances[0], invert=invert, name=context.name(first)
        )
        return Value(layer(value.tensor), "shared", value.shape)
    if value.layout != "line":
        value = context.wide(value)
    layer = context.keras.layers.Normalization(
        axis=-1,
        mean=np.concatenate(means),
        variance=np.concatenate(variances),
        invert=invert,
        name=context.name(first),
    )
    context.record(first, "once, members' channels side by side", "statistics per channel")
    return Value(layer(value.tensor), value.layout, value.shape)


def _check_depthwise(layer: Any, where: str) -> None:
    if layer.get_config().get("depth_multiplier", 1) < 1:
        raise Unsupported(f"{where} has no positive depth multiplier.")


@layers("Conv1D", "Conv2D", "DepthwiseConv2D", check=_check_depthwise)
def convolution(context: Context, layers: list[Any], arguments: list[Value]) -> Value:
    (value,) = arguments
    first = layers[0]
    depthwise = type(first).__name__ == "DepthwiseConv2D"
    config = dict(first.get_config())
    activation = config.pop("activation", "linear")
    weights = context.weights(layers)
    use_bias = config["use_bias"]
    config["name"] = context.name(first)
    config["activation"] = "linear"
    if depthwise:
        value = context.wide(value)
        kernel = np.concatenate([w[0] for w in weights], axis=2)
        lowering = "one depthwise convolution over members side by side"
        why = "acts on each channel"
    elif value.layout == "shared" and config.get("groups", 1) == 1:
        kernel = np.concatenate([w[0] for w in weights], axis=-1)
        config["filters"] = config["filters"] * context.size
        lowering = "one convolution over the concatenated filters"
        why = "every member reads the same input: one convolution instead of G"
    else:
        value = context.wide(value)
        kernel = np.concatenate([w[0] for w in weights], axis=-1)
        config["filters"] = config["filters"] * context.size
        config["groups"] = config.get("groups", 1) * context.size
        lowering = f"grouped convolution (groups={config['groups']})"
        why = "one convolution replaces G"
    layer = type(first).from_config(config)
    tensor = layer(value.tensor)
    parts = [kernel]
    if use_bias:
        parts.append(np.concatenate([w[1] for w in weights]))
    layer.set_weights(parts)
    context.record(first, lowering, why)
    channels = tensor.shape[-1] // context.size
    result = Value(tensor, "wide", (*tensor.shape[1:-1], channels))
    return context.activation(result, activation, context.name(first, "_activation"))


def _scale_offset(layer: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A normalization layer's gamma and beta, ones and zeros where it has none."""
    gamma = np.ones(channels) if layer.gamma is None else np.asarray(layer.gamma)
    beta = np.zeros(channels) if layer.beta is None else np.asarray(layer.beta)
    return gamma.astype(np.float32), beta.astype(np.float32)


# keras.ops operations -------------------------------------------------------------------
# Told apart from layers by type, never by class name (``Add``, ``Multiply``, ``Reshape``,
# ``Softmax``... name layers too). Checks get ``shapes`` (the tensor arguments', batch
# aside), ``output`` (likewise), ``config`` (the op's, name removed), ``args`` and
# ``kwargs`` (constants in place, tensors as ``Slot``s).


def call_operation(
    context: Context, step: OpStep, tensors: Sequence[Any], constant: Callable | None = None
) -> Any:
    """The step's operation, new and uniquely named, called on ``tensors`` in the places of
    its tensor arguments and its constants (through ``constant``) in theirs."""
    op = step.layer
    fresh = type(op).from_config({**op.get_config(), "name": context.name(op)})

    def argument(value: Any) -> Any:
        if isinstance(value, Slot):
            return tensors[value.index]
        return value if constant is None else constant(value)

    return fresh(
        *[argument(value) for value in step.args],
        **{name: argument(value) for name, value in step.kwargs},
    )


def _one_tensor(op: Any, where: str, *, shapes: list, **facts: Any) -> None:
    if len(shapes) != 1:
        raise Unsupported(f"{where} takes {len(shapes)} tensors; expected one.")


@operations(
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
    check=_one_tensor,
)
def unary_operation(context: Context, step: OpStep, arguments: list[Value]) -> Value:
    """Elementwise on one tensor; static arguments (alpha, x_min...) are in its config."""
    (value,) = arguments
    context.record(step.layer, "once, elementwise", "no weights")
    return Value(call_operation(context, step, [value.tensor]), value.layout, value.shape)


def _check_binary(
    op: Any, where: str, *, shapes: list, args: tuple, kwargs: tuple, **facts: Any
) -> None:
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
                f"{where} takes a constant of shape {shape}; fusion supports scalars and "
                "constants along the last axis."
            )


@operations(
    "Add",
    "Subtract",
    "Multiply",
    "Divide",
    "TrueDivide",
    "Maximum",
    "Minimum",
    "Power",
    check=_check_binary,
)
def binary_operation(context: Context, step: OpStep, arguments: list[Value]) -> Value:
    """Elementwise on two arguments, tensors or constants, broadcasting; order kept."""

    def call(tensors: Sequence[Any]) -> Any:
        return call_operation(context, step, tensors)

    if len(arguments) > 1:
        return context.elementwise(step.layer, arguments, call)
    (value,) = arguments
    constants = [
        item for item in [*step.args, *dict(step.kwargs).values()] if not isinstance(item, Slot)
    ]
    if value.layout == "shared" or all(np.size(item) == 1 for item in constants):
        context.record(step.layer, "once, with its constant", "the same constant for every member")
        return Value(call([value.tensor]), value.layout, value.shape)

    def tiled(item: Any) -> Any:  # along the last axis (checked): one copy per member
        if np.size(item) == 1:
            return item
        return np.tile(np.asarray(item).reshape(-1), context.size)

    context.record(
        step.layer,
        "once, with its constant repeated for each member's channels",
        "a constant along the last axis, the same for every member",
    )
    return Value(call_operation(context, step, [value.tensor], tiled), value.layout, value.shape)


def _check_last_axis(op: Any, where: str, *, shapes: list, config: dict, **facts: Any) -> None:
    _one_tensor(op, where, shapes=shapes)
    axis = config.get("axis", -1)
    if not isinstance(axis, int) or axis not in (-1, len(shapes[0])):
        raise Unsupported(f"{where} acts on axis {axis!r}, not on the last one.")


@operations("Softmax", "LogSoftmax", check=_check_last_axis)
def last_axis_operation(context: Context, step: OpStep, arguments: list[Value]) -> Value:
    """Over each member's last axis, never across members."""
    (value,) = arguments
    context.record(step.layer, "once, per member's last axis", "no weights")
    return context.apply_last_axis(value, lambda tensor: call_operation(context, step, [tensor]))


def _check_reshape(
    op: Any, where: str, *, shapes: list, output: tuple, config: dict, **facts: Any
) -> None:
    _one_tensor(op, where, shapes=shapes)
    target = tuple(config.get("newshape") or ())
    if len(target) < 2 or target[0] not in (-1, None) or math.prod(output) != math.prod(shapes[0]):
        raise Unsupported(
            f"{where} reshapes to {target}, moving values across the batch axis; fusion "
            "supports reshapes that keep the batch first."
        )


@operations("Reshape", check=_check_reshape)
def reshape_operation(context: Context, step: OpStep, arguments: list[Value]) -> Value:
    (value,) = arguments
    target = reshape_target(step.layer.get_config()["newshape"][1:], value.shape)
    return context.reshape(
        step.layer, value, target, lambda tensor: context.ops.reshape(tensor, (-1, *target))
    )


@operations("Cast", check=_one_tensor)
def cast_operation(context: Context, step: OpStep, arguments: list[Value]) -> Value:
    context.record(step.layer, "identity", "a cast from float32 to float32")
    return arguments[0]
