"""Graph assembly: members become uniquely named branches of one Keras functional model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fuser import uncertainty as uncertainty_lib
from fuser.heads import Head
from fuser.members import Member
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
) -> Any:
    """One functional model: the shared inputs, a branch per member, the head per output.

    Members loaded from files often share a model name (``functional``), which a
    functional model refuses twice; each member is therefore wrapped in a branch
    model of its own name. The members themselves are not modified. For each output
    the members' tensors are stacked on axis 1, ``(batch, members, ...)``, which the
    head and the extra outputs (see ``fuser.uncertainty``) read.
    """
    import keras
    from keras import ops

    fused_inputs = {
        spec.name: keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=spec.name)
        for spec in plan.inputs
    }
    per_output: list[list[Any]] = [[] for _ in plan.outputs]
    for member in members:
        branch = _branch(member, keras)
        branch_outputs = keras.tree.flatten(
            branch([fused_inputs[name] for name in plan.input_order[member.name]])
        )
        for slot, index in enumerate(plan.output_order[member.name]):
            per_output[slot].append(branch_outputs[index])
    combined = {}
    single = len(plan.outputs) == 1
    for slot, spec in enumerate(plan.outputs):
        values = ops.stack([ops.cast(tensor, "float32") for tensor in per_output[slot]], axis=1)
        task = tasks[spec.name]
        prediction = head.combine(values, task=task, output=spec.name)
        combined[spec.name] = prediction
        for kind in uncertainty_lib.kinds(
            task, uncertainty=uncertainty, expose_members=expose_members
        ):
            name = uncertainty_lib.extra_name(kind, spec.name, single)
            combined[name] = uncertainty_lib.graph(kind, values, prediction, task)
    return keras.Model(
        inputs=[fused_inputs[spec.name] for spec in plan.inputs],
        outputs=combined,
        name="fused_ensemble",
    )


def _branch(member: Member, keras: Any) -> Any:
    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"{member.name}_{index}")
        for index, spec in enumerate(member.inputs)
    ]
    return keras.Model(inputs=inputs, outputs=member.call(inputs), name=branch_name(member))
