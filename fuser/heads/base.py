"""The base of every head, and the checks heads share (weights, tasks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fuser.errors import FuseError
from fuser.heads.distributions import LOGITS, PROBABILITIES, REGRESSION, TASKS


class Head:
    """Base class. One head instance serves every output of the ensemble."""

    name: ClassVar[str]
    tasks: ClassVar[frozenset[str]] = frozenset(TASKS)
    needs_fit: ClassVar[bool] = False
    # A routing head runs only some members per row: ``fuser.assembly.assemble`` builds it
    # around the members (``runtime.cascade.Cascade``) instead of calling ``combine``.
    routes: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        """Parameters recorded in the manifest."""
        return {}

    def problems(self, *, n_members: int, tasks: dict[str, str], shapes: dict) -> list[str]:
        """What stops this head from combining these members (empty when it can)."""
        problems = []
        for output, task in tasks.items():
            if task not in self.tasks:
                allowed = " or ".join(sorted(self.tasks))
                problems.append(
                    f"The {self.name!r} head combines {allowed} outputs, but output "
                    f"{output!r} is {task_phrase(task)}; choose another head, or --task if "
                    "the task was inferred wrongly."
                )
        return problems

    def fitted_parameters(self) -> int:
        """How many parameters ``fit`` learned (0 for heads that learn nothing)."""
        return 0

    def fit(self, output: str, values: np.ndarray, target: np.ndarray, task: str) -> None:
        """Learn from validation data (heads with ``needs_fit``): values ``(members, rows, ...)``."""

    def combine(self, values: Any, *, task: str, output: str) -> Any:
        """The combined Keras tensor of one output; ``values`` is ``(batch, members, ...)``."""
        raise NotImplementedError

    def reference(self, values: np.ndarray, *, task: str, output: str) -> np.ndarray:
        """NumPy reference: ``values`` is ``(members, batch, ...)``."""
        raise NotImplementedError


def task_phrase(task: str) -> str:
    return {
        PROBABILITIES: "a classifier's probabilities",
        LOGITS: "a classifier's logits",
        REGRESSION: "a regression",
    }[task]


def listed(values: np.ndarray) -> str:
    return ", ".join(f"{value:g}" for value in np.atleast_1d(values))


def normalised_weights(weights: Sequence[float]) -> np.ndarray:
    """Finite, non-negative weights, not all zero, scaled to sum to one.

    Raises:
        FuseError: any other weights, naming them.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise FuseError(
            f"Weights must be finite, non-negative numbers, one per member; got {listed(weights)}."
        )
    if weights.sum() <= 0:
        raise FuseError(f"Weights must not all be zero; got {listed(weights)}.")
    return weights / weights.sum()


def weight_count_problems(weights: np.ndarray, n_members: int) -> list[str]:
    if len(weights) == n_members:
        return []
    return [
        f"--weights gives {len(weights)} weights for {n_members} members; give one weight per "
        "member, in the members' order."
    ]
