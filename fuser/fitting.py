"""Validation data (``--fit-data``): score the members, select among them, fit the head.

Scores every member on the validation rows by the metric, keeps the ``top:K`` or runs
``greedy:K`` selection (which weighs the members), and fits a head that learns (the
stacker); the manifest's ``validation`` record says what was found.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fuser.errors import FuseError, stage
from fuser.heads import CascadeHead, Head, WeightedHead
from fuser.members import Member
from fuser.reference import member_values
from fuser.selection import (
    Selection,
    check_metric,
    member_predictions,
    prepare_targets,
    read_fit_data,
    score,
    select_greedy,
    select_top,
)
from fuser.tasks import Task
from fuser.validate import Wiring
from runtime.inputs import prepare_feeds


def fit(
    members: list[Member],
    wiring: Wiring,
    head: Head,
    tasks: dict[str, Task],
    probe_values: dict[str, np.ndarray],
    fit_data: Any,
    selection: Selection | None,
    metric: str | None,
) -> tuple[list[Member], Wiring, Head, dict[str, np.ndarray], dict[str, Any], dict]:
    """Score the members on validation data, select among them, fit the head.

    Returns the kept members, their wiring, the head (greedy selection makes it a
    weighted one, or weighs a cascade), their probe values, the validation record for
    the manifest, and the validation inputs (fused input name -> array).
    """
    data = read_fit_data(fit_data, wiring.inputs, wiring.outputs)
    every_name = [member.name for member in members]
    try:
        feeds = prepare_feeds(wiring.inputs, data.inputs)
    except (ValueError, TypeError) as error:
        raise FuseError(f"The inputs of {data.source} do not fit the members: {error}") from None
    specs = {spec.name: spec for spec in wiring.outputs}
    targets = {
        name: prepare_targets(target, specs[name], tasks[name].kind, data.source)
        for name, target in data.targets.items()
    }
    values = member_values(members, wiring, feeds, what=f"the validation data {data.source}")
    metrics = {name: check_metric(metric, tasks[name].kind) for name in specs}
    scores = {
        name: [
            score(prediction, targets[name], tasks[name].kind, metrics[name])
            for prediction in member_predictions(values[name], tasks[name].kind)
        ]
        for name in specs
    }
    record: dict[str, Any] = {"source": data.source, "rows": data.rows, "outputs": {}}
    if selection is not None:
        if len(specs) > 1:
            raise FuseError(
                "--select scores members on one output; this ensemble has outputs "
                f"{', '.join(specs)}. Select on a one-output ensemble."
            )
        if selection.strategy == "top" and selection.size > len(members):
            raise FuseError(
                f"--select top:{selection.size} keeps more members than the {len(members)} given."
            )
        (name,) = specs
        kind = tasks[name].kind
        if selection.strategy == "top":
            kept = select_top(scores[name], selection.size, metrics[name])
            counts = [1 if index in kept else 0 for index in range(len(members))]
        else:
            counts = select_greedy(
                member_predictions(values[name], kind),
                targets[name],
                kind,
                metrics[name],
                selection.size,
            )
            kept = [index for index, count in enumerate(counts) if count]
            if head.routes:
                head.set_weights([counts[index] for index in kept])
            else:
                head = WeightedHead([counts[index] for index in kept])
        record["selection"] = {
            "strategy": selection.strategy,
            "size": selection.size,
            "metric": metrics[name],
            "picks": {member.name: count for member, count in zip(members, counts)},
            "kept": [members[index].name for index in kept],
        }
        dropped = {members[index].name for index in range(len(members)) if index not in kept}
        wiring = Wiring(
            wiring.inputs,
            wiring.outputs,
            {key: value for key, value in wiring.input_order.items() if key not in dropped},
            {key: value for key, value in wiring.output_order.items() if key not in dropped},
        )
        values = {key: value[kept] for key, value in values.items()}
        probe_values = {key: value[kept] for key, value in probe_values.items()}
        members = [members[index] for index in kept]
    check_head(head, len(members), wiring, tasks)
    for name in specs:
        if head.needs_fit:
            with stage("fitting", f"the {head.name} head on {data.source}"):
                head.fit(name, values[name], targets[name], tasks[name].kind)
        record["outputs"][name] = {
            "metric": metrics[name],
            "members": {
                member: manifest_score(value) for member, value in zip(every_name, scores[name])
            },
            "ensemble": None,  # a cascade is scored once calibrated (score_cascade)
            "ensemble_is_in_sample": head.needs_fit,
        }
        if not head.routes:
            combined = head.reference(values[name], task=tasks[name].kind, output=name)
            record["outputs"][name]["ensemble"] = manifest_score(
                score(combined, targets[name], tasks[name].kind, metrics[name])
            )
    return members, wiring, head, probe_values, record, feeds


def score_cascade(validation: dict[str, Any], head: CascadeHead, tasks: dict[str, Task]) -> None:
    """The cascade's and the full ensemble's validation scores, once it is calibrated."""
    name = head.fitted["output"]
    record = validation["outputs"][name]
    values, target, kind = head.fitted["values"], head.fitted["target"], tasks[name].kind
    full = CascadeHead(head.weights)
    full.stages, full.thresholds = [list(range(len(values)))], []
    record["ensemble"] = manifest_score(
        score(head.reference(values, task=kind, output=name), target, kind, record["metric"])
    )
    record["full_ensemble"] = manifest_score(
        score(full.reference(values, task=kind, output=name), target, kind, record["metric"])
    )


def check_head(head: Head, n_members: int, wiring: Wiring, tasks: dict[str, Task]) -> None:
    problems = head.problems(
        n_members=n_members,
        tasks={name: task.kind for name, task in tasks.items()},
        shapes={spec.name: spec.shape for spec in wiring.outputs},
    )
    if problems:
        raise FuseError(problems)


def manifest_score(value: float) -> float | None:
    """A score as the manifest keeps it: JSON has no NaN or inf, so a non-finite one
    (a member giving them, built with ``allow_nonfinite``) is null."""
    return round(float(value), 6) if math.isfinite(value) else None
