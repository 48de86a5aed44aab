"""Extra outputs computed in the same forward pass: disagreement, uncertainty, the members.

``std``: population standard deviation across members, per output element (of the
probabilities for classifiers, of the values for regressors). For classifiers also
``entropy`` of the combined prediction and ``mutual_info``, the entropy of the members'
mean minus the members' mean entropy: how much the members disagree. ``members``
(``--expose-members``) is every member's raw output, ``(batch, members, ...)``.

Entropies are in nats. For a one-output ensemble the outputs are called ``std``,
``entropy``, ``mutual_info`` and ``members``; with several outputs each is prefixed with
its output's name (``probs_std``). Like the heads, every output has a graph face and a
NumPy face that the build checks against each other. A cascade (``--head cascade``)
computes them over the members each row ran (``ran_graph``; the NumPy face is
``reference`` on those members).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fuser.heads import (
    LOG_FLOOR,
    REGRESSION,
    answer,
    distribution,
    np_answer,
    np_distribution,
)

EXTRAS = ("std", "entropy", "mutual_info", "members")


def extra_name(kind: str, output: str, single_output: bool) -> str:
    return kind if single_output else f"{output}_{kind}"


def kinds(task: str, *, uncertainty: bool, expose_members: bool) -> list[str]:
    """The extra outputs one output gets."""
    chosen = []
    if uncertainty:
        chosen += ["std"] if task == REGRESSION else ["std", "entropy", "mutual_info"]
    if expose_members:
        chosen.append("members")
    return chosen


def graph(kind: str, values: Any, prediction: Any, task: str) -> Any:
    """The Keras tensor of one extra output; ``values`` is ``(batch, members, ...)``."""
    from keras import ops

    if kind == "members":
        return ops.cast(values, "float32")
    columns = values.shape[-1]
    if kind == "std":
        spread = values if task == REGRESSION else answer(distribution(values, task), columns)
        return ops.std(spread, axis=1)
    if kind == "entropy":
        return _entropy(distribution(prediction, "probabilities"))
    if kind == "mutual_info":
        members = distribution(values, task)
        return _entropy(ops.mean(members, axis=1)) - ops.mean(_entropy(members), axis=1)
    raise ValueError(kind)


def ran_graph(kind: str, probabilities: Any, ran: Any, prediction: Any, columns: int) -> Any:
    """``graph`` over the members each row ran (a cascade): ``probabilities`` is
    ``(batch, members, classes)`` with zeros where a row did not run a member, ``ran`` is
    ``(batch, members)``, 1.0 where it did. Classifiers only; ``members`` is not offered
    (a cascade runs only some members per row)."""
    from keras import ops

    count = ops.sum(ran, axis=1, keepdims=True)  # at least one: every row runs stage 1
    weights = ops.expand_dims(ran / count, -1)  # (batch, members, 1)
    mean = ops.sum(probabilities * weights, axis=1)
    if kind == "std":
        deviation = probabilities - ops.expand_dims(mean, 1)
        return answer(ops.sqrt(ops.sum(deviation * deviation * weights, axis=1)), columns)
    if kind == "entropy":
        return _entropy(distribution(prediction, "probabilities"))
    if kind == "mutual_info":
        member_entropy = _entropy(probabilities)  # (batch, members)
        return _entropy(mean) - ops.sum(member_entropy * ran, axis=1) / ops.squeeze(count, -1)
    raise ValueError(kind)


def reference(kind: str, values: np.ndarray, prediction: np.ndarray, task: str) -> np.ndarray:
    """NumPy twin of ``graph``; ``values`` is ``(members, batch, ...)``."""
    values = values.astype(np.float64)
    if kind == "members":
        return np.moveaxis(values, 0, 1)
    columns = values.shape[-1]
    if kind == "std":
        spread = values if task == REGRESSION else np_answer(np_distribution(values, task), columns)
        return spread.std(axis=0)
    if kind == "entropy":
        return _np_entropy(np_distribution(prediction, "probabilities"))
    if kind == "mutual_info":
        members = np_distribution(values, task)
        return _np_entropy(members.mean(axis=0)) - _np_entropy(members).mean(axis=0)
    raise ValueError(kind)


def _entropy(probabilities: Any) -> Any:
    from keras import ops

    return -ops.sum(probabilities * ops.log(ops.maximum(probabilities, LOG_FLOOR)), axis=-1)


def _np_entropy(probabilities: np.ndarray) -> np.ndarray:
    return -np.sum(probabilities * np.log(np.maximum(probabilities, LOG_FLOOR)), axis=-1)
