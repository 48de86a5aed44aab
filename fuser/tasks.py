"""What each output of the ensemble is: a classifier's probabilities or logits, or a regression.

Inferred per output from the members' final activation (Keras members), the ``from_logits``
flag of the loss they were compiled with, and, where a SavedModel hides both, from the values
the members give on the probe batch. ``--task`` overrides. Every member must agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fuser.errors import FuseError
from fuser.heads import LOGITS, PROBABILITIES, REGRESSION, TASKS
from fuser.members import Member


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str
    reason: str

    def to_manifest(self) -> dict[str, str]:
        return {"task": self.kind, "reason": self.reason}


def parse_task_option(task: str | dict[str, str] | None, outputs: Sequence[str]) -> dict[str, str]:
    """``--task`` as output name -> task: one task for every output, or ``NAME=TASK`` pairs.

    Raises:
        FuseError: an unknown task or output name.
    """
    if task is None:
        return {}
    if isinstance(task, str):
        items = [task]
    elif isinstance(task, dict):
        items = [f"{name}={kind}" for name, kind in task.items()]
    else:
        items = list(task)
    chosen, problems = {}, []
    for item in items:
        name, _, kind = item.rpartition("=")
        if kind not in TASKS:
            problems.append(f"Unknown task {kind!r}; choose one of: {', '.join(TASKS)}.")
        elif name and name not in outputs:
            problems.append(
                f"--task names output {name!r}, but the ensemble's outputs are "
                f"{', '.join(outputs)}."
            )
        elif name:
            chosen[name] = kind
        else:
            chosen.update(dict.fromkeys(outputs, kind))
    if problems:
        raise FuseError(problems)
    return chosen


def infer_tasks(
    members: Sequence[Member],
    output_order: dict[str, list[int]],
    outputs: Sequence[str],
    probe_values: dict[str, np.ndarray],
    override: dict[str, str],
) -> dict[str, Task]:
    """The task of every fused output.

    Args:
        output_order: for each member, the index of its output feeding each fused output.
        probe_values: fused output name -> members' values on the probe batch,
            ``(members, rows, ...)``.
        override: output name -> task chosen by the user.

    Raises:
        FuseError: members that disagree on an output's task, naming each.
    """
    tasks, problems = {}, []
    for slot, output in enumerate(outputs):
        if output in override:
            tasks[output] = Task(override[output], "given with --task")
            continue
        seen = {}
        for position, member in enumerate(members):
            index = output_order[member.name][slot]
            seen[member.name] = _member_task(member, index, probe_values[output][position])
        kinds = {task.kind for task in seen.values()}
        if len(kinds) > 1:
            listing = "; ".join(
                f'member "{name}": {task.kind} ({task.reason})' for name, task in seen.items()
            )
            problems.append(
                f"The members disagree on what output {output!r} is: {listing}. Pass --task "
                f"{output}=TASK to decide."
            )
            continue
        first = next(iter(seen.values()))
        tasks[output] = first
    if problems:
        raise FuseError(problems)
    return tasks


def hints(member: Member) -> dict[str, Any]:
    """What task inference reads from a loaded member's layers: the activation of each
    output and whether its loss took logits (kept in its record, ``fuser.members.records``)."""
    activations = [_final_activation(member.model, index) for index in range(len(member.outputs))]
    logits = "linear" in activations and _compiled_from_logits(member)
    return {"activations": activations, "from_logits": bool(logits)}


def _member_task(member: Member, index: int, values: np.ndarray) -> Task:
    columns = values.shape[-1] if values.ndim > 1 else 1
    if member.model is None:  # recorded: what its layers said when it was loaded
        recorded = member.recorded.hints
        activation = recorded["activations"][index]
        from_logits = recorded["from_logits"]
    else:
        activation = _final_activation(member.model, index)
        from_logits = activation == "linear" and _compiled_from_logits(member)
    if activation == "softmax":
        return Task(PROBABILITIES, "softmax output")
    if activation == "sigmoid":
        if columns == 1:
            return Task(PROBABILITIES, "one sigmoid column: the probability of the positive class")
        return Task(REGRESSION, "sigmoid over several columns (multi-label): values combined alone")
    if activation is not None:
        if activation == "linear" and from_logits:
            return Task(LOGITS, "linear output and a loss compiled with from_logits=True")
        return Task(REGRESSION, f"{activation} output")
    if _looks_like_probabilities(values):
        return Task(PROBABILITIES, "no activation recorded; probe outputs are distributions")
    return Task(REGRESSION, "no activation recorded; probe outputs are not distributions")


def _final_activation(model: Any, index: int) -> str | None:
    """The activation that produces output ``index`` of a Keras model; None if unknown."""
    outputs = getattr(model, "outputs", None)
    if not outputs or index >= len(outputs):
        return None
    history = getattr(outputs[index], "_keras_history", None)
    layer = getattr(history, "operation", None) if history is not None else None
    if layer is None:
        return None
    kind = type(layer).__name__
    if kind == "Softmax":
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear" if kind in ("Dense", "EinsumDense", "Conv1D", "Conv2D") else kind.lower()
    return getattr(activation, "__name__", str(activation))


def _compiled_from_logits(member: Member) -> bool:
    """Whether the member was compiled with a loss taking logits (``from_logits=True``).

    Members are loaded without compiling, so the compile configuration is read from the
    file: ``compile_config`` in a ``.keras`` zip, ``training_config`` in a legacy ``.h5``.
    """
    loss = getattr(member.model, "loss", None)
    if loss is not None and hasattr(loss, "get_config"):
        return bool(loss.get_config().get("from_logits", False))
    return _mentions_from_logits(_compile_config(member))


def _compile_config(member: Member) -> Any:
    import json
    import zipfile

    try:
        if member.format == "keras":
            with zipfile.ZipFile(member.source) as archive:
                return json.loads(archive.read("config.json")).get("compile_config")
        if member.format == "h5":
            import h5py

            with h5py.File(member.source, "r") as file:
                text = file.attrs.get("training_config")
            return json.loads(text) if text is not None else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return None


def _mentions_from_logits(config: Any) -> bool:
    if isinstance(config, dict):
        if config.get("from_logits") is True:
            return True
        return any(_mentions_from_logits(value) for value in config.values())
    if isinstance(config, list):
        return any(_mentions_from_logits(value) for value in config)
    return False


def _looks_like_probabilities(values: np.ndarray) -> bool:
    if values.ndim < 2 or values.shape[-1] < 2 or not np.all(np.isfinite(values)):
        return False
    return bool(
        np.all(values >= -1e-6)
        and np.all(values <= 1 + 1e-6)
        and np.allclose(values.sum(axis=-1), 1.0, atol=1e-4)
    )
