"""Which members are fused: groups of the same architecture, and the reason for each other.

``--fusion on`` fuses every group of two or more members whose layers all have a lowering;
``auto`` (the default) asks ``fuser.fusion.policy``; ``off`` fuses nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from fuser.errors import brief, library_of
from fuser.fusion import policy
from fuser.fusion.graph import trace
from fuser.fusion.plan import FusionPlan, Group, mode_of
from fuser.fusion.steps import Graph, Unsupported
from fuser.members import Member

_UNIQUE = "no other member has the same architecture."


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
        if member.model is None:  # recorded: the build made sure no other member matches it
            plain[member.name] = member.recorded.plain_reason or _UNIQUE
            continue
        graph, reason = _traced(member)
        if graph is None:
            plain[member.name] = reason
            continue
        key = (graph.signature, tuple(input_order[member.name]), tuple(output_order[member.name]))
        buckets.setdefault(key, []).append((member, graph))
    groups = []
    for bucket in buckets.values():
        if len(bucket) == 1:
            ((member, _),) = bucket
            plain[member.name] = _UNIQUE
            continue
        group = Group([member for member, _ in bucket], [graph for _, graph in bucket])
        reason = policy.keeps_plain(group) if mode == "auto" else None
        if reason is not None:
            for member in group.members:
                plain[member.name] = reason
            continue
        groups.append(group)
    plain = {member.name: plain[member.name] for member in members if member.name in plain}
    return FusionPlan(mode, groups, plain)


def architecture(member: Member) -> tuple[str | None, str | None]:
    """A loaded member's architecture, for its record: the digest of its signature (equal
    exactly for members that may be fused together) and None, or None and why it is never
    fused; (None, None) when its signature cannot be written down."""
    graph, reason = _traced(member)
    if graph is None:
        return None, reason
    text = repr(graph.signature)
    if " at 0x" in text:  # an object without a stable description: unknown
        return None, None
    return hashlib.sha256(text.encode()).hexdigest(), None


def _traced(member: Member) -> tuple[Graph | None, str | None]:
    """The member's graph, or None and the reason it stays plain."""
    try:
        return trace(member), None
    except Unsupported as reason:
        return None, str(reason)
    except Exception as error:  # a graph this planner misreads stays plain, never fails
        where = library_of(error) or type(error).__name__
        return None, f"its layer graph could not be read for fusion ({where}: {brief(error)})."
