"""The fusion plan: which members are fused in which groups, and why each other stays plain.

``fuser.fusion.planner`` makes it; the assembly, the conversion and the manifest read it.
``--fusion`` is one of ``MODES``; ``stack``, the option's first spelling, still means ``on``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fuser.fusion.steps import Graph
from fuser.members import Member

MODES = ("auto", "on", "off")
ALIASES = {"stack": "on"}  # the first spelling of --fusion on


@dataclass
class Group:
    """Members fused into one computation, with the lowering chosen for each layer."""

    members: list[Member]
    graphs: list[Graph]
    layers: list[dict[str, str]] = field(default_factory=list)
    measured: Any = None  # fuser.fusion.costs.Measurement, when --fusion auto timed the group
    # Fused only up to this many rows, plain branches above (a switch on the batch size).
    max_fused_batch: int | None = None

    def to_manifest(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "members": [member.name for member in self.members],
            "layers": self.layers,
        }
        if self.max_fused_batch is not None:
            record["max_stacked_batch"] = self.max_fused_batch  # its name in manifests
        if self.measured is not None:
            record["measured"] = self.measured.to_manifest()
        return record


@dataclass
class FusionPlan:
    """Which members are fused, which stay plain branches and why."""

    mode: str
    groups: list[Group]
    plain: dict[str, str]  # member name -> why it is not fused

    def to_manifest(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "groups": [group.to_manifest() for group in self.groups],
            "plain": dict(self.plain),
        }

    def demote(self, group: Group, reason: str) -> None:
        """Turn a group whose fused form failed back into plain branches."""
        self.groups.remove(group)
        for member in group.members:
            self.plain[member.name] = reason

    def notes(self) -> list[str]:
        lines = []
        for group in self.groups:
            names = ", ".join(member.name for member in group.members)
            line = f"Fused {len(group.members)} same-architecture members: {names}."
            if group.max_fused_batch is not None:
                line = (
                    f"Fused {len(group.members)} same-architecture members up to batch "
                    f"{group.max_fused_batch}, plain branches above (both forms are in the "
                    f"artifact, the batch size picks one): {names}."
                )
            if group.measured is not None:
                line += f" Measured, fused vs plain: {group.measured.describe()}."
            lines.append(line)
        reasons: dict[str, list[str]] = {}
        for name, reason in self.plain.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in reasons.items():
            lines.append(f"Not fused ({', '.join(names)}): {reason}")
        return lines


def mode_of(mode: str) -> str:
    """The mode ``mode`` names (``stack`` is ``on``)."""
    return ALIASES.get(mode, mode)


def check_mode(mode: Any) -> list[str]:
    if mode_of(mode) not in MODES:
        return [f"fusion must be one of {', '.join(MODES)}, got {mode!r}."]
    return []
