"""A member's graph as steps: what horizontal fusion reads and lowers, and its one error."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class Unsupported(Exception):
    """A member's graph cannot be fused; the message names the layer (or operation) and why."""


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
    """A member's graph as steps, where its outputs come from, and its architecture: two
    members with equal signatures compute the same function of different weights."""

    steps: list[Step]
    outputs: list[tuple[str, int, int]]
    signature: Any


def op_label(op: Any) -> str:
    """How a user wrote the operation: ``keras.ops.hard_sigmoid`` for ``HardSigmoid``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", type(op).__name__)
    return "keras.ops." + re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def kind_of(operation: Any) -> str:
    """A layer's class name (``Multiply``), or an operation's ``keras.ops.multiply``."""
    import keras

    if isinstance(operation, keras.layers.Layer):
        return type(operation).__name__
    return op_label(operation)


def describe(operation: Any) -> str:
    """``layer 'gate' (Multiply)`` or ``operation 'add' (keras.ops.add)``, for messages."""
    import keras

    what = "layer" if isinstance(operation, keras.layers.Layer) else "operation"
    return f"{what} {operation.name!r} ({kind_of(operation)})"


def activation_name(activation: Any) -> str:
    """The name of a layer's activation, as its config gives it in any of Keras' forms."""
    if isinstance(activation, str):
        return activation
    if isinstance(activation, dict):
        return str(activation.get("config", activation.get("class_name", "")))
    return getattr(activation, "__name__", repr(activation))
