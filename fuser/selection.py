"""Validation data, metrics, and ensemble selection (top-K, greedy forward selection).

Everything here works on the members' outputs on the validation data, computed once:
``values`` is ``(members, rows, ...)`` for one output. Selection never sees test data;
the stacker (``--head stack``) is fitted on the same validation data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuser.errors import FuseError
from fuser.heads import REGRESSION, np_answer, np_distribution
from runtime.manifest import TensorSpec

METRICS = {
    "log_loss": (False, "classification"),
    "accuracy": (True, "classification"),
    "mse": (False, "any"),
    "mae": (False, "any"),
}
STRATEGIES = ("top", "greedy")


@dataclasses.dataclass(frozen=True)
class FitData:
    """Validation inputs by fused input name, and targets by fused output name."""

    source: str
    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    rows: int


@dataclasses.dataclass(frozen=True)
class Selection:
    strategy: str
    size: int

    def describe(self) -> str:
        return f"{self.strategy}:{self.size}"


def parse_selection(text: str | None) -> Selection | None:
    """``top:K`` or ``greedy:K``.

    Raises:
        FuseError: any other form.
    """
    if text is None:
        return None
    strategy, _, size = str(text).partition(":")
    if strategy not in STRATEGIES or not size.isdigit() or int(size) < 1:
        raise FuseError(
            f"--select expects top:K or greedy:K with K a positive integer; got {text!r}."
        )
    return Selection(strategy, int(size))


def read_fit_data(
    fit_data: str | os.PathLike | dict[str, Any],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> FitData:
    """Read ``--fit-data``: arrays ``x``/``y``, or ``x_<input>``/``y_<output>`` when several.

    Raises:
        FuseError: a missing or unreadable file, missing arrays, or rows that disagree.
    """
    if isinstance(fit_data, dict):
        arrays, source = dict(fit_data), "fit_data"
    else:
        path = Path(fit_data)
        source = path.name
        if not path.is_file():
            raise FuseError(
                f"--fit-data {path} does not exist; expected an .npz file with x and y."
            )
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except Exception as error:  # numpy raises several kinds for a damaged file
            raise FuseError(
                f"--fit-data {path} is not a readable .npz file ({type(error).__name__}: {error})."
            ) from None
    problems: list[str] = []
    x = _pick(arrays, "x", [spec.name for spec in inputs], source, problems)
    y = _pick(arrays, "y", [spec.name for spec in outputs], source, problems)
    if problems:
        raise FuseError(problems)
    rows = {name: len(np.asarray(value)) for name, value in {**x, **y}.items()}
    if len(set(rows.values())) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in rows.items())
        raise FuseError(f"The arrays of {source} must have the same number of rows; got {listing}.")
    count = next(iter(rows.values()))
    if count < 2:
        raise FuseError(f"{source} has {count} rows; fitting and selection need at least 2.")
    return FitData(source, x, {name: np.asarray(value) for name, value in y.items()}, count)


def _pick(
    arrays: dict[str, Any], prefix: str, names: list[str], source: str, problems: list[str]
) -> dict[str, Any]:
    if len(names) == 1 and prefix in arrays:
        return {names[0]: arrays[prefix]}
    keys = {name: f"{prefix}_{name}" for name in names}
    missing = [key for key in keys.values() if key not in arrays]
    if missing:
        wanted = (
            f"'{prefix}'" if len(names) == 1 else ", ".join(f"'{key}'" for key in keys.values())
        )
        also = f" (or {', '.join(repr(key) for key in keys.values())})" if len(names) == 1 else ""
        problems.append(
            f"{source} has arrays {', '.join(repr(key) for key in arrays) or 'none'}; expected "
            f"{wanted}{also}."
        )
        return {}
    return {name: arrays[key] for name, key in keys.items()}


def prepare_targets(target: np.ndarray, output: TensorSpec, task: str, source: str) -> np.ndarray:
    """Targets as the heads and metrics want them: class indices, or values shaped like the output.

    Raises:
        FuseError: targets that do not fit the output, naming both shapes.
    """
    target = np.asarray(target)
    columns = output.shape[-1] if len(output.shape) > 1 else 1
    if task != REGRESSION:
        classes = 2 if columns == 1 else columns
        if target.ndim == 2 and target.shape[1] == classes and classes > 1 and columns > 1:
            target = np.argmax(target, axis=1)  # one-hot rows
        elif target.ndim == 2 and target.shape[1] == 1:
            target = target[:, 0]
        integral = target.dtype.kind in "iub" or (
            target.dtype.kind == "f" and bool(np.all(np.mod(target, 1) == 0))
        )
        if target.ndim != 1 or not integral:
            raise FuseError(
                f"Targets y of {source} for output {output.name!r} must be class indices of shape "
                f"(rows,) or one-hot rows of shape (rows, {classes}); got shape {target.shape} "
                f"of dtype {target.dtype}."
            )
        target = target.astype(np.int64)
        if target.min() < 0 or target.max() >= classes:
            raise FuseError(
                f"Targets y of {source} for output {output.name!r} must be class indices 0 to "
                f"{classes - 1}; got values from {target.min()} to {target.max()}."
            )
        return target
    expected = tuple(output.shape[1:])
    if target.shape[1:] != expected and target.shape[1:] == () and expected == (1,):
        target = target[:, None]
    if target.shape[1:] != expected:
        raise FuseError(
            f"Targets y of {source} for output {output.name!r} must have shape (rows, "
            f"{', '.join(str(dim) for dim in expected)}); got {target.shape}."
        )
    return target.astype(np.float64)


def check_metric(metric: str | None, task: str) -> str:
    """The metric to use (log loss for classifiers, MSE for regressors, unless chosen).

    Raises:
        FuseError: an unknown metric, or a classification metric on a regression.
    """
    if metric is None:
        return "mse" if task == REGRESSION else "log_loss"
    if metric not in METRICS:
        raise FuseError(f"Unknown metric {metric!r}; choose one of: {', '.join(METRICS)}.")
    if METRICS[metric][1] == "classification" and task == REGRESSION:
        raise FuseError(
            f"The metric {metric!r} scores classifiers, but the output is a regression; choose "
            "mse or mae."
        )
    return metric


def score(prediction: np.ndarray, target: np.ndarray, task: str, metric: str) -> float:
    """``metric`` of a prediction in the members' layout (probabilities for classifiers)."""
    prediction = np.asarray(prediction, dtype=np.float64)
    if task != REGRESSION and metric in ("log_loss", "accuracy"):
        probabilities = np_distribution(prediction, "probabilities")
        if metric == "accuracy":
            return float(np.mean(np.argmax(probabilities, axis=-1) == target))
        picked = probabilities[np.arange(len(target)), target]
        return float(-np.mean(np.log(np.clip(picked, 1e-15, 1.0))))
    if task != REGRESSION:  # mse/mae of probabilities against one-hot targets
        classes = prediction.shape[-1]
        target = np.eye(2 if classes == 1 else classes)[target]
        target = target[:, 1:] if classes == 1 else target
    difference = prediction - target
    return float(np.mean(difference**2) if metric == "mse" else np.mean(np.abs(difference)))


def better(metric: str, first: float, second: float) -> bool:
    """True if ``first`` is strictly better than ``second`` under ``metric``."""
    return first > second if METRICS[metric][0] else first < second


def member_predictions(values: np.ndarray, task: str) -> np.ndarray:
    """Each member's prediction in the members' layout (probabilities for classifiers)."""
    if task == REGRESSION:
        return values.astype(np.float64)
    return np_answer(np_distribution(values, task), values.shape[-1])


def select_top(scores: Sequence[float], size: int, metric: str) -> list[int]:
    """Indices of the ``size`` best members, in the members' order (ties: the earlier)."""
    higher_is_better = METRICS[metric][0]
    order = sorted(
        range(len(scores)), key=lambda index: -scores[index] if higher_is_better else scores[index]
    )
    return sorted(order[:size])


def select_greedy(
    predictions: np.ndarray, target: np.ndarray, task: str, metric: str, rounds: int
) -> list[int]:
    """Greedy forward selection with replacement (Caruana et al., 2004): pick counts per member.

    Each round adds the member whose addition gives the bag's average prediction the best
    score; a member may be picked again. Ties go to the earlier member.
    """
    counts = [0] * len(predictions)
    total = np.zeros_like(predictions[0])
    for picked in range(1, rounds + 1):
        best_index, best_score = None, None
        for index, prediction in enumerate(predictions):
            candidate = score((total + prediction) / picked, target, task, metric)
            if best_score is None or better(metric, candidate, best_score):
                best_index, best_score = index, candidate
        counts[best_index] += 1
        total = total + predictions[best_index]
    return counts
