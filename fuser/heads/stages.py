"""A cascade's stages: the units it may run (fused groups, members), in which order, at
what cost, measured on the building machine (``--head cascade``; ``fuser.heads.calibration``).

Each stage is converted to ONNX on its own, to time it and to learn whether ONNX Runtime
runs it on zero rows (what a stage no row reached sees in the artifact; a fused group is
refused them, and gets one padded row instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fuser.assembly import stage_model
from fuser.conversion.convert import DEFAULT_OPSET, keras_to_onnx
from fuser.errors import FuseError, brief, library_of
from fuser.fusion.costs import batches_for, time_models
from fuser.fusion.plan import FusionPlan
from fuser.heads import CascadeHead
from fuser.members import Member
from fuser.validate import Wiring

# Stages are timed at this batch size (fewer rows for large inputs, as fuser.fusion.costs
# bounds them): the cost per row of a batch this size is what a throughput-bound server
# pays. Batch 1 is timed too and recorded.
COST_BATCH = 256
_TIMING_SECONDS = 0.12


@dataclass(frozen=True)
class StageCosts:
    """Cost per row of each unit (a stage candidate), how it was obtained, and its unit."""

    per_row: list[float]
    batch_1: list[float | None]
    source: str
    unit: str


# -- the units: fused groups and single members ----------------------------------------


def units(members: Sequence[Member], fusion: FusionPlan) -> list[list[int]]:
    """Each fused group (its members in group order), then each other member."""
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
    """The units the cascade will order: a fused group is one stage.

    A group that ``--cascade-order`` splits, or that holds every member (which would
    leave one stage), is turned back into plain members under ``--fusion auto``, and
    refused under ``--fusion on``.

    Raises:
        FuseError: ``--fusion on`` with such a group.
    """
    names = [member.name for member in members]
    order = [name for name in head.order if name in names] if head.order is not None else None
    for group in list(fusion.groups):
        group_names = [member.name for member in group.members]
        reason = None
        if len(group_names) == len(members):
            reason = (
                f"--fusion {fusion.mode} runs every member ({', '.join(group_names)}) as one "
                "fused computation, which leaves the cascade a single stage"
            )
        elif order is not None:
            spots = sorted(order.index(name) for name in group_names)
            if spots != list(range(spots[0], spots[0] + len(spots))):
                reason = (
                    f"--cascade-order puts {', '.join(group_names)} in different stages, but "
                    f"--fusion {fusion.mode} runs them as one fused computation"
                )
        if reason is None:
            continue
        if fusion.mode == "on":
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
    wiring: Wiring,
    fusion: FusionPlan,
    stage_units: list[list[int]],
) -> tuple[StageCosts, list[str]]:
    """Each unit converted to ONNX on its own: its cost per row, and how the artifact must
    run it when no row reaches it (``runtime.cascade.EMPTY``).

    The cost is given (``head.costs``), else timed with ONNX Runtime on this machine,
    else (when converting or timing fails) its parameter count. A unit that ONNX Runtime
    runs on zero rows is run so; one it refuses (a fused group: its dense layers are
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
    members: Sequence[Member], wiring: Wiring, fusion: FusionPlan, unit: list[int], number: int
) -> bytes:
    model = stage_model(members, unit, wiring, fusion, f"examined_stage{number}")
    names = [spec.name for spec in wiring.inputs]
    return keras_to_onnx(model, names, wiring.inputs, DEFAULT_OPSET)[0].SerializeToString()


def _empty_mode(model: bytes, wiring: Wiring) -> str:
    """``run`` if ONNX Runtime runs ``model`` on zero rows, else ``pad``."""
    import onnxruntime

    feeds = {spec.name: np.zeros((0, *spec.shape[1:]), dtype=spec.dtype) for spec in wiring.inputs}
    try:
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        outputs = session.run(None, feeds)
    except Exception:  # onnxruntime raises its own untyped errors
        return "pad"
    return "run" if all(output.shape[:1] == (0,) for output in outputs) else "pad"


def _timed(models: list[bytes], wiring: Wiring) -> StageCosts:
    """The fastest call of each unit's ONNX model at batch 1 and ``COST_BATCH`` rows, in a
    fresh process that imports only numpy and onnxruntime (``fuser.fusion.costs``)."""
    values_per_row = sum(math.prod(spec.shape[1:]) for spec in wiring.inputs)
    batch = min(COST_BATCH, batches_for(values_per_row)[-1])
    forms = [f"stage{number}" for number in range(len(models))]
    timed = time_models(
        dict(zip(forms, models)),
        [(spec.name, spec) for spec in wiring.inputs],
        [1, batch],
        seconds=_TIMING_SECONDS,
    )["ms"]
    return StageCosts(
        [timed[form][1] / batch for form in forms],
        [timed[form][0] for form in forms],
        f"ONNX Runtime on this machine, each stage's own graph, fastest call at batch {batch} "
        "(per row) and at batch 1, in a fresh process",
        "ms",
    )
