"""Calibrating a confidence cascade (``--head cascade``) at build time, on ``--fit-data``.

The cascade's stages are the ensemble's units of computation: each stacked group of
``fuser.stack`` is one stage, each other member one. Calibration decides

- their **order**: cheapest first, by the cost per row of each stage measured on the
  building machine (its own ONNX conversion timed with ONNX Runtime in a fresh process,
  as ``fuser.costs`` times stacked groups), or as ``--cascade-order`` gives it;
- their **thresholds**: the set that costs least per row on the validation data while
  keeping the validation metric (accuracy unless ``--metric`` says otherwise) within
  ``--cascade-tolerance`` of the full ensemble's. The search is exact per stage: with
  the other thresholds fixed, every threshold that splits the rows reaching that stage
  differently is tried at once (rows sorted by confidence, running sums of cost and
  errors). It starts from "no row leaves early" (the full ensemble: feasible), moves
  one threshold at a time while that lowers the cost, then two at once (one over a
  sample of its thresholds, the other exact), until neither lowers it. On random
  problems of three stages it found the optimum of an exhaustive search in 298 of 300.

Each stage is also converted to ONNX on its own, to time it and to learn whether ONNX
Runtime runs it on zero rows (what a stage no row reached sees in the artifact; a
stacked group is refused them, and gets one padded row instead).

Thresholds lie in the middle of gaps between the confidences of the validation rows
that reach their stage, and only in gaps wider than twice ``margin`` (a tenth of the
build's ``--tolerance``): no validation row's confidence lies within ``margin`` of a
threshold, so the float32 graph and ONNX Runtime, whose confidences differ from the
float64 reference by about 1e-7, route every validation row exactly as the reference
does, and the build checks that they do.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuser import uncertainty as uncertainty_lib
from fuser.errors import FuseError, VerificationError, brief, library_of
from fuser.heads import (
    CascadeHead,
    np_answer,
    np_distribution,
    np_route,
)
from fuser.members import Member
from fuser.selection import METRICS
from fuser.stack import FusionPlan
from fuser.validate import Plan

DEFAULT_METRIC = "accuracy"
# Stages are timed at this batch size (fewer rows for large inputs, as fuser.costs
# bounds them): the cost per row of a batch this size is what a throughput-bound
# server pays. Batch 1 is timed too and recorded.
COST_BATCH = 256
_TIMING_SECONDS = 0.12
_TIMING_TIMEOUT = 300
_MAX_SWEEPS = 20


@dataclass(frozen=True)
class StageCosts:
    """Cost per row of each unit (a stage candidate), how it was obtained, and its unit."""

    per_row: list[float]
    batch_1: list[float | None]
    source: str
    unit: str


# -- the units: stacked groups and single members ----------------------------------------


def units(members: Sequence[Member], fusion: FusionPlan) -> list[list[int]]:
    """Each stacked group (its members in group order), then each other member."""
    position = {member.name: index for index, member in enumerate(members)}
    grouped = [[position[member.name] for member in group.members] for group in fusion.groups]
    taken = {index for group in grouped for index in group}
    return grouped + [[index] for index in range(len(members)) if index not in taken]


def check_order(order: Sequence[str] | None, names: Sequence[str]) -> list[str]:
    """Problems with ``--cascade-order`` against the members' names (all given members)."""
    if order is None:
        return []
    unknown = [name for name in order if name not in names]
    missing = [name for name in names if name not in order]
    repeated = sorted({name for name in order if list(order).count(name) > 1})
    parts = []
    if unknown:
        parts.append(f"unknown {', '.join(unknown)}")
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if repeated:
        parts.append(f"repeated {', '.join(repeated)}")
    if not parts:
        return []
    return [
        f"--cascade-order must name every member once, in the order the stages run ({'; '.join(parts)}); "
        f"the members are {', '.join(names)}."
    ]


def plan_stages(
    head: CascadeHead, members: Sequence[Member], fusion: FusionPlan
) -> list[list[int]]:
    """The units the cascade will order: a stacked group is one stage.

    A group that ``--cascade-order`` splits, or that holds every member (which would
    leave one stage), is turned back into plain members under ``--fusion auto``, and
    refused under ``--fusion stack``.

    Raises:
        FuseError: ``--fusion stack`` with such a group.
    """
    names = [member.name for member in members]
    order = [name for name in head.order if name in names] if head.order is not None else None
    for group in list(fusion.groups):
        group_names = [member.name for member in group.members]
        reason = None
        if len(group_names) == len(members):
            reason = (
                f"--fusion {fusion.mode} runs every member ({', '.join(group_names)}) as one "
                "stacked computation, which leaves the cascade a single stage"
            )
        elif order is not None:
            spots = sorted(order.index(name) for name in group_names)
            if spots != list(range(spots[0], spots[0] + len(spots))):
                reason = (
                    f"--cascade-order puts {', '.join(group_names)} in different stages, but "
                    f"--fusion {fusion.mode} runs them as one stacked computation"
                )
        if reason is None:
            continue
        if fusion.mode == "stack":
            advice = ", or list them next to each other in --cascade-order"
            if len(group_names) == len(members):
                advice = ""
            raise FuseError(f"{reason}; use --fusion auto or off{advice}.")
        fusion.demote(group, f"{reason}, so they stay plain members, one stage each.")
    return units(members, fusion)


# -- costs ----------------------------------------------------------------------------------


def examine_stages(
    head: CascadeHead,
    members: Sequence[Member],
    wiring: Plan,
    fusion: FusionPlan,
    stage_units: list[list[int]],
) -> tuple[StageCosts, list[str]]:
    """Each unit converted to ONNX on its own: its cost per row, and how the artifact must
    run it when no row reaches it (``runtime._cascade.EMPTY``).

    The cost is given (``head.costs``), else timed with ONNX Runtime on this machine,
    else (when converting or timing fails) its parameter count. A unit that ONNX Runtime
    runs on zero rows is run so; one it refuses (a stacked group: its dense layers are
    convolutions along the batch) gets one padded row.
    """
    failure: Exception | None = None
    try:
        models = [
            _to_onnx(members, wiring, fusion, unit, number)
            for number, unit in enumerate(stage_units)
        ]
        empty = [_empty_mode(model, wiring) for model in models]
    except Exception as error:  # for an ONNX artifact, its own conversion will say more
        models, empty, failure = None, ["pad"] * len(stage_units), error
    if head.costs is not None:
        missing = [member.name for member in members if member.name not in head.costs]
        if missing:
            raise FuseError(
                f"The cascade's costs name no cost for {', '.join(missing)}; give one per member."
            )
        per_row = [sum(head.costs[members[i].name] for i in unit) for unit in stage_units]
        return StageCosts(per_row, [None] * len(per_row), "given", "given"), empty
    if models is not None:
        try:
            return _timed(models, wiring), empty
        except Exception as error:  # the timing process failed
            failure = error
    where = library_of(failure) or type(failure).__name__
    per_row = [float(sum(members[i].parameters for i in unit)) for unit in stage_units]
    source = f"parameter count (timing the stages failed: {where}: {brief(failure)})"
    return StageCosts(per_row, [None] * len(per_row), source, "parameters"), empty


def _to_onnx(
    members: Sequence[Member], wiring: Plan, fusion: FusionPlan, unit: list[int], number: int
) -> bytes:
    from fuser import costs, fuse

    model = fuse.stage_model(members, unit, wiring, fusion, f"examined_stage{number}")
    return costs._to_onnx(model, wiring.inputs)[0].SerializeToString()


def _empty_mode(model: bytes, wiring: Plan) -> str:
    """``run`` if ONNX Runtime runs ``model`` on zero rows, else ``pad``."""
    import onnxruntime

    feeds = {
        f"input_{index}:0": np.zeros((0, *spec.shape[1:]), dtype=spec.dtype)
        for index, spec in enumerate(wiring.inputs)
    }
    try:
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        outputs = session.run(None, feeds)
    except Exception:  # onnxruntime raises its own untyped errors
        return "pad"
    return "run" if all(output.shape[:1] == (0,) for output in outputs) else "pad"


def _timed(models: list[bytes], wiring: Plan) -> StageCosts:
    """The fastest call of each unit's ONNX model at batch 1 and ``COST_BATCH`` rows, in a
    fresh process that imports only numpy and onnxruntime (``fuser/_timing.py``)."""
    from fuser import costs

    values_per_row = sum(math.prod(spec.shape[1:]) for spec in wiring.inputs)
    batch = min(COST_BATCH, costs.batches_for(values_per_row)[-1])
    forms = [f"stage{number}" for number in range(len(models))]
    with tempfile.TemporaryDirectory(prefix="fuser-cascade-timing-") as directory:
        paths = {}
        for form, model in zip(forms, models):
            paths[form] = str(Path(directory) / f"{form}.onnx")
            Path(paths[form]).write_bytes(model)
        request = {
            "models": paths,
            "inputs": [
                {"name": f"input_{index}:0", "shape": list(spec.shape[1:]), "dtype": spec.dtype}
                for index, spec in enumerate(wiring.inputs)
            ],
            "batches": [1, batch],
            "seconds": _TIMING_SECONDS,
            "min_runs": 3,
        }
        request_path = Path(directory) / "request.json"
        request_path.write_text(json.dumps(request))
        script = Path(costs.__file__).with_name("_timing.py")
        done = subprocess.run(
            # -P: fuser/ (the script's folder) must not shadow modules of the same name.
            [sys.executable, "-P", str(script), str(request_path)],
            capture_output=True,
            text=True,
            timeout=_TIMING_TIMEOUT,
        )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"the timing process exited {done.returncode}")
    timed = json.loads(done.stdout.strip().splitlines()[-1])["ms"]
    return StageCosts(
        [timed[form][1] / batch for form in forms],
        [timed[form][0] for form in forms],
        f"ONNX Runtime on this machine, each stage's own graph, fastest call at batch {batch} "
        "(per row) and at batch 1, in a fresh process",
        "ms",
    )


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


# -- calibration ------------------------------------------------------------------------------


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


def calibrate(
    head: CascadeHead,
    members: Sequence[Member],
    wiring: Plan,
    fusion: FusionPlan,
    *,
    metric: str | None,
    build_tolerance: float,
    source: str,
) -> list[str]:
    """Order the stages and choose the thresholds on the validation data the head was
    fitted with; fills ``head.stages``, ``head.thresholds``, ``head.margin`` and the
    manifest record ``head.calibration``. Returns notes for the build's progress.

    Raises:
        FuseError: ``--fusion stack`` with a group that ``--cascade-order`` splits or that
            holds every member; costs given for some members only.
    """
    fitted = head.fitted
    values, target, task = fitted["values"], fitted["target"], fitted["task"]
    metric = metric or DEFAULT_METRIC  # checked with the validation data (check_metric)
    stage_units = plan_stages(head, members, fusion)
    costs, empty = examine_stages(head, members, wiring, fusion, stage_units)
    names = [member.name for member in members]
    if head.order is not None:
        given = [name for name in head.order if name in names]
        ranking = sorted(
            range(len(stage_units)),
            key=lambda unit: min(given.index(names[index]) for index in stage_units[unit]),
        )
        how = "as given (--cascade-order)"
    else:
        ranking = sorted(
            range(len(stage_units)), key=lambda unit: (costs.per_row[unit], stage_units[unit])
        )
        how = "cheapest first, by the measured cost per row"
    stages = [stage_units[unit] for unit in ranking]
    stage_cost = [costs.per_row[unit] for unit in ranking]
    stage_cost_1 = [costs.batch_1[unit] for unit in ranking]
    columns = values.shape[-1]
    probabilities = np_distribution(values, task)
    weights = head.member_weights(len(members))
    rows = len(target)
    margin = build_tolerance / 10
    thresholds = thresholds_for(
        probabilities,
        target,
        stages=stages,
        weights=weights,
        costs=stage_cost,
        confidence=head.confidence,
        tolerance=head.tolerance,
        metric=metric,
        margin=margin,
        columns=columns,
    )
    head.stages, head.thresholds, head.margin = stages, thresholds, margin
    head.empty = [empty[unit] for unit in ranking]
    routed = evaluate(
        probabilities,
        target,
        stages=stages,
        weights=weights,
        thresholds=thresholds,
        confidence=head.confidence,
        costs=stage_cost,
        metric=metric,
        columns=columns,
    )
    full_cost = float(sum(stage_cost))
    full = evaluate(
        probabilities,
        target,
        stages=[[index for stage in stages for index in stage]],
        weights=weights,
        thresholds=[],
        confidence=head.confidence,
        costs=[full_cost],
        metric=metric,
        columns=columns,
    )
    full_metric = full.metric
    record: dict[str, Any] = {
        "combination": head.combination,
        "confidence": head.confidence,
        "order": how,
        "metric": metric,
        "tolerance": head.tolerance,
        "threshold_margin": margin,
        "cost_unit": costs.unit,
        "cost_source": costs.source,
        "stages": [
            {
                "members": [names[index] for index in stage],
                # Exact: the graph compares with this very number.
                "threshold": None if number == len(stages) - 1 else thresholds[number],
                "cost_per_row": _rounded(stage_cost[number]),
                "cost_batch_1": _rounded(stage_cost_1[number]),
                "reach_rate": round(routed.reach_rates[number], 6),
                "exit_rate": round(routed.exit_rates[number], 6),
                "onnx_without_rows": "runs on zero rows"
                if head.empty[number] == "run"
                else "runs on one padded row (ONNX Runtime refuses it zero rows)",
            }
            for number, stage in enumerate(stages)
        ],
        "expected_cost_per_row": _rounded(routed.cost_per_row),
        "full_cost_per_row": _rounded(full_cost),
        "expected_speedup": round(full_cost / routed.cost_per_row, 4)
        if routed.cost_per_row > 0
        else None,
        "fit": {
            "source": source,
            "rows": rows,
            "cascade": round(routed.metric, 6),
            "full": round(full_metric, 6),
            "higher_is_better": METRICS[metric][0],
        },
        "exit_stage_output": head.exit_stage,
    }
    if head.weights is not None:
        record["weights"] = {name: round(float(w), 10) for name, w in zip(names, weights)}
    head.calibration = record
    exits = ", ".join(
        f"stage {number + 1} ({'+'.join(names[i] for i in stage)}) {rate:.1%}"
        for number, (stage, rate) in enumerate(zip(stages, routed.exit_rates))
    )
    notes = [
        f"Cascade calibrated on {source} ({rows} rows): stages {how}; rows leave at {exits}; "
        f"{metric} {routed.metric:.4f} against {full_metric:.4f} for the full ensemble; "
        f"expected cost per row {routed.cost_per_row:.4g} {costs.unit} against {full_cost:.4g}."
    ]
    if all(threshold is None for threshold in thresholds):
        notes.append(
            "No threshold keeps the cascade within --cascade-tolerance of the full ensemble on "
            "the validation data: every row runs every stage."
        )
    return notes


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


# -- verification ---------------------------------------------------------------------------


@dataclass
class Expectation:
    """What a cascade must answer for some rows, checked against an artifact's results.

    ``candidates`` maps each output to its value for every possible exit stage,
    ``(stages, rows, ...)``; ``confidence`` is ``(stages, rows)`` and ``exit_stage`` the
    reference routing. An artifact may route a row differently only where its
    confidence lies within ``margin`` of a threshold (float error may flip it).
    """

    candidates: dict[str, np.ndarray]
    confidence: np.ndarray
    exit_stage: np.ndarray
    thresholds: list[float | None]
    margin: float
    prediction: str
    exit_name: str | None

    def subset(self, rows: Any) -> Expectation:
        return Expectation(
            {name: value[:, rows] for name, value in self.candidates.items()},
            self.confidence[:, rows],
            self.exit_stage[rows],
            self.thresholds,
            self.margin,
            self.prediction,
            self.exit_name,
        )

    def plausible(self) -> np.ndarray:
        """``(stages, rows)``: True where leaving at that stage is consistent with the
        confidences within ``margin``."""
        stages, rows = self.confidence.shape
        conf = np.where(np.isnan(self.confidence), np.inf, self.confidence)
        allowed = np.zeros((stages, rows), dtype=bool)
        could_stay = np.ones(rows, dtype=bool)  # stayed at every stage so far
        for number in range(stages):
            threshold = self.thresholds[number] if number < stages - 1 else None
            could_leave = threshold is None and number == stages - 1
            if threshold is not None:
                could_leave = conf[number] >= threshold - self.margin
            allowed[number] = could_stay & could_leave
            if threshold is not None:
                could_stay = could_stay & (conf[number] < threshold + self.margin)
        return allowed

    def expected(self, results: dict[str, np.ndarray], what: str) -> tuple[dict, int]:
        """The reference values for the exit stages the artifact took (from its
        ``exit_stage`` output, else the plausible stage its prediction matches best), and
        how many rows left at another stage than the reference's.

        Raises:
            VerificationError: an exit stage no float error explains.
        """
        stages, rows = self.confidence.shape
        plausible = self.plausible()
        index = np.arange(rows)
        if self.exit_name is not None and self.exit_name in results:
            observed = np.asarray(results[self.exit_name], dtype=np.float64)
            whole = np.isfinite(observed) & (observed == np.round(observed))
            stage = np.where(whole, observed, 0).astype(np.int64)
            bad = ~whole | (stage < 1) | (stage > stages)
            bad[~bad] = ~plausible[stage[~bad] - 1, index[~bad]]
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise VerificationError(
                    f"{what} routes {int(bad.sum())} of {rows} rows otherwise than the NumPy "
                    f"reference of the same routing (row {row}: stage {observed[row]:g}, "
                    f"expected {self.exit_stage[row]}); the build is refused."
                )
        else:  # the plausible stage whose answer the prediction matches best
            got = np.asarray(results[self.prediction], dtype=np.float64)
            reference = self.candidates[self.prediction]
            with np.errstate(invalid="ignore"):
                distance = np.abs(reference - got[None]).reshape(stages, rows, -1).max(axis=-1)
            distance = np.where(plausible, np.nan_to_num(distance, nan=np.inf), np.inf)
            distance[self.exit_stage - 1, index] = np.where(
                np.isinf(distance[self.exit_stage - 1, index]),
                0.0,  # NaN answers: the reference stage (it is always plausible)
                distance[self.exit_stage - 1, index],
            )
            stage = np.argmin(distance, axis=0) + 1
        want = {name: value[stage - 1, index] for name, value in self.candidates.items()}
        if self.exit_name is not None:
            want[self.exit_name] = stage.astype(np.float64)
        return want, int(np.sum(stage != self.exit_stage))


def expectation(
    head: CascadeHead,
    values: np.ndarray,
    *,
    task: str,
    output: str,
    uncertainty: bool,
    margin: float,
) -> Expectation:
    """What the cascade must answer for rows whose members' outputs are ``values``
    ``(members, rows, ...)``: every output for every possible exit stage (the
    uncertainty outputs over the members run up to it), and the reference routing.

    ``margin`` is how far from a threshold a row's confidence must lie for its routing
    to be checked exactly (0: every row exactly)."""
    routing = head.route(values, task)
    columns = values.shape[-1]
    stages = len(head.stages)
    candidates = {output: np_answer(routing.combined, columns)}
    rows = values.shape[1]
    candidates["exit_stage"] = np.repeat(
        np.arange(1, stages + 1, dtype=np.float64)[:, None], rows, axis=1
    )
    for kind in uncertainty_lib.kinds(task, uncertainty=uncertainty, expose_members=False):
        per_stage = []
        for number in range(stages):
            ran = [index for stage in head.stages[: number + 1] for index in stage]
            prediction = candidates[output][number]
            per_stage.append(uncertainty_lib.reference(kind, values[ran], prediction, task))
        candidates[uncertainty_lib.extra_name(kind, output, True)] = np.stack(per_stage)
    return Expectation(
        candidates,
        routing.confidence,
        routing.exit_stage,
        list(head.thresholds),
        margin,
        output,
        "exit_stage",
    )
