"""A unit: one piece of an ensemble converted to ONNX on its own (see ``units``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuser.fusion.plan import FusionPlan, Group
from fuser.members import Member
from fuser.validate import Wiring


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
    """How the ONNX writer converts: conversion workers, the cache, and how workers load
    members (as the build did)."""

    jobs: int | None = None  # worker processes at once; None: one per core
    cache_dir: Path | None = None  # None: the default folder; see ``cache_folder``
    cache: bool = True
    safe_mode: bool = True
    custom_objects: dict[str, Any] | None = None
    max_member_bytes: int | None = None

    def workers(self, units: int) -> int:
        # The build process waits while they work: one worker per core.
        return max(1, min(units, self.jobs or os.cpu_count() or 1))


@dataclasses.dataclass
class Unit:
    """One piece of the ensemble converted on its own."""

    kind: str  # "member" | "group"
    members: list[Member]  # in member order
    indices: list[int]  # their positions in the ensemble's member order
    inputs: list[str]  # fused input names, in the unit's input order
    slots: list[int]  # per fused output slot, the member output index it reads
    group: Group | None = None  # for a group unit
    key: str | None = None  # cache key; None: not cached
    model: Any = None  # the converted ONNX model
    source: str = ""  # "cache", "worker", "this process"


def units_of(members: Sequence[Member], wiring: Wiring, fusion: FusionPlan) -> list[Unit]:
    """A unit per fused group, then one per member left plain."""
    position = {member.name: index for index, member in enumerate(members)}
    units, grouped = [], set()
    for group in fusion.groups:
        first = group.members[0]
        units.append(
            Unit(
                "group",
                list(group.members),
                [position[member.name] for member in group.members],
                list(wiring.input_order[first.name]),
                list(wiring.output_order[first.name]),
                group=group,
            )
        )
        grouped.update(member.name for member in group.members)
    for member in members:
        if member.name not in grouped:
            units.append(
                Unit(
                    "member",
                    [member],
                    [position[member.name]],
                    list(wiring.input_order[member.name]),
                    list(wiring.output_order[member.name]),
                )
            )
    return units
