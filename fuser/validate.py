"""Check that loaded members fit together and work out how to wire them.

``check_members`` returns every problem (never raises); ``wire`` raises one
``FuseError`` carrying them all, or returns the wiring the fuser follows.
``nonfinite_counts`` and ``nonfinite_problems`` check what the members give on the
probe batch: NaN or inf there refuses the build unless it is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from fuser.errors import FuseError
from fuser.members import Member
from runtime.manifest import TensorSpec, format_shape

_VALID_TENSOR_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")
# Input dtypes the probe batch, the runtime and every artifact format can feed.
_INPUT_DTYPES = (
    "bool",
    *(f"int{bits}" for bits in (8, 16, 32, 64)),
    *(f"uint{bits}" for bits in (8, 16, 32, 64)),
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)


@dataclasses.dataclass(frozen=True)
class Wiring:
    """How the fused model is wired.

    ``inputs``/``outputs`` are the fused signature (batch dimension ``None``).
    ``input_order[member]`` lists, for each of that member's inputs in its own order,
    the fused input it reads. ``output_order[member]`` lists, for each fused output,
    the index of the member output that feeds it.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_order: dict[str, list[str]]
    output_order: dict[str, list[int]]


def check_members(members: Sequence[Member], *, input_name: str | None = None) -> list[str]:
    """Every reason these members cannot be fused, one sentence each, naming the member."""
    try:
        wire(members, input_name=input_name)
    except FuseError as error:
        return error.problems
    return []


def wire(members: Sequence[Member], *, input_name: str | None = None) -> Wiring:
    """Work out the fused signature and wiring.

    Raises:
        FuseError: listing every incompatibility found.
    """
    if not members:
        raise FuseError("No members were given; an ensemble needs at least one member.")
    problems: list[str] = []
    first = members[0]
    if input_name is not None and len(first.inputs) != 1:
        problems.append(
            f"--input-name applies to members with one input; {_mention(first)} has "
            f"{len(first.inputs)} ({', '.join(spec.name for spec in first.inputs)})."
        )
    if input_name is not None and not _VALID_TENSOR_NAME.match(input_name):
        problems.append(
            f"The input name {input_name!r} is not a valid tensor name: use letters, digits, "
            "'_', '.', '-' and '/', starting with a letter, digit or '.'."
        )
    inputs, input_order = _plan_inputs(members, input_name, problems)
    outputs, output_order = _plan_outputs(members, problems)
    if problems:
        raise FuseError(problems)
    return Wiring(
        inputs=inputs, outputs=outputs, input_order=input_order, output_order=output_order
    )


def _plan_inputs(
    members: Sequence[Member], input_name: str | None, problems: list[str]
) -> tuple[tuple[TensorSpec, ...], dict[str, list[str]]]:
    first = members[0]
    order: dict[str, list[str]] = {}
    if len(first.inputs) == 1:
        fused_name = input_name or _tensor_name(first.inputs[0].name)
        fused = first.inputs[0]
        for member in members:
            if len(member.inputs) != 1:
                problems.append(_count_problem(member, first, "input", member.inputs, first.inputs))
                continue
            fused = _merge(fused, member.inputs[0], member, first, "input", problems)
            order[member.name] = [fused_name]
        return (TensorSpec(fused_name, _batch_free(fused.shape), fused.dtype),), order

    names = [spec.name for spec in first.inputs]
    merged = {spec.name: spec for spec in first.inputs}
    for member in members:
        member_names = [spec.name for spec in member.inputs]
        if len(member_names) != len(names):
            problems.append(_count_problem(member, first, "input", member.inputs, first.inputs))
            continue
        if set(member_names) != set(names):
            problems.append(
                f"{member.describe()} has inputs named {member_names}, but {_mention(first)} "
                f"has {names}; members with several inputs are matched by input name."
            )
            continue
        for spec in member.inputs:
            merged[spec.name] = _merge(merged[spec.name], spec, member, first, "input", problems)
        order[member.name] = member_names
    for name in names:
        if not _VALID_TENSOR_NAME.match(name):
            problems.append(
                f"{first.describe()} has an input named {name!r}, which is not a valid tensor "
                "name; rename the input in the member."
            )
    fused = tuple(
        TensorSpec(name, _batch_free(merged[name].shape), merged[name].dtype) for name in names
    )
    return fused, order


def _plan_outputs(
    members: Sequence[Member], problems: list[str]
) -> tuple[tuple[TensorSpec, ...], dict[str, list[int]]]:
    first = members[0]
    first_names = [spec.name for spec in first.outputs]
    # Several outputs are matched by name when every member names them alike
    # (same set), otherwise by position: formats rename outputs (output_0, ...).
    by_name = len(first_names) > 1 and all(
        sorted(spec.name for spec in member.outputs) == sorted(first_names) for member in members
    )
    order: dict[str, list[int]] = {}
    merged = list(first.outputs)
    for member in members:
        if len(member.outputs) != len(first.outputs):
            problems.append(_count_problem(member, first, "output", member.outputs, first.outputs))
            continue
        if by_name:
            positions = {spec.name: index for index, spec in enumerate(member.outputs)}
            indices = [positions[name] for name in first_names]
        else:
            indices = list(range(len(member.outputs)))
        order[member.name] = indices
        for slot, index in enumerate(indices):
            spec = member.outputs[index]
            if not _is_float(spec.dtype):
                problems.append(
                    f"{member.describe()} has output {spec.name!r} of dtype {spec.dtype}; only "
                    "floating-point outputs can be combined."
                )
                continue
            merged[slot] = _merge(merged[slot], spec, member, first, "output", problems)
    if len(first.outputs) == 1:
        names = ["prediction"]
    else:
        names = _unique([_tensor_name(name) for name in first_names])
    outputs = tuple(
        TensorSpec(name, _batch_free(spec.shape), "float32") for name, spec in zip(names, merged)
    )
    return outputs, order


def _merge(
    fused: TensorSpec,
    spec: TensorSpec,
    member: Member,
    first: Member,
    kind: str,
    problems: list[str],
) -> TensorSpec:
    """Unify two specs, batch aside: equal dims, or one of them free (``None``)."""
    if kind == "input" and spec.dtype not in _INPUT_DTYPES:
        problems.append(
            f"{member.describe()} expects {kind} {spec.name!r} of dtype {spec.dtype}, but fused "
            "inputs must be numbers or booleans; move the preprocessing of that input out of "
            "the member, so it takes numbers."
        )
    elif kind == "input" and spec.dtype != fused.dtype:
        problems.append(
            f"{member.describe()} expects {kind} {spec.name!r} of dtype {spec.dtype}, but "
            f"{_mention(first)} expects {fused.dtype}; members must share one input dtype."
        )
    if len(spec.shape) != len(fused.shape) or any(
        a is not None and b is not None and a != b for a, b in zip(spec.shape[1:], fused.shape[1:])
    ):
        verb = "expects" if kind == "input" else "produces"
        problems.append(
            f"{member.describe()} {verb} {kind} {spec.name!r} of shape {format_shape(spec.shape)}, but "
            f"{_mention(first)} {verb} {format_shape(fused.shape)}; members must share one {kind} "
            "shape (batch aside)."
        )
        return fused
    shape = tuple(a if a is not None else b for a, b in zip(fused.shape, spec.shape))
    return TensorSpec(fused.name, shape, fused.dtype)


def nonfinite_counts(
    members: Sequence[Member], wiring: Wiring, probe_values: dict[str, np.ndarray]
) -> dict[str, dict[str, dict[str, int]]]:
    """The NaN and inf each member gives on the probe batch.

    Args:
        probe_values: fused output name -> the members' values, ``(members, rows, ...)``.

    Returns:
        member name -> fused output name -> ``{"nan": ..., "inf": ..., "values": ...}``
        (``values`` is the output's size), for the outputs holding any; empty when all
        values are finite.
    """
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for position, member in enumerate(members):
        for spec in wiring.outputs:
            values = probe_values[spec.name][position]
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            if nan or inf:
                counts.setdefault(member.name, {})[spec.name] = {
                    "nan": nan,
                    "inf": inf,
                    "values": int(values.size),
                }
    return counts


def nonfinite_problems(
    members: Sequence[Member], wiring: Wiring, counts: dict[str, dict[str, dict[str, int]]]
) -> list[str]:
    """One sentence per member in ``counts`` (see ``nonfinite_counts``), naming its outputs."""
    problems = []
    for member in members:
        found = counts.get(member.name)
        if not found:
            continue
        parts = []
        for slot, spec in enumerate(wiring.outputs):
            record = found.get(spec.name)
            if record is None:
                continue
            output = member.outputs[wiring.output_order[member.name][slot]].name
            kinds = ", ".join(
                f"{record[kind]} {label}"
                for kind, label in (("nan", "NaN"), ("inf", "inf"))
                if record[kind]
            )
            parts.append(
                f"{record['nan'] + record['inf']} of {record['values']} values of output "
                f"{output!r} are NaN or inf ({kinds})"
            )
        problems.append(
            f"{member.describe()} gives non-finite values on the probe batch: "
            f"{', and '.join(parts)}; fix the member, or pass --allow-nonfinite "
            "(allow_nonfinite=True) to build anyway."
        )
    return problems


def _count_problem(member: Member, first: Member, kind: str, theirs, ours) -> str:
    return (
        f"{member.describe()} has {len(theirs)} {kind}s ({', '.join(spec.name for spec in theirs)}), "
        f"but {_mention(first)} has {len(ours)} ({', '.join(spec.name for spec in ours)}); "
        f"members must have the same number of {kind}s."
    )


def _batch_free(shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
    return (None, *shape[1:])


def _tensor_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.\-/]", "_", name.split(":")[0])
    return cleaned if _VALID_TENSOR_NAME.match(cleaned) else f"input_{cleaned}"


def _is_float(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16", "float32", "float64")


def _unique(names: list[str]) -> list[str]:
    result: list[str] = []
    for name in names:
        candidate, index = name, 1
        while candidate in result:
            candidate, index = f"{name}_{index}", index + 1
        result.append(candidate)
    return result


def _mention(member: Member) -> str:
    """The member as named mid-sentence: 'member "a" (a.keras)'."""
    description = member.describe()
    return description[:1].lower() + description[1:]
