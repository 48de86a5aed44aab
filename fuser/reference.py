"""Members run one by one, as a user would without fuser: the reference every check uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fuser.errors import FuseError
from fuser.members import Member
from fuser.validate import Wiring


def member_values(
    members: Sequence[Member],
    wiring: Wiring,
    feeds: dict[str, np.ndarray],
    *,
    rows: int = 4096,
    what: str = "its inputs",
) -> dict[str, np.ndarray]:
    """Each member run on its own: fused output name -> ``(members, rows, ...)`` float64.

    Raises:
        FuseError: a member fails on ``feeds`` (described by ``what``), naming it.
    """
    import tensorflow as tf

    per_output: dict[str, list[np.ndarray]] = {spec.name: [] for spec in wiring.outputs}
    total = len(next(iter(feeds.values())))
    for member in members:
        if member.model is None:  # recorded: its outputs on these very feeds are known
            recorded = member.recorded.probe_outputs
            for slot, spec in enumerate(wiring.outputs):
                index = wiring.output_order[member.name][slot]
                per_output[spec.name].append(recorded[index].astype(np.float64))
            continue
        chunks: list[list[np.ndarray]] = []
        for start in range(0, total, rows):
            tensors = [
                tf.constant(feeds[name][start : start + rows])
                for name in wiring.input_order[member.name]
            ]
            try:
                chunks.append([np.asarray(value) for value in member.call(tensors)])
            except Exception as error:  # the member's own computation failed
                raise FuseError(
                    f"{member.describe()} fails when run on {what} ({type(error).__name__}, "
                    "--debug shows it); check that it runs on plain tensors of the shapes and "
                    "dtypes its signature declares (ragged and sparse inputs are not supported)."
                ) from error
        outputs = [np.concatenate(parts) for parts in zip(*chunks)]
        for slot, spec in enumerate(wiring.outputs):
            index = wiring.output_order[member.name][slot]
            per_output[spec.name].append(outputs[index].astype(np.float64))
    return {name: np.stack(values) for name, values in per_output.items()}
