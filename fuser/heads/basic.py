"""The heads that combine every member's output: mean, weighted, median, geometric, vote."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fuser.errors import FuseError
from fuser.heads.base import Head, normalised_weights, weight_count_problems
from fuser.heads.distributions import (
    CLASSIFICATION,
    REGRESSION,
    answer,
    distribution,
    log_distribution,
    member_axis_last,
    np_answer,
    np_distribution,
    np_log_distribution,
    np_softmax,
)


class MeanHead(Head):
    """The arithmetic mean (soft voting): of the probabilities for classifiers."""

    name = "mean"

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        if task == REGRESSION:
            return ops.mean(values, axis=1)
        return answer(ops.mean(distribution(values, task), axis=1), values.shape[-1])

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        if task == REGRESSION:
            return values.astype(np.float64).mean(axis=0)
        return np_answer(np_distribution(values, task).mean(axis=0), values.shape[-1])


class WeightedHead(Head):
    """A weighted mean; weights are normalised to sum to one."""

    name = "weighted"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        if weights is None:
            raise FuseError(
                "The 'weighted' head needs weights: --weights 0.5,0.3,0.2 (one per member), or "
                "--select greedy:K with --fit-data to learn them."
            )
        self.weights = normalised_weights(weights)

    def params(self) -> dict[str, Any]:
        return {"weights": [round(float(weight), 10) for weight in self.weights]}

    def problems(self, *, n_members: int, tasks: dict[str, str], shapes: dict) -> list[str]:
        problems = super().problems(n_members=n_members, tasks=tasks, shapes=shapes)
        return problems + weight_count_problems(self.weights, n_members)

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        import keras
        from keras import ops

        columns = values.shape[-1]
        if task != REGRESSION:
            values = distribution(values, task)
        # The weights travel as the kernel of a bias-free Dense layer over the member axis:
        # plain layer weights, which every artifact format stores and ONNX freezes.
        layer = keras.layers.Dense(1, use_bias=False, trainable=False, name=f"{output}_weights")
        combined = ops.squeeze(layer(member_axis_last(values)), axis=-1)
        layer.set_weights([self.weights.astype(np.float32)[:, None]])
        return combined if task == REGRESSION else answer(combined, columns)

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        columns = values.shape[-1]
        values = values.astype(np.float64)
        if task != REGRESSION:
            values = np_distribution(values, task)
        combined = np.tensordot(self.weights, values, axes=1)
        return combined if task == REGRESSION else np_answer(combined, columns)


class MedianHead(Head):
    """The element-wise median; for classifiers renormalised to a distribution."""

    name = "median"

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        columns = values.shape[-1]
        if task != REGRESSION:
            values = distribution(values, task)
        members = values.shape[1]
        # top_k sorts along the last axis and converts to every format (ONNX TopK).
        ordered, _ = ops.top_k(member_axis_last(values), k=members)
        middle = members // 2
        if members % 2:
            median = ordered[..., middle]
        else:
            median = (ordered[..., middle - 1] + ordered[..., middle]) / 2.0
        if task == REGRESSION:
            return median
        return answer(median / ops.sum(median, axis=-1, keepdims=True), columns)

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        columns = values.shape[-1]
        values = values.astype(np.float64)
        if task == REGRESSION:
            return np.median(values, axis=0)
        median = np.median(np_distribution(values, task), axis=0)
        return np_answer(median / median.sum(axis=-1, keepdims=True), columns)


class GeometricHead(Head):
    """The normalised geometric mean of probabilities: softmax of the mean log-probability."""

    name = "geometric"
    tasks = CLASSIFICATION

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        mean_log = ops.mean(log_distribution(values, task), axis=1)
        return answer(ops.softmax(mean_log, axis=-1), values.shape[-1])

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        mean_log = np_log_distribution(values, task).mean(axis=0)
        return np_answer(np_softmax(mean_log), values.shape[-1])


class VoteHead(Head):
    """Hard majority voting: each class's share of the members' votes.

    The argmax of the shares is the majority label, ties going to the lowest class index
    (scikit-learn's ``VotingClassifier(voting="hard")``); a member's own ties go to its
    lowest class index too (``argmax``).
    """

    name = "vote"
    tasks = CLASSIFICATION

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        from keras import ops

        probabilities = distribution(values, task)
        # One-hot of each member's argmax, ties to the lowest class, without argmax: Keras
        # lowers argmax with Bitcast ops that ONNX lacks. The first maximal entry is the
        # one where the running count of maximal entries reaches one.
        highest = ops.max(probabilities, axis=-1, keepdims=True)
        maximal = ops.cast(ops.greater_equal(probabilities, highest), "float32")
        votes = maximal * ops.cast(ops.equal(ops.cumsum(maximal, axis=-1), 1.0), "float32")
        return answer(ops.mean(votes, axis=1), values.shape[-1])

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        probabilities = np_distribution(values, task)
        classes = probabilities.shape[-1]
        votes = np.eye(classes)[np.argmax(probabilities, axis=-1)]
        return np_answer(votes.mean(axis=0), values.shape[-1])
