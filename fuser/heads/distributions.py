"""Tasks and class distributions, in the graph (keras.ops) and in NumPy, alike."""

from __future__ import annotations

from typing import Any

import numpy as np

PROBABILITIES, LOGITS, REGRESSION = "probabilities", "logits", "regression"
TASKS = (PROBABILITIES, LOGITS, REGRESSION)
CLASSIFICATION = frozenset({PROBABILITIES, LOGITS})
# Probabilities are clipped here before a log: float32 softmax outputs reach exactly 0.
LOG_FLOOR = 1e-12


# -- class distributions, in the graph and in NumPy --------------------------------------


def distribution(values: Any, task: str) -> Any:
    """Graph: member outputs as class distributions on the last axis."""
    from keras import ops

    if values.shape[-1] == 1:
        positive = ops.sigmoid(values) if task == LOGITS else values
        return ops.concatenate([1.0 - positive, positive], axis=-1)
    return ops.softmax(values, axis=-1) if task == LOGITS else values


def log_distribution(values: Any, task: str) -> Any:
    """Graph: log-probabilities, computed from logits directly where members give logits."""
    from keras import ops

    if task == LOGITS:
        if values.shape[-1] == 1:
            return ops.concatenate([ops.log_sigmoid(-values), ops.log_sigmoid(values)], axis=-1)
        return ops.log_softmax(values, axis=-1)
    return ops.log(ops.maximum(distribution(values, task), LOG_FLOOR))


def answer(probabilities: Any, columns: int) -> Any:
    """Graph: a class distribution back in the members' layout (one column: P(positive))."""
    return probabilities[..., 1:] if columns == 1 else probabilities


def np_distribution(values: np.ndarray, task: str) -> np.ndarray:
    values = values.astype(np.float64)
    if values.shape[-1] == 1:
        positive = 1.0 / (1.0 + np.exp(-values)) if task == LOGITS else values
        return np.concatenate([1.0 - positive, positive], axis=-1)
    return np_softmax(values) if task == LOGITS else values


def np_log_distribution(values: np.ndarray, task: str) -> np.ndarray:
    values = values.astype(np.float64)
    if task == LOGITS:
        if values.shape[-1] == 1:
            return np.concatenate([-np.logaddexp(0, values), -np.logaddexp(0, -values)], axis=-1)
        shifted = values - values.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.log(np.maximum(np_distribution(values, task), LOG_FLOOR))


def np_answer(probabilities: np.ndarray, columns: int) -> np.ndarray:
    return probabilities[..., 1:] if columns == 1 else probabilities


def np_softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def member_axis_last(values: Any) -> Any:
    from keras import ops

    return ops.moveaxis(values, 1, -1)
