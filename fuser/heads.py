"""Combining heads: how the members' outputs become the ensemble's answer.

Every head has two faces that must agree: ``combine`` builds it inside the fused
Keras graph (so it is exported to every artifact format), ``reference`` computes the
same thing in NumPy on the members' outputs (the build verifies one against the other).
Heads are declared in ``HEADS``; ``make_head`` is the one place options are validated.
Heads use built-in Keras layers only, so a ``.keras`` artifact loads in safe mode
without registering any fuser class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fuser.errors import FuseError


class Head:
    """Base class. A head sees one fused output at a time, as a list of member tensors."""

    name: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """Parameters recorded in the manifest."""
        return {}

    def combine(self, member_outputs: list[Any], *, output_name: str) -> Any:
        """The combined Keras tensor for one output, from each member's tensor."""
        raise NotImplementedError

    def reference(self, member_outputs: np.ndarray) -> np.ndarray:
        """NumPy reference: ``member_outputs`` has shape ``(n_members, batch, ...)``."""
        raise NotImplementedError


class MeanHead(Head):
    """The arithmetic mean of the members' outputs, element by element."""

    name = "mean"

    def combine(self, member_outputs: list[Any], *, output_name: str) -> Any:
        import keras

        if len(member_outputs) == 1:
            return keras.layers.Identity(name=f"{output_name}_mean")(member_outputs[0])
        return keras.layers.Average(name=f"{output_name}_mean")(member_outputs)

    def reference(self, member_outputs: np.ndarray) -> np.ndarray:
        return member_outputs.astype(np.float64).mean(axis=0)


HEADS: dict[str, type[Head]] = {head.name: head for head in (MeanHead,)}


def make_head(head: str | Head, **options: Any) -> Head:
    """The head named ``head`` configured with ``options``, or ``head`` itself if it is a Head.

    Raises:
        FuseError: unknown head name or options that head does not take.
    """
    if isinstance(head, Head):
        return head
    if head not in HEADS:
        raise FuseError(f"Unknown head {head!r}; choose one of: {', '.join(HEADS)}.")
    try:
        return HEADS[head](**options)
    except TypeError:
        raise FuseError(f"The {head!r} head takes no options {sorted(options)}.") from None
