"""A cascade's thresholds: the set that costs least per row on the validation data while
keeping its metric within the tolerance of the full ensemble's (``--head cascade``).

The search is exact per stage: with the other thresholds fixed, every threshold that splits
the rows reaching that stage differently is tried at once (rows sorted by confidence,
running sums of cost and errors). It starts from "no row leaves early" (the full ensemble:
feasible), moves one threshold at a time while that lowers the cost, then two at once (one
over a sample of its thresholds, the other exact), until neither lowers it. Thresholds lie
in the middle of gaps between the confidences of the validation rows that reach their
stage, never within ``margin`` of one (see ``fuser.heads.calibration``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fuser.heads import CascadeHead, np_answer, np_route

DEFAULT_METRIC = "accuracy"
_MAX_SWEEPS = 20


# -- thresholds -----------------------------------------------------------------------------


def badness(combined: np.ndarray, target: np.ndarray, metric: str, columns: int) -> np.ndarray:
    """Per stage and row, what the row adds to the metric's mean when it leaves there:
    ``(stages, rows)``. Accuracy counts errors (1 - accuracy is their mean)."""
    rows = np.arange(len(target))
    if metric == "accuracy":
        return (np.argmax(combined, axis=-1) != target).astype(np.float64)
    if metric == "log_loss":
        return -np.log(np.clip(combined[:, rows, target], 1e-15, 1.0))
    classes = combined.shape[-1]
    onehot = np_answer(np.eye(classes)[target], columns)
    difference = np_answer(combined, columns) - onehot
    per_element = difference**2 if metric == "mse" else np.abs(difference)
    return per_element.reshape(*per_element.shape[:2], -1).mean(axis=-1)


def metric_value(bad: np.ndarray, metric: str) -> float:
    """The metric from per-row badness (accuracy: one minus the error rate)."""
    mean = float(np.mean(bad)) if len(bad) else 0.0
    return 1.0 - mean if metric == "accuracy" else mean


def lowest_confidence(kind: str, classes: int) -> float:
    """The smallest confidence a distribution can have: 1/classes for max, 0 for margin."""
    return 1.0 / classes if kind == "max" else 0.0


def search_thresholds(
    confidence: np.ndarray,
    bad: np.ndarray,
    cost: Sequence[float],
    allowed: float,
    margin: float,
    lowest: float,
) -> list[float | None]:
    """Thresholds (``None``: no row leaves there) for the stages but the last that cost
    least per row with at most ``allowed`` total badness over the rows.

    ``confidence`` and ``bad`` are ``(stages, rows)``, ``cost`` one cost per stage. A row
    leaves after a stage unless its confidence is below the threshold. No threshold lies
    within ``margin`` of the confidence of a row that reaches its stage; none lies below
    ``lowest`` (the smallest confidence possible), so every stage stays reachable.

    Coordinate descent from "no row leaves early" (the full ensemble: feasible), each
    step the exact best threshold of one stage with the others fixed; where no single
    stage improves, moves of two stages at once (one over a sample of its thresholds,
    the other exact), until neither improves.
    """
    search = _Search(confidence, bad, cost, allowed, margin, lowest)
    thresholds: list[float | None] = [None] * (len(cost) - 1)
    best = search.cost(thresholds)
    for _ in range(_MAX_SWEEPS):
        thresholds, best = search.descend(thresholds, best)
        moved = search.pair_move(thresholds, best)
        if moved is None:
            break
        thresholds, best = moved
    return thresholds


class _Search:
    """The threshold search of ``search_thresholds`` over fixed confidences and badness."""

    def __init__(self, confidence, bad, cost, allowed, margin, lowest) -> None:
        self.confidence = np.where(np.isnan(confidence), np.inf, confidence)  # NaN leaves
        self.bad = bad
        self.stages, self.rows = confidence.shape
        self.through = np.concatenate([[0.0], np.cumsum(cost)])  # cost of stages 1..e
        self.slack = allowed + 1e-9 * max(self.rows, 1)
        self.margin, self.lowest = margin, lowest
        self.index = np.arange(self.rows)

    def exits(self, thresholds: Sequence[float | None]) -> np.ndarray:
        return _exits(self.confidence, thresholds)

    def cost(self, thresholds: Sequence[float | None]) -> float:
        return float(self.through[self.exits(thresholds)].sum())

    def better(self, cost: float, best: float) -> bool:
        return cost < best - 1e-12 * max(1.0, abs(best))

    def descend(self, thresholds: list, best: float) -> tuple[list, float]:
        """Coordinate descent: each stage's exact best threshold, the others fixed."""
        thresholds = list(thresholds)
        for sweep in range(_MAX_SWEEPS):
            improved = False
            stages = range(self.stages - 1)
            for number in stages if sweep % 2 == 0 else reversed(stages):
                found = self.best_split(number, thresholds)
                if found is None or not self.better(found[1], best):
                    continue
                candidate = list(thresholds)
                candidate[number] = found[0]
                if self.valid(candidate):  # later stages see other rows now
                    thresholds, best = candidate, found[1]
                    improved = True
            if not improved:
                break
        return thresholds, best

    def pair_move(self, thresholds: list, best: float) -> tuple[list, float] | None:
        """The best move of two thresholds at once that lowers the cost, if any."""
        found = None
        for number in range(self.stages - 1):
            for threshold in self.sample(number, thresholds):
                trial = list(thresholds)
                trial[number] = threshold
                for other in range(self.stages - 1):
                    if other == number:
                        continue
                    split = self.best_split(other, trial)
                    if split is None:
                        continue
                    candidate = list(trial)
                    candidate[other] = split[0]
                    target = best if found is None else found[1]
                    if self.better(split[1], target) and self.valid(candidate):
                        found = (candidate, split[1])
        return found

    def sample(self, number: int, thresholds: list, count: int = 32) -> list[float | None]:
        """Up to ``count`` valid thresholds of one stage, spread over its rows, and None."""
        conf, _ = self._split_rows(number, thresholds)
        upper, lower, valid = self._gaps(np.sort(conf)[::-1])
        spots = np.flatnonzero(valid[1:])
        if len(spots) > count:
            spots = spots[np.linspace(0, len(spots) - 1, count).round().astype(int)]
        return [None, *[float((upper[i] + lower[i]) / 2) for i in spots]]

    def valid(self, thresholds: Sequence[float | None]) -> bool:
        """No threshold within ``margin`` of a row reaching its stage, none below lowest."""
        exit_stage = self.exits(thresholds)
        for number, threshold in enumerate(thresholds):
            if threshold is None:
                continue
            reaching = exit_stage > number
            near = np.abs(self.confidence[number, reaching] - threshold) <= self.margin
            if near.any() or threshold <= self.lowest:
                return False
        return True

    def _split_rows(self, number: int, thresholds: Sequence[float | None]):
        stages = self.stages
        before = [*thresholds[:number], *[None] * (stages - 1 - number)]
        reaching = self.exits(before) > number
        return self.confidence[number, reaching], reaching

    def _gaps(self, descending: np.ndarray):
        """Per split point i (the i most confident rows leave, i = 0..count): where a
        threshold would go, and whether the gap is wide enough."""
        upper = np.minimum(descending, 1.0 + 4 * self.margin)
        lower = np.concatenate([descending[1:], [self.lowest]])
        valid = np.concatenate([[True], upper - lower > 2 * self.margin])
        return upper, lower, valid

    def best_split(self, number: int, thresholds: Sequence[float | None]):
        """The cheapest feasible threshold for stage ``number``, the others fixed:
        ``(threshold, total cost)``, or None when even "no row leaves" is infeasible."""
        bad, through = self.bad, self.through
        _, reaching = self._split_rows(number, thresholds)
        later = self.exits([*[None] * (number + 1), *thresholds[number + 1 :]])
        current = self.exits(thresholds)
        rest = ~reaching
        base_cost = float(through[current[rest]].sum())
        base_bad = float(bad[current[rest] - 1, self.index[rest]].sum())
        rows = self.index[reaching]
        conf = self.confidence[number, reaching]
        order = np.argsort(-conf, kind="stable")
        conf, rows = conf[order], rows[order]
        # The i most confident rows leave here (i = 0..count), the others go on.
        leave_bad = np.concatenate([[0.0], np.cumsum(bad[number, rows])])
        stay_bad = np.concatenate([[0.0], np.cumsum(bad[later[rows] - 1, rows])])
        stay_cost = np.concatenate([[0.0], np.cumsum(through[later[rows]])])
        leaving = np.arange(len(rows) + 1)
        totals_bad = base_bad + leave_bad + (stay_bad[-1] - stay_bad)
        totals_cost = base_cost + leaving * through[number + 1] + (stay_cost[-1] - stay_cost)
        upper, lower, valid = self._gaps(conf)
        feasible = valid & (totals_bad <= self.slack)
        if not feasible.any():
            return None
        candidates = np.flatnonzero(feasible)
        ranked = np.lexsort((candidates, totals_bad[candidates], totals_cost[candidates]))
        best = candidates[ranked[0]]
        if best == 0:
            return None, float(totals_cost[0])
        return float((upper[best - 1] + lower[best - 1]) / 2), float(totals_cost[best])


def _exits(confidence: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    """1-based exit stage per row (NaN already +inf: it leaves wherever a threshold is)."""
    stages, rows = confidence.shape
    exit_stage = np.full(rows, stages)
    running = np.ones(rows, dtype=bool)
    for number, threshold in enumerate(thresholds):
        if threshold is None:
            continue
        leaving = running & ~(confidence[number] < threshold)
        exit_stage[leaving] = number + 1
        running &= ~leaving
    return exit_stage


def thresholds_for(
    probabilities: np.ndarray,
    target: np.ndarray,
    *,
    stages: Sequence[Sequence[int]],
    weights: np.ndarray,
    costs: Sequence[float],
    confidence: str = "max",
    tolerance: float = CascadeHead.DEFAULT_TOLERANCE,
    metric: str = DEFAULT_METRIC,
    margin: float = 1e-5,
    columns: int | None = None,
) -> list[float | None]:
    """The thresholds the build would choose for these stages on these rows
    (``probabilities``: ``(members, rows, classes)``): the cheapest per row with the
    metric within ``tolerance`` of the full ensemble's (``search_thresholds``)."""
    columns = probabilities.shape[-1] if columns is None else columns
    unset = [None] * (len(stages) - 1)
    combined, conf, _ = np_route(probabilities, stages, weights, unset, confidence)
    bad = badness(combined, target, metric, columns)
    allowed = float(bad[-1].sum()) + tolerance * len(target)
    lowest = lowest_confidence(confidence, probabilities.shape[-1])
    return search_thresholds(conf, bad, costs, allowed, margin, lowest)


@dataclass
class Evaluation:
    """A cascade's routing of some rows: exit stages, cost per row, metric."""

    exit_stage: np.ndarray
    cost_per_row: float
    metric: float
    exit_rates: list[float]
    reach_rates: list[float]


def evaluate(
    probabilities: np.ndarray,
    target: np.ndarray,
    *,
    stages: Sequence[Sequence[int]],
    weights: np.ndarray,
    thresholds: Sequence[float | None],
    confidence: str,
    costs: Sequence[float],
    metric: str = DEFAULT_METRIC,
    columns: int | None = None,
) -> Evaluation:
    """Route rows (``probabilities``: ``(members, rows, classes)``) through a cascade and
    score it: what the build reports, and what the examples plot."""
    columns = probabilities.shape[-1] if columns is None else columns
    combined, _, exit_stage = np_route(probabilities, stages, weights, thresholds, confidence)
    bad = badness(combined, target, metric, columns)
    rows = np.arange(len(target))
    through = np.concatenate([[0.0], np.cumsum(costs)])
    count = max(len(target), 1)
    return Evaluation(
        exit_stage,
        float(through[exit_stage].mean()) if len(target) else 0.0,
        metric_value(bad[exit_stage - 1, rows], metric),
        [float(np.sum(exit_stage == number + 1)) / count for number in range(len(stages))],
        [float(np.sum(exit_stage >= number + 1)) / count for number in range(len(stages))],
    )
