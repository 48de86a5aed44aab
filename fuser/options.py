"""Every option of a build, declared once and checked once, before TensorFlow is imported.

``fuser.build(members, head, **options)`` and the CLI both go through ``BuildOptions``:
an unknown keyword, a value of the wrong type or range, or options that do not go
together (a cascade option without the cascade head, ``--select greedy`` with a head it
cannot feed...) are refused here, all at once, in one ``FuseError``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from fuser.errors import FuseError
from fuser.fusion.plan import check_mode, mode_of
from fuser.heads import Head, make_head
from fuser.members import check_max_member_bytes
from fuser.selection import Selection, parse_selection

DEFAULT_PROBE_BATCH = 8
DEFAULT_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """The options of ``fuser.build`` (its docstring says what each does)."""

    head: str | Head = "mean"
    weights: Sequence[float] | None = None
    cascade_order: Sequence[str] | None = None
    cascade_tolerance: float | None = None
    cascade_confidence: str | None = None
    cascade_exit_stage: bool = False
    task: str | dict[str, str] | None = None
    fit_data: str | os.PathLike | dict[str, Any] | None = None
    select: str | None = None
    metric: str | None = None
    uncertainty: bool = False
    expose_members: bool = False
    fusion: str = "auto"
    jobs: int | None = None
    input_name: str | None = None
    xla: bool = False
    safe_mode: bool = True
    custom_objects: dict[str, Any] | None = None
    cache: bool = True
    cache_dir: str | os.PathLike | None = None
    max_member_bytes: int | None = None
    probe_batch: int = DEFAULT_PROBE_BATCH
    tolerance: float = DEFAULT_TOLERANCE
    allow_nonfinite: bool = False
    progress: bool = False

    @classmethod
    def from_keywords(cls, **options: Any) -> BuildOptions:
        """The options as given by keyword; an unknown one is refused, listing the known."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise FuseError(
                f"Unknown build option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"the options are: {', '.join(known)}."
            )
        return cls(**options)

    def checked(self) -> tuple[Head, Selection | None]:
        """Check every option and how they go together; the head and the selection they
        make. Imports no TensorFlow.

        Raises:
            FuseError: every problem found.
        """
        problems = check_mode(self.fusion) + check_max_member_bytes(self.max_member_bytes)
        for name in (
            "cascade_exit_stage",
            "uncertainty",
            "expose_members",
            "xla",
            "safe_mode",
            "cache",
            "allow_nonfinite",
            "progress",
        ):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.jobs is not None and not _positive_integer(self.jobs):
            problems.append(f"jobs must be a positive integer, got {self.jobs!r}.")
        if not _positive_integer(self.probe_batch):
            problems.append(f"probe_batch must be a positive integer, got {self.probe_batch!r}.")
        if not isinstance(self.tolerance, (int, float)) or not self.tolerance > 0:
            problems.append(f"tolerance must be a positive number, got {self.tolerance!r}.")
        if problems:
            raise FuseError(problems)
        head = make_head(
            self.head,
            weights=self.weights,
            cascade_order=self.cascade_order,
            cascade_tolerance=self.cascade_tolerance,
            cascade_confidence=self.cascade_confidence,
            cascade_exit_stage=self.cascade_exit_stage,
        )
        selection = parse_selection(self.select)
        problems = self._combination_problems(head, selection)
        if problems:
            raise FuseError(problems)
        return head, selection

    @property
    def fusion_mode(self) -> str:
        """``auto``, ``on`` or ``off`` (``stack`` is ``on``)."""
        return mode_of(self.fusion)

    def _combination_problems(self, head: Head, selection: Selection | None) -> list[str]:
        problems = []
        greedy = selection is not None and selection.strategy == "greedy"
        if head.routes:  # what the cascade cannot do
            if self.xla:
                problems.append(
                    "--xla compiles fixed shapes, but the 'cascade' head sends a number of rows "
                    "to each stage that depends on the data (XLA aborts on it); drop --xla."
                )
            if self.expose_members:
                problems.append(
                    "--expose-members gives every member's output for every row, but the "
                    "'cascade' head runs only the members each row needs; drop --expose-members."
                )
            if greedy and head.weights is not None:
                problems.append(
                    "--weights and --select greedy:K both weigh the cascade's members; give one "
                    "of them."
                )
        if greedy and head.name not in ("mean", "weighted", "cascade"):
            problems.append(
                f"--select greedy:K weighs the members for the 'weighted' head; it cannot feed "
                f"the {head.name!r} head. Use --select top:K with --head {head.name}, or drop "
                "--head."
            )
        if (head.needs_fit or selection is not None) and self.fit_data is None:
            needs = f"the {head.name!r} head" if head.needs_fit else f"--select {self.select}"
            problems.append(
                f"{needs} needs validation data: pass --fit-data VAL.npz (arrays x, y)."
            )
        return problems


def _positive_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
