"""Assembly: the members and the head become one Keras functional model.

Each plain member is a branch (``fuser.members.branch``), each fused group one sub-graph
(``fuser.fusion.forms.fused_outputs``); per output, the members' values are stacked
``(batch, members, ...)`` in member order, which the head and the extra outputs read. A
cascade head routes rows between stages instead (``runtime.cascade.Cascade``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fuser import uncertainty as uncertainty_lib
from fuser.fusion.forms import fused_outputs
from fuser.fusion.plan import FusionPlan
from fuser.heads import Head
from fuser.members import Member, branch
from fuser.validate import Wiring
from runtime.manifest import TensorSpec

EXIT_STAGE = "exit_stage"


def assemble(
    members: Sequence[Member],
    wiring: Wiring,
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

    With a ``fusion`` plan, each of its groups is one fused sub-graph that yields the
    group's ``(batch, G, ...)`` block at once, or, for a group fused only up to a batch
    size, both forms behind a switch; a group whose lowering fails under ``--fusion
    auto`` is turned back into plain branches and the plan says why.
    """
    import keras
    from keras import ops

    fused_inputs = {
        spec.name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=spec.name)
        for spec in wiring.inputs
    }
    if head.routes:
        return _assemble_cascade(
            members, wiring, head, fused_inputs, tasks=tasks, uncertainty=uncertainty, fusion=fusion
        )
    # Per output, blocks of (batch, k, ...) values and the member positions they hold.
    blocks: list[list[tuple[list[int], Any]]] = [[] for _ in wiring.outputs]
    position = {member.name: index for index, member in enumerate(members)}
    fused = set()
    for number, group in enumerate(list(fusion.groups) if fusion is not None else []):
        first = group.members[0]
        group_inputs = [fused_inputs[name] for name in wiring.input_order[first.name]]
        # fused<N>: the prefix of a group's layers, node names say where they come from.
        outputs = fused_outputs(group, group_inputs, f"fused{number}", fusion)
        if outputs is None:  # turned back into plain branches
            continue
        indices = [position[member.name] for member in group.members]
        for slot, index in enumerate(wiring.output_order[first.name]):
            blocks[slot].append((indices, ops.cast(outputs[index], "float32")))
        fused.update(member.name for member in group.members)
    for member in members:
        if member.name in fused:
            continue
        branch_outputs = keras.tree.flatten(
            branch(member)([fused_inputs[name] for name in wiring.input_order[member.name]])
        )
        for slot, index in enumerate(wiring.output_order[member.name]):
            tensor = ops.expand_dims(ops.cast(branch_outputs[index], "float32"), 1)
            blocks[slot].append(([position[member.name]], tensor))
    values = {
        spec.name: _in_member_order(blocks[slot], ops) for slot, spec in enumerate(wiring.outputs)
    }
    combined = head_outputs(
        values, wiring, head, tasks=tasks, uncertainty=uncertainty, expose_members=expose_members
    )
    return keras.Model(
        inputs=[fused_inputs[spec.name] for spec in wiring.inputs],
        outputs=combined,
        name="fused_ensemble",
    )


def _assemble_cascade(
    members: Sequence[Member],
    wiring: Wiring,
    head: Head,
    fused_inputs: dict[str, Any],
    *,
    tasks: dict[str, str],
    uncertainty: bool,
    fusion: FusionPlan | None,
) -> Any:
    """The cascade (``runtime.cascade.Cascade``) around one stage model per stage.

    Outputs: the prediction, ``exit_stage`` (always: the build verifies the routing with
    it; ``fuser.ensemble.Ensemble`` drops it from the artifact unless asked for), and the
    uncertainty outputs over the members each row ran.
    """
    import keras

    from runtime.cascade import Cascade  # a Keras layer: imports Keras

    (spec,) = wiring.outputs  # the head refuses several outputs
    task = tasks[spec.name]
    stages = [
        stage_model(members, indices, wiring, fusion, f"cascade_stage{number + 1}")
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
    outputs = layer([fused_inputs[each.name] for each in wiring.inputs])
    prediction = outputs[0]
    combined = {spec.name: prediction, EXIT_STAGE: outputs[1]}
    for kind in uncertainty_lib.kinds(task, uncertainty=uncertainty, expose_members=False):
        name = uncertainty_lib.extra_name(kind, spec.name, True)
        combined[name] = uncertainty_lib.ran_graph(
            kind, outputs[2], outputs[3], prediction, spec.shape[-1]
        )
    return keras.Model(
        inputs=[fused_inputs[each.name] for each in wiring.inputs],
        outputs=combined,
        name="fused_ensemble",
    )


def stage_model(
    members: Sequence[Member],
    indices: Sequence[int],
    wiring: Wiring,
    fusion: FusionPlan | None,
    name: str,
) -> Any:
    """One cascade stage as a Keras model: the ensemble's inputs (all of them, in order)
    to the raw outputs of the members ``indices``, ``(batch, members, ...)`` float32.

    Members that make up a fused group of ``fusion`` run fused (or behind the group's
    switch on the batch size); others as plain branches side by side. A group whose
    lowering fails is turned back into plain branches, as ``assemble`` does.
    """
    import keras
    from keras import ops

    chosen = [members[index] for index in indices]
    inputs = {
        spec.name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"{name}_{spec.name}")
        for spec in wiring.inputs
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
        group_inputs = [inputs[input_name] for input_name in wiring.input_order[first.name]]
        outputs = fused_outputs(group, group_inputs, f"{name}_stack", fusion)
        if outputs is not None:
            values = ops.cast(outputs[wiring.output_order[first.name][slot]], "float32")
    if values is None:
        columns = []
        for member in chosen:
            branch_outputs = keras.tree.flatten(
                branch(member)(
                    [inputs[input_name] for input_name in wiring.input_order[member.name]]
                )
            )
            value = branch_outputs[wiring.output_order[member.name][slot]]
            columns.append(ops.expand_dims(ops.cast(value, "float32"), 1))
        values = columns[0] if len(columns) == 1 else ops.concatenate(columns, axis=1)
    return keras.Model([inputs[spec.name] for spec in wiring.inputs], values, name=name)


def head_outputs(
    values: dict[str, Any],
    wiring: Wiring,
    head: Head,
    *,
    tasks: dict[str, str],
    uncertainty: bool = False,
    expose_members: bool = False,
) -> dict[str, Any]:
    """The head and the extra outputs, from each output's members' values stacked
    ``(batch, members, ...)`` in member order: output name -> tensor."""
    combined = {}
    single = len(wiring.outputs) == 1
    for spec in wiring.outputs:
        task = tasks[spec.name]
        prediction = head.combine(values[spec.name], task=task, output=spec.name)
        combined[spec.name] = prediction
        for kind in uncertainty_lib.kinds(
            task, uncertainty=uncertainty, expose_members=expose_members
        ):
            name = uncertainty_lib.extra_name(kind, spec.name, single)
            combined[name] = uncertainty_lib.graph(kind, values[spec.name], prediction, task)
    return combined


def output_specs(
    wiring: Wiring,
    head: Head,
    count: int,
    *,
    tasks: dict[str, str],
    uncertainty: bool = False,
    expose_members: bool = False,
) -> tuple[TensorSpec, ...]:
    """The fused outputs (names, shapes, float32) of ``count`` members under ``head``, from
    the head alone: what the fused model will answer, before it is assembled."""
    import keras

    stacked = {
        spec.name: keras.Input((count, *spec.shape[1:]), name=f"stacked_{spec.name}")
        for spec in wiring.outputs
    }
    outputs = head_outputs(
        stacked, wiring, head, tasks=tasks, uncertainty=uncertainty, expose_members=expose_members
    )
    return tuple(
        TensorSpec(name, tuple(tensor.shape), "float32") for name, tensor in outputs.items()
    )


def _in_member_order(blocks: list[tuple[list[int], Any]], ops: Any) -> Any:
    """Join ``(batch, k, ...)`` blocks into ``(batch, members, ...)`` in member order."""
    order = [index for indices, _ in blocks for index in indices]
    tensors = [tensor for _, tensor in blocks]
    values = tensors[0] if len(tensors) == 1 else ops.concatenate(tensors, axis=1)
    if order == sorted(order):
        return values
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return ops.take(values, inverse, axis=1)
