"""Graph assembly: members become uniquely named branches of one Keras functional model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fuser import stack as stack_lib
from fuser import uncertainty as uncertainty_lib
from fuser.errors import StageError, brief, library_of
from fuser.heads import Head
from fuser.members import Member
from fuser.stack import FusionPlan
from fuser.validate import Plan


def branch_name(member: Member) -> str:
    """The layer name of a member's branch. Unique because member names are."""
    return f"member_{member.name}"


def assemble(
    members: Sequence[Member],
    plan: Plan,
    head: Head,
    *,
    tasks: dict[str, str],
    uncertainty: bool = False,
    expose_members: bool = False,
    fusion: FusionPlan | None = None,
) -> Any:
    """One functional model: the shared inputs, a branch per member, the head per output.

    Members loaded from files often share a model name (``functional``), which a
    functional model refuses twice; each member is therefore wrapped in a branch
    model of its own name. The members themselves are not modified. For each output
    the members' tensors are stacked on axis 1, ``(batch, members, ...)``, which the
    head and the extra outputs (see ``fuser.uncertainty``) read.

    With a ``fusion`` plan, each of its groups is one stacked sub-graph (see
    ``fuser.stack``) that yields the group's ``(batch, G, ...)`` block at once, or, for a
    group stacked only up to a batch size, both forms behind a ``BatchSwitch``; a group
    whose lowering fails is demoted to plain branches and the plan says why.
    """
    import keras
    from keras import ops

    fused_inputs = {
        spec.name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=spec.name)
        for spec in plan.inputs
    }
    if head.routes:
        return _assemble_cascade(
            members, plan, head, fused_inputs, tasks=tasks, uncertainty=uncertainty, fusion=fusion
        )
    # Per output, blocks of (batch, k, ...) values and the member positions they hold.
    blocks: list[list[tuple[list[int], Any]]] = [[] for _ in plan.outputs]
    position = {member.name: index for index, member in enumerate(members)}
    stacked = set()
    for number, group in enumerate(list(fusion.groups) if fusion is not None else []):
        first = group.members[0]
        group_inputs = [fused_inputs[name] for name in plan.input_order[first.name]]
        prefix = f"stack{number}"
        try:
            if group.max_stacked_batch is None:
                outputs = stack_lib.lower(group, group_inputs, prefix=prefix)
            else:
                from runtime._switch import BatchSwitch

                forms = group_forms(group, prefix)
                switch = BatchSwitch(
                    forms["stacked"],
                    forms["plain"],
                    group.max_stacked_batch,
                    name=f"{prefix}_switch",
                )
                outputs = list(switch(group_inputs))
        except stack_lib.Unsupported as reason:
            fusion.demote(group, str(reason))
            continue
        except Exception as error:  # Keras refused the lowered layers
            names = ", ".join(member.name for member in group.members)
            if fusion.mode != "auto":
                raise StageError("fusing", f"the stacked group of {names}", error) from error
            fusion.demote(
                group, f"lowering its stacked form failed ({library_of(error)}: {brief(error)})."
            )
            continue
        indices = [position[member.name] for member in group.members]
        for slot, index in enumerate(plan.output_order[first.name]):
            blocks[slot].append((indices, ops.cast(outputs[index], "float32")))
        stacked.update(member.name for member in group.members)
    for member in members:
        if member.name in stacked:
            continue
        branch_outputs = keras.tree.flatten(
            branch(member)([fused_inputs[name] for name in plan.input_order[member.name]])
        )
        for slot, index in enumerate(plan.output_order[member.name]):
            tensor = ops.expand_dims(ops.cast(branch_outputs[index], "float32"), 1)
            blocks[slot].append(([position[member.name]], tensor))
    values = {
        spec.name: _in_member_order(blocks[slot], ops) for slot, spec in enumerate(plan.outputs)
    }
    combined = head_outputs(
        values, plan, head, tasks=tasks, uncertainty=uncertainty, expose_members=expose_members
    )
    return keras.Model(
        inputs=[fused_inputs[spec.name] for spec in plan.inputs],
        outputs=combined,
        name="fused_ensemble",
    )


def _assemble_cascade(
    members: Sequence[Member],
    plan: Plan,
    head: Head,
    fused_inputs: dict[str, Any],
    *,
    tasks: dict[str, str],
    uncertainty: bool,
    fusion: FusionPlan | None,
) -> Any:
    """The cascade (``runtime._cascade.Cascade``) around one stage model per stage.

    Outputs: the prediction, ``exit_stage`` (always: the build verifies the routing with
    it; ``fuser.ensemble.Ensemble`` drops it from the artifact unless asked for), and the
    uncertainty outputs over the members each row ran.
    """
    import keras

    from runtime._cascade import Cascade

    (spec,) = plan.outputs  # the head refuses several outputs
    task = tasks[spec.name]
    stages = [
        stage_model(members, indices, plan, fusion, f"cascade_stage{number + 1}")
        for number, indices in enumerate(head.stages)
    ]
    # The mean as weights of one: the running sum needs no scaling (fewer graph nodes).
    weights = np.ones(len(members)) if head.weights is None else head.weights
    layer = Cascade(
        stages,
        [[float(weights[index]) for index in indices] for indices in head.stages],
        head.thresholds,
        task=task,
        confidence=head.confidence,
        member_order=[index for indices in head.stages for index in indices],
        keep_members=uncertainty,
        empty=head.empty or None,
        name="cascade",
    )
    outputs = layer([fused_inputs[each.name] for each in plan.inputs])
    prediction = outputs[0]
    combined = {spec.name: prediction, EXIT_STAGE: outputs[1]}
    for kind in uncertainty_lib.kinds(task, uncertainty=uncertainty, expose_members=False):
        name = uncertainty_lib.extra_name(kind, spec.name, True)
        combined[name] = uncertainty_lib.ran_graph(
            kind, outputs[2], outputs[3], prediction, spec.shape[-1]
        )
    return keras.Model(
        inputs=[fused_inputs[each.name] for each in plan.inputs],
        outputs=combined,
        name="fused_ensemble",
    )


EXIT_STAGE = "exit_stage"


def stage_model(
    members: Sequence[Member],
    indices: Sequence[int],
    plan: Plan,
    fusion: FusionPlan | None,
    name: str,
) -> Any:
    """One cascade stage as a Keras model: the ensemble's inputs (all of them, in order)
    to the raw outputs of the members ``indices``, ``(batch, members, ...)`` float32.

    Members that make up a stacked group of ``fusion`` run stacked (or behind the
    group's switch on the batch size); others as plain branches side by side. A group
    whose lowering fails is demoted to plain branches, as ``assemble`` does.
    """
    import keras
    from keras import ops

    chosen = [members[index] for index in indices]
    inputs = {
        spec.name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"{name}_{spec.name}")
        for spec in plan.inputs
    }
    slot = 0  # one output: the head refuses several
    names = [member.name for member in chosen]
    group = next(
        (
            each
            for each in (fusion.groups if fusion is not None else [])
            if [member.name for member in each.members] == names
        ),
        None,
    )
    values = None
    if group is not None:
        first = group.members[0]
        group_inputs = [inputs[input_name] for input_name in plan.input_order[first.name]]
        try:
            if group.max_stacked_batch is None:
                outputs = stack_lib.lower(group, group_inputs, prefix=f"{name}_stack")
            else:
                from runtime._switch import BatchSwitch

                forms = group_forms(group, f"{name}_stack")
                switch = BatchSwitch(
                    forms["stacked"],
                    forms["plain"],
                    group.max_stacked_batch,
                    name=f"{name}_switch",
                )
                outputs = list(switch(group_inputs))
            values = ops.cast(outputs[plan.output_order[first.name][slot]], "float32")
        except stack_lib.Unsupported as reason:
            fusion.demote(group, str(reason))
        except Exception as error:  # Keras refused the lowered layers
            if fusion.mode != "auto":
                names_text = ", ".join(member.name for member in group.members)
                raise StageError("fusing", f"the stacked group of {names_text}", error) from error
            fusion.demote(
                group, f"lowering its stacked form failed ({library_of(error)}: {brief(error)})."
            )
    if values is None:
        columns = []
        for member in chosen:
            branch_outputs = keras.tree.flatten(
                branch(member)([inputs[input_name] for input_name in plan.input_order[member.name]])
            )
            value = branch_outputs[plan.output_order[member.name][slot]]
            columns.append(ops.expand_dims(ops.cast(value, "float32"), 1))
        values = columns[0] if len(columns) == 1 else ops.concatenate(columns, axis=1)
    return keras.Model([inputs[spec.name] for spec in plan.inputs], values, name=name)


def head_outputs(
    values: dict[str, Any],
    plan: Plan,
    head: Head,
    *,
    tasks: dict[str, str],
    uncertainty: bool = False,
    expose_members: bool = False,
) -> dict[str, Any]:
    """The head and the extra outputs, from each output's members' values stacked
    ``(batch, members, ...)`` in member order: output name -> tensor."""
    combined = {}
    single = len(plan.outputs) == 1
    for spec in plan.outputs:
        task = tasks[spec.name]
        prediction = head.combine(values[spec.name], task=task, output=spec.name)
        combined[spec.name] = prediction
        for kind in uncertainty_lib.kinds(
            task, uncertainty=uncertainty, expose_members=expose_members
        ):
            name = uncertainty_lib.extra_name(kind, spec.name, single)
            combined[name] = uncertainty_lib.graph(kind, values[spec.name], prediction, task)
    return combined


def _in_member_order(blocks: list[tuple[list[int], Any]], ops: Any) -> Any:
    """Join ``(batch, k, ...)`` blocks into ``(batch, members, ...)`` in member order."""
    order = [index for indices, _ in blocks for index in indices]
    tensors = [tensor for _, tensor in blocks]
    values = tensors[0] if len(tensors) == 1 else ops.concatenate(tensors, axis=1)
    if order == sorted(order):
        return values
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return ops.take(values, inverse, axis=1)


def branch(member: Member) -> Any:
    """The member wrapped in a model of its own, unique name (``branch_name``)."""
    import keras

    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"{member.name}_{index}")
        for index, spec in enumerate(member.inputs)
    ]
    return keras.Model(inputs=inputs, outputs=member.call(inputs), name=branch_name(member))


def group_forms(group: stack_lib.Group, prefix: str) -> dict[str, Any]:
    """The group as one Keras model each way, ``stacked`` and ``plain`` (its members side by
    side): same inputs (the first member's), same ``(batch, G, ...)`` float32 outputs."""
    import keras
    from keras import ops

    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"{prefix}_input_{index}")
        for index, spec in enumerate(group.members[0].inputs)
    ]
    stacked = stack_lib.lower(group, inputs, prefix=prefix)
    per_member = [keras.tree.flatten(branch(member)(inputs)) for member in group.members]
    plain = [
        ops.stack([outputs[index] for outputs in per_member], axis=1)
        for index in range(len(per_member[0]))
    ]
    return {
        "stacked": keras.Model(
            inputs, [ops.cast(value, "float32") for value in stacked], name=f"{prefix}_stacked"
        ),
        "plain": keras.Model(
            inputs, [ops.cast(value, "float32") for value in plain], name=f"{prefix}_plain"
        ),
    }


def failing_groups(
    fusion: FusionPlan,
    members: Sequence[Member],
    wiring: Plan,
    probe: dict[str, np.ndarray],
    probe_values: dict[str, np.ndarray],
    tolerance: float,
) -> list[tuple[stack_lib.Group, str]]:
    """The stacked groups whose stacked form fails in TensorFlow or disagrees with the
    members' own outputs on the probe batch, each run on its own, with why.

    ``probe_values`` are the members' outputs (fused output name -> ``(members, rows,
    ...)``, in the order of ``members``), as ``fuser.ensemble.member_values`` gives them.
    """
    import tensorflow as tf

    from runtime._keras import native_grouped_convolutions

    position = {member.name: index for index, member in enumerate(members)}
    failing = []
    for number, group in enumerate(fusion.groups):
        first = group.members[0]
        try:
            model = group_forms(group, f"check{number}")["stacked"]
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
            problem = _disagreement(got, want, tolerance)
            if problem:
                failing.append((group, f"{problem} on output '{spec.name}'"))
                break
    return failing


def _disagreement(got: np.ndarray, want: np.ndarray, tolerance: float) -> str | None:
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
