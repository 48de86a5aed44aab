"""A fused group's two forms as Keras models, and the check that its fused form is right.

The **fused form** computes every member of the group at once (``fuser.fusion.lowerings``);
the **plain form** runs them as separate branches side by side. Both take the group's
inputs and give ``(batch, G, ...)`` float32 per member output: the timing compares them,
a switch on the batch size holds both, and the build checks the fused one against the
members' own outputs in TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fuser.errors import StageError, brief, library_of
from fuser.fusion.lowerings import lower
from fuser.fusion.plan import FusionPlan, Group
from fuser.fusion.steps import Unsupported
from fuser.members import Member, branch
from runtime.convolutions import native_grouped_convolutions


def forms(group: Group, prefix: str) -> dict[str, Any]:
    """The group as one Keras model each way, ``fused`` and ``plain``: the same inputs (the
    first member's), the same ``(batch, G, ...)`` float32 outputs."""
    import keras
    from keras import ops

    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"{prefix}_input_{index}")
        for index, spec in enumerate(group.members[0].inputs)
    ]
    fused = lower(group, inputs, prefix=prefix)
    per_member = [keras.tree.flatten(branch(member)(inputs)) for member in group.members]
    plain = [
        ops.stack([outputs[index] for outputs in per_member], axis=1)
        for index in range(len(per_member[0]))
    ]
    return {
        "fused": keras.Model(
            inputs, [ops.cast(value, "float32") for value in fused], name=f"{prefix}_fused"
        ),
        "plain": keras.Model(
            inputs, [ops.cast(value, "float32") for value in plain], name=f"{prefix}_plain"
        ),
    }


def fused_outputs(group: Group, inputs: Sequence[Any], prefix: str, fusion: FusionPlan) -> Any:
    """The group computed on ``inputs``: its fused form, or both forms behind a switch on
    the batch size. Returns one ``(batch, G, ...)`` tensor per member output, or None when
    the group was turned back into plain branches (``--fusion auto``: its lowering failed;
    the plan says why).

    Raises:
        StageError: under ``--fusion on``, Keras refused the lowered layers.
    """
    from runtime.switch import BatchSwitch  # a Keras layer: imports Keras

    try:
        if group.max_fused_batch is None:
            return lower(group, inputs, prefix=prefix)
        both = forms(group, prefix)
        switch = BatchSwitch(
            both["fused"], both["plain"], group.max_fused_batch, name=f"{prefix}_switch"
        )
        return list(switch(list(inputs)))
    except Unsupported as reason:
        fusion.demote(group, str(reason))
    except Exception as error:  # Keras refused the lowered layers
        if fusion.mode != "auto":
            names = ", ".join(member.name for member in group.members)
            raise StageError("fusing", f"the fused group of {names}", error) from error
        fusion.demote(
            group, f"lowering its fused form failed ({library_of(error)}: {brief(error)})."
        )
    return None


def failing_groups(
    fusion: FusionPlan,
    members: Sequence[Member],
    wiring: Any,
    probe: dict[str, np.ndarray],
    probe_values: dict[str, np.ndarray],
    tolerance: float,
) -> list[tuple[Group, str]]:
    """The fused groups whose fused form fails in TensorFlow or disagrees with the members'
    own outputs on the probe batch, each run on its own, with why.

    ``probe_values`` are the members' outputs (fused output name -> ``(members, rows,
    ...)``, in the order of ``members``), as ``fuser.reference.member_values`` gives them.
    """
    import tensorflow as tf

    position = {member.name: index for index, member in enumerate(members)}
    failing = []
    for number, group in enumerate(fusion.groups):
        first = group.members[0]
        try:
            model = forms(group, f"check{number}")["fused"]
            function = tf.function(lambda *tensors, model=model: model(list(tensors)))
            feeds = [tf.constant(probe[name]) for name in wiring.input_order[first.name]]
            with native_grouped_convolutions("tensorflow"):
                results = tf.nest.flatten(function(*feeds))
            outputs = [np.asarray(value, np.float64) for value in results]
        except Exception as error:
            where = library_of(error) or type(error).__name__
            detail = brief(error) if where == "TensorFlow" else f"{where}: {brief(error)}"
            failing.append((group, f"fails in TensorFlow ({detail})"))
            continue
        indices = [position[member.name] for member in group.members]
        for slot, spec in enumerate(wiring.outputs):
            got = outputs[wiring.output_order[first.name][slot]]
            want = np.swapaxes(probe_values[spec.name][indices], 0, 1)
            problem = disagreement(got, want, tolerance)
            if problem:
                failing.append((group, f"{problem} on output '{spec.name}'"))
                break
    return failing


def disagreement(got: np.ndarray, want: np.ndarray, tolerance: float) -> str | None:
    """Why ``got`` differs from ``want`` beyond ``tolerance`` (absolute, and relative to the
    value's size), or None; NaN and inf must sit in the same places."""
    if got.shape != want.shape:
        return f"gives shape {got.shape} where the members give {want.shape}"
    if not np.array_equal(np.isfinite(got), np.isfinite(want)):
        return "gives NaN or inf where the members do not"
    finite = np.isfinite(want)
    difference = np.abs(got[finite] - want[finite])
    if np.any(difference > tolerance * (1.0 + np.abs(want[finite]))):
        return f"differs from the members by up to {difference.max():.3g} (tolerance {tolerance:g})"
    return None
