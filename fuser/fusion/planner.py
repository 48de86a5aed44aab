"""Which members are fused: groups of the same architecture, and the reason for each other.

``--fusion on`` fuses every group of two or more members whose layers all have a lowering;
``auto`` (the default) asks ``fuser.fusion.policy``; ``off`` fuses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fuser.errors import brief, library_of
from fuser.fusion import policy
from fuser.fusion.graph import trace
from fuser.fusion.plan import FusionPlan, Group, mode_of
from fuser.fusion.steps import Graph, Unsupported
from fuser.members import Member


def plan_fusion(
    members: Sequence[Member],
    input_order: dict[str, list[str]],
    output_order: dict[str, list[int]],
    mode: str = "auto",
) -> FusionPlan:
    """Group members of the same architecture and decide which groups to fuse; the reason
    for every member left plain is kept."""
    mode = mode_of(mode)
    if mode == "off":
        return FusionPlan(mode, [], {m.name: "fusion is off (--fusion off)." for m in members})
    plain: dict[str, str] = {}
    buckets: dict[Any, list[tuple[Member, Graph]]] = {}
    for member in members:
        try:
            graph = trace(member)
        except Unsupported as reason:
            plain[member.name] = str(reason)
            continue
        except Exception as error:  # a graph this planner misreads stays plain, never fails
            where = library_of(error) or type(error).__name__
            plain[member.name] = (
                f"its layer graph could not be read for fusion ({where}: {brief(error)})."
            )
            continue
        key = (graph.signature, tuple(input_order[member.name]), tuple(output_order[member.name]))
        buckets.setdefault(key, []).append((member, graph))
    groups = []
    for bucket in buckets.values():
        if len(bucket) == 1:
            ((member, _),) = bucket
            plain[member.name] = "no other member has the same architecture."
            continue
        group = Group([member for member, _ in bucket], [graph for _, graph in bucket])
        reason = policy.keeps_plain(group) if mode == "auto" else None
        if reason is not None:
            for member in group.members:
                plain[member.name] = reason
            continue
        groups.append(group)
    return FusionPlan(mode, groups, plain)
