"""``--head cascade``: rows leave as soon as the members run so far are confident enough.

The head's NumPy face (``np_route``) and its options; ``fuser.heads.calibration`` fits its
order and thresholds, ``runtime.cascade.Cascade`` routes the rows inside the graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fuser.errors import FuseError
from fuser.heads.base import Head, normalised_weights, task_phrase, weight_count_problems
from fuser.heads.distributions import (
    CLASSIFICATION,
    np_answer,
    np_distribution,
)

CONFIDENCES = ("max", "margin")


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a cascade routes rows, computed in NumPy from the members' outputs.

    ``combined`` is each stage's combined prediction (of the members run up to it),
    ``(stages, rows, classes)``, ``confidence`` its confidence, ``(stages, rows)``, and
    ``exit_stage`` the 1-based stage each row leaves at; ``prediction`` is the answer,
    in the members' layout.
    """

    combined: np.ndarray
    confidence: np.ndarray
    exit_stage: np.ndarray
    prediction: np.ndarray


def np_confidence(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """The confidence of class distributions on the last axis: the largest probability
    (``max``) or the largest minus the second largest (``margin``)."""
    if kind == "max":
        return probabilities.max(axis=-1)
    top = np.sort(probabilities, axis=-1)
    return top[..., -1] - top[..., -2]


def np_route(
    probabilities: np.ndarray,
    stages: Sequence[Sequence[int]],
    weights: np.ndarray,
    thresholds: Sequence[float | None],
    confidence: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cascade in NumPy, as ``runtime.cascade.Cascade`` computes it in the graph.

    ``probabilities`` is ``(members, rows, classes)``; ``stages`` lists each stage's
    members (indices), ``weights`` one weight per member. After each stage but the last,
    a row leaves unless its confidence is below the stage's threshold (so a NaN one
    leaves; ``None``: no row leaves there).

    Returns ``(combined, confidence, exit_stage)`` as ``Routing`` describes them.
    """
    running = np.zeros(probabilities.shape[1:])
    total = 0.0
    combined = []
    for members in stages:
        running = running + np.tensordot(weights[members], probabilities[members], axes=1)
        total += float(weights[members].sum())
        combined.append(running / total)
    combined = np.stack(combined)
    conf = np_confidence(combined, confidence)
    exit_stage = np.full(probabilities.shape[1], len(stages))
    running_rows = np.ones(probabilities.shape[1], dtype=bool)
    for number, threshold in enumerate(thresholds):
        if threshold is None:
            continue
        with np.errstate(invalid="ignore"):
            leaving = running_rows & ~(conf[number] < threshold)
        exit_stage[leaving] = number + 1
        running_rows &= ~leaving
    return combined, conf, exit_stage


class CascadeHead(Head):
    """A confidence cascade: each row runs the members it needs, cheapest first.

    Stage 1 (a member, or a fused group of members) runs on every row; a row leaves
    as soon as the combined prediction of the members run so far (their mean, or their
    weighted mean with ``weights`` renormalised over them) is confident enough (its
    largest probability, or the margin between its two largest, at or above that
    stage's threshold); the rest go on; the last stage answers for every row left. The
    order of the stages and their thresholds are calibrated at build time on the
    validation data (``fuser.heads.calibration``), to cost the least per row while keeping the
    validation metric within ``tolerance`` of the full ensemble's.

    In the graph the routing is ``runtime.cascade.Cascade``: rows are gathered into
    each stage and their answers scattered back, so rows that left cost nothing later.
    Classifiers with one output only.

    Args:
        weights: one weight per member (default: equal), normalised to sum to one.
        order: member names, the stages' order (default: cheapest first, as measured).
        tolerance: how much worse than the full ensemble the cascade may score on the
            validation data, in the metric's units (default ``DEFAULT_TOLERANCE``: one
            error per thousand rows for accuracy).
        confidence: ``max`` (default) or ``margin``.
        exit_stage: add an output ``exit_stage``, the stage each row left at.
        costs: member name -> cost per row, to use instead of timing the stages.
    """

    name = "cascade"
    tasks = CLASSIFICATION
    needs_fit = True
    routes = True
    DEFAULT_TOLERANCE = 0.001

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        *,
        order: Sequence[str] | None = None,
        tolerance: float | None = None,
        confidence: str | None = None,
        exit_stage: bool = False,
        costs: dict[str, float] | None = None,
    ) -> None:
        problems = []
        if tolerance is not None and (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, (int, float))
            or not math.isfinite(tolerance)
            or tolerance < 0
        ):
            problems.append(
                f"--cascade-tolerance must be a number of at least 0, in the metric's units "
                f"(for accuracy, 0.001 is one error per thousand rows); got {tolerance!r}."
            )
        if confidence is not None and confidence not in CONFIDENCES:
            problems.append(
                f"--cascade-confidence must be one of {', '.join(CONFIDENCES)}; got {confidence!r}."
            )
        if order is not None and (
            isinstance(order, str) or not all(isinstance(name, str) for name in order)
        ):
            problems.append(f"--cascade-order must be a list of member names; got {order!r}.")
        if not isinstance(exit_stage, bool):
            problems.append(f"cascade_exit_stage must be True or False, got {exit_stage!r}.")
        if costs is not None and not (
            isinstance(costs, dict)
            and all(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
                for value in costs.values()
            )
        ):
            problems.append(f"costs must map member names to positive numbers; got {costs!r}.")
        if problems:
            raise FuseError(problems)
        self.weights = None if weights is None else normalised_weights(weights)
        self.order = None if order is None else list(order)
        self.tolerance = self.DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
        self.confidence = confidence or "max"
        self.exit_stage = exit_stage
        self.costs = None if costs is None else dict(costs)
        # Set by fit (the validation data) and by fuser.heads.calibration.calibrate.
        self.fitted: dict[str, Any] = {}
        self.stages: list[list[int]] | None = None
        self.thresholds: list[float | None] = []
        self.empty: list[str] = []  # per stage, runtime.cascade.EMPTY
        self.margin = 0.0
        self.calibration: dict[str, Any] = {}

    @property
    def combination(self) -> str:
        return "mean" if self.weights is None else "weighted"

    def set_weights(self, weights: Sequence[float]) -> None:
        """Weigh the members (greedy selection's pick counts); normalised to sum to one."""
        self.weights = normalised_weights(weights)

    def member_weights(self, members: int) -> np.ndarray:
        return np.full(members, 1.0 / members) if self.weights is None else self.weights

    def params(self) -> dict[str, Any]:
        return dict(self.calibration)

    def problems(self, *, n_members: int, tasks: dict[str, str], shapes: dict) -> list[str]:
        if len(tasks) > 1:
            return [
                "The 'cascade' head routes rows by the confidence of one output, but this "
                f"ensemble has outputs {', '.join(tasks)}; build it from one-output members."
            ]
        problems = []
        for output, task in tasks.items():
            if task not in self.tasks:
                problems.append(
                    f"The 'cascade' head routes rows by the confidence of a classifier's "
                    f"prediction, but output {output!r} is {task_phrase(task)}; choose another "
                    "head, or --task if the task was inferred wrongly."
                )
        if n_members < 2:
            problems.append(
                f"The 'cascade' head needs at least 2 members (one stage each); got {n_members}."
            )
        if self.weights is not None:
            problems += weight_count_problems(self.weights, n_members)
        return problems

    def fit(self, output: str, values: np.ndarray, target: np.ndarray, task: str) -> None:
        """Keep the validation data; ``fuser.heads.calibration.calibrate`` uses it once the stages
        (members and fused groups) are known."""
        self.fitted = {"output": output, "values": values, "target": target, "task": task}

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        raise FuseError(
            "The 'cascade' head runs inside the graph around the members "
            "(fuser.assembly.assemble), not on their stacked outputs."
        )

    def route(self, values: np.ndarray, task: str) -> Routing:
        """The routing of rows whose members' outputs are ``values`` ``(members, rows, ...)``."""
        stages = self._calibrated()
        probabilities = np_distribution(values, task)
        combined, conf, exit_stage = np_route(
            probabilities,
            stages,
            self.member_weights(len(values)),
            self.thresholds,
            self.confidence,
        )
        chosen = combined[exit_stage - 1, np.arange(len(exit_stage))]
        return Routing(combined, conf, exit_stage, np_answer(chosen, values.shape[-1]))

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        return self.route(values, task).prediction

    def _calibrated(self) -> list[list[int]]:
        if self.stages is None:
            raise FuseError(
                "The 'cascade' head must be calibrated on validation data: pass --fit-data "
                "VAL.npz (fit_data= in Python)."
            )
        return self.stages
