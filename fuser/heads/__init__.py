"""Combining heads: how the members' outputs become the ensemble's answer.

Every head has two faces that must agree: ``combine`` builds it inside the fused Keras
graph (so every artifact format carries it), ``reference`` computes the same thing in
NumPy on the members' outputs (the build verifies one against the other). Both see the
members of one output stacked on axis 1 (graph: ``(batch, members, ...)``) or axis 0
(NumPy: ``(members, batch, ...)``).

Classification heads work on class distributions: members that output logits are turned
into probabilities first, and a one-column output (sigmoid or a single logit) is read as
the probability of the positive class. Their answer is always probabilities, in the
members' layout. Heads are built from built-in Keras layers and ``keras.ops`` only, so a
``.keras`` artifact loads in safe mode without registering any fuser class.

The ``cascade`` head is the exception: it routes rows, so each runs only the members it
needs, and is built around the members (``fuser.assembly``) as one registered layer,
``runtime.cascade.Cascade``, which the runtime imports before it loads a ``.keras``
artifact. Its NumPy face is ``np_route``; ``fuser.heads.calibration`` calibrates it.

``HEADS`` declares the heads; ``make_head`` is the one place their options are checked.
"""

from __future__ import annotations

from collections.abc import Sequence

from fuser.errors import FuseError
from fuser.heads.base import Head, normalised_weights
from fuser.heads.basic import GeometricHead, MeanHead, MedianHead, VoteHead, WeightedHead
from fuser.heads.cascade import CONFIDENCES, CascadeHead, Routing, np_confidence, np_route
from fuser.heads.distributions import (
    CLASSIFICATION,
    LOG_FLOOR,
    LOGITS,
    PROBABILITIES,
    REGRESSION,
    TASKS,
    answer,
    distribution,
    log_distribution,
    np_answer,
    np_distribution,
    np_log_distribution,
    np_softmax,
)
from fuser.heads.stacker import StackHead

__all__ = [
    "CLASSIFICATION",
    "CONFIDENCES",
    "HEADS",
    "LOGITS",
    "LOG_FLOOR",
    "PROBABILITIES",
    "REGRESSION",
    "TASKS",
    "CascadeHead",
    "GeometricHead",
    "Head",
    "MeanHead",
    "MedianHead",
    "Routing",
    "StackHead",
    "VoteHead",
    "WeightedHead",
    "answer",
    "distribution",
    "log_distribution",
    "make_head",
    "normalised_weights",
    "np_answer",
    "np_confidence",
    "np_distribution",
    "np_log_distribution",
    "np_route",
    "np_softmax",
]

HEADS: dict[str, type[Head]] = {
    head.name: head
    for head in (
        MeanHead,
        WeightedHead,
        MedianHead,
        GeometricHead,
        VoteHead,
        StackHead,
        CascadeHead,
    )
}
# The cascade's own options (``fuser.build`` keyword, CLI flag).
CASCADE_OPTIONS = {
    "cascade_order": "--cascade-order",
    "cascade_tolerance": "--cascade-tolerance",
    "cascade_confidence": "--cascade-confidence",
    "cascade_exit_stage": "--cascade-exit-stage",
}


def make_head(
    head: str | Head,
    *,
    weights: Sequence[float] | None = None,
    cascade_order: Sequence[str] | None = None,
    cascade_tolerance: float | None = None,
    cascade_confidence: str | None = None,
    cascade_exit_stage: bool = False,
) -> Head:
    """The head named ``head`` configured with its options, or ``head`` itself if a Head.

    Raises:
        FuseError: an unknown head, or options that head does not take.
    """
    cascade = {
        "cascade_order": cascade_order,
        "cascade_tolerance": cascade_tolerance,
        "cascade_confidence": cascade_confidence,
        "cascade_exit_stage": cascade_exit_stage or None,
    }
    given = [CASCADE_OPTIONS[key] for key, value in cascade.items() if value is not None]
    name = head.name if isinstance(head, Head) else head
    if given and name != "cascade":
        raise FuseError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the 'cascade' "
            f"head, not {name!r}; pass --head cascade."
        )
    if isinstance(head, Head):
        if given:
            raise FuseError(f"Give {', '.join(given)} to the CascadeHead itself, not beside it.")
        return head
    if head not in HEADS:
        raise FuseError(f"Unknown head {head!r}; choose one of: {', '.join(HEADS)}.")
    if head == "weighted":
        return WeightedHead(weights)
    if head == "cascade":
        return CascadeHead(
            weights,
            order=cascade_order,
            tolerance=cascade_tolerance,
            confidence=cascade_confidence,
            exit_stage=bool(cascade_exit_stage),
        )
    if weights is not None:
        raise FuseError(
            f"--weights applies to the 'weighted' head (and 'cascade'), not {head!r}; pass "
            "--head weighted."
        )
    return HEADS[head]()
