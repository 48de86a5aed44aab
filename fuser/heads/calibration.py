"""Calibrating a confidence cascade (``--head cascade``) at build time, on ``--fit-data``.

The cascade's stages are the ensemble's units of computation: each fused group of
``fuser.fusion`` is one stage, each other member one. Calibration decides

- their **order**: cheapest first, by the cost per row of each stage measured on the
  building machine (its own ONNX conversion timed with ONNX Runtime in a fresh process,
  as ``fuser.fusion.costs`` times fused groups), or as ``--cascade-order`` gives it;
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
fused group is refused them, and gets one padded row instead).

Thresholds lie in the middle of gaps between the confidences of the validation rows
that reach their stage, and only in gaps wider than twice ``margin`` (a tenth of the
build's ``--tolerance``): no validation row's confidence lies within ``margin`` of a
threshold, so the float32 graph and ONNX Runtime, whose confidences differ from the
float64 reference by about 1e-7, route every validation row exactly as the reference
does, and the build checks that they do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuser import uncertainty as uncertainty_lib
from fuser.errors import VerificationError
from fuser.fusion.plan import FusionPlan
from fuser.heads import CascadeHead, np_answer, np_distribution
from fuser.heads.stages import examine_stages, plan_stages
from fuser.heads.thresholds import DEFAULT_METRIC, evaluate, thresholds_for
from fuser.members import Member
from fuser.selection import METRICS
from fuser.validate import Wiring

# -- calibration ------------------------------------------------------------------------------


def calibrate(
    head: CascadeHead,
    members: Sequence[Member],
    wiring: Wiring,
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
        FuseError: ``--fusion on`` with a group that ``--cascade-order`` splits or that
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
