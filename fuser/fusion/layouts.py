"""Fused tensors and their layouts: the context every lowering works in.

A fused tensor holds one value per member of a group of G, in one of three layouts,
converted where a lowering needs another:

- ``shared``: the same ``(batch, *shape)`` tensor for every member (the input, and
  whatever weight-free or identical layers do to it);
- ``wide``: ``(batch, *shape[:-1], G * C)``, the members' channels side by side;
- ``line``: ``(1, 1, batch, G * features)`` for one-dimensional member tensors, the
  batch as the width of an image, for ``Dense`` layers as convolutions.

``mid``, ``(batch, G, *shape)``, is the form a group's outputs leave in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuser.fusion.steps import Unsupported, activation_name, describe, kind_of

# Activations over the last axis: per member, never across members.
LAST_AXIS_ACTIVATIONS = frozenset({"softmax", "log_softmax", "sparsemax"})


@dataclass
class Value:
    """A fused tensor: its layout and each member's shape (batch excluded)."""

    tensor: Any
    layout: str  # "shared" | "wide" | "line"
    shape: tuple[int, ...]


class Context:
    """One group's fused sub-graph in the making: layout conversions, unique layer names,
    and the record of what each layer became (for the manifest)."""

    def __init__(self, size: int, prefix: str) -> None:
        import keras
        from keras import ops

        self.keras, self.ops = keras, ops
        self.size = size  # members in the group
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
            {"layer": layer.name, "type": kind_of(layer), "lowering": lowering, "why": why}
        )

    def clone(self, layer: Any, suffix: str = "") -> Any:
        """A new layer of the same config, uniquely named."""
        config = layer.get_config()
        config["name"] = self.name(layer, suffix)
        return type(layer).from_config(config)

    @staticmethod
    def weights(layers: Sequence[Any]) -> list[list[np.ndarray]]:
        """Per member, the layer's weights as NumPy arrays."""
        return [[np.asarray(w) for w in layer.get_weights()] for layer in layers]

    def activation(self, value: Value, activation: Any, name: str) -> Value:
        kind = activation_name(activation)
        if kind == "linear":
            return value
        layer = self.keras.layers.Activation(activation, name=name)
        if kind in LAST_AXIS_ACTIVATIONS:
            return self.apply_last_axis(value, layer)
        return Value(layer(value.tensor), value.layout, value.shape)

    def elementwise(self, layer: Any, arguments: list[Value], apply: Callable) -> Value:
        """``apply`` (a merge layer's or a binary operation's call on a list of tensors) on
        ``arguments``, broadcasting between them as within each member: in their common
        layout where their shapes are equal, with members side by side (``wide``) where
        only axes other than the last differ (an SE block's ``(1, 1, C)`` gate), with
        members apart (``mid``) where the last axes differ."""
        shapes = [value.shape for value in arguments]
        if len({len(shape) for shape in shapes}) > 1 or not all(shapes):
            raise Unsupported(
                f"{describe(layer)} combines tensors of shapes {', '.join(map(str, shapes))} "
                "(batch aside); fusion supports inputs of one rank, at least 1."
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

    def reshape(self, layer: Any, value: Value, target: tuple[int, ...], shared: Callable) -> Value:
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

    def apply_last_axis(self, value: Value, layer: Callable) -> Value:
        """A layer acting on each member's last axis (softmax): never mix members' channels."""
        if value.layout == "shared":
            return Value(layer(value.tensor), value.layout, value.shape)
        tensor = layer(self.mid(value))
        if value.layout == "line":
            tensor = self.ops.reshape(tensor, (1, 1, -1, self.size * value.shape[0]))
            return Value(tensor, "line", value.shape)
        return self.from_mid(tensor, value.shape)


def reshape_target(target: Sequence[int | None], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A member's reshape target without the batch, its one free dimension (-1) resolved."""
    target = tuple(-1 if dim is None else int(dim) for dim in target)
    if -1 in target:
        known = math.prod(dim for dim in target if dim != -1)
        target = tuple(math.prod(shape) // known if dim == -1 else dim for dim in target)
    return target
