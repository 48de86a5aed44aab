"""Rebuilds: members taken from their records instead of loaded, and loaded when needed.

``Records`` is the build's side of ``fuser.members.records``: it finds the records of the
members (before anything is loaded), keeps them only while they answer what the build asks
(the probe batch; the fusion planner's question whether another member shares the
architecture), loads the members whose records do not, and writes a record for each member
file it loaded. It is used only when the build keeps a cache, has no validation data
(fitting and selection run every member on it) and every custom class can be imported by
the conversion workers, which load a recorded member whose unit is not in the cache.
Members using classes or activations from outside Keras get no record: they are loaded
every time, so that a build without their module fails as it would without the cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuser._tf import tensorflow
from fuser.conversion import cache
from fuser.conversion.unit import ConversionOptions
from fuser.conversion.workers import importable
from fuser.errors import FuseError
from fuser.fusion.planner import architecture
from fuser.members import Member, MemberSpec, check_names, load_members
from fuser.members import records as records_lib
from fuser.options import BuildOptions
from fuser.progress import Reporter
from fuser.tasks import hints
from fuser.validate import Wiring
from runtime.custom_objects import KERAS_OWN


class Records:
    """The member records one build reads and writes (see the module's docstring)."""

    def __init__(self, folder: Path, options: BuildOptions, reporter: Reporter) -> None:
        self.folder = folder
        self.options = options
        self.reporter = reporter
        classes = importable(options.custom_objects) or []
        self.loading = {
            "safe_mode": options.safe_mode,
            "custom_objects": classes,
            "max_member_bytes": options.max_member_bytes,
        }
        self.fingerprint = cache.fingerprint(records_lib.SOURCES, records_lib.SOURCE_FOLDERS)
        self.architectures: dict[str, tuple[str | None, str | None]] = {}

    @classmethod
    def of(
        cls, options: BuildOptions, conversion: ConversionOptions, reporter: Reporter
    ) -> Records | None:
        """The build's records, or None when it keeps none (see the module's docstring)."""
        folder = cache.cache_folder(conversion)
        if folder is None or options.fit_data is not None:
            return None
        if options.custom_objects and importable(options.custom_objects) is None:
            return None
        return cls(folder, options, reporter)

    def recall(self, specs: Sequence[MemberSpec]) -> dict[str, Member]:
        """The members of ``specs`` that have a record, by name (``model`` None)."""
        return records_lib.recall(self.folder, specs, self.loading, self.fingerprint)

    def load(self, members: list[Member], which: Sequence[Member], why: str) -> list[Member]:
        """``members`` with ``which`` (recorded ones) loaded after all, in the same order;
        ``why`` is said."""
        if not which:
            return members
        names = ", ".join(member.name for member in which)
        self.reporter.note(f"Loading {names} after all: {why}.")
        fresh, _ = load_members(
            [MemberSpec(member.name, member.source) for member in which],
            jobs=self.options.jobs,
            safe_mode=self.options.safe_mode,
            custom_objects=self.options.custom_objects,
            max_member_bytes=self.options.max_member_bytes,
        )
        by_name = {member.name: member for member in fresh}
        for before in which:
            if by_name[before.name].sha256 != before.sha256:
                raise FuseError(
                    f"{before.describe()} changed on disk during the build; build again."
                )
        return [by_name.get(member.name, member) for member in members]

    def stale(
        self, members: Sequence[Member], wiring: Wiring, probe: dict[str, np.ndarray]
    ) -> list[Member]:
        """The recorded members whose records do not hold their outputs on ``probe``."""
        return [
            member
            for member in members
            if member.model is None
            and not member.recorded.answers(
                [probe[name] for name in wiring.input_order[member.name]],
                wiring.output_order[member.name],
            )
        ]

    def alike(self, members: Sequence[Member], fusion_mode: str) -> list[Member]:
        """The recorded members the fusion planner must see loaded: those that may share an
        architecture with another member (equal or unknown signatures)."""
        if fusion_mode == "off":
            return []
        digests: dict[str, str | None] = {}
        unknown = False
        for member in members:
            if member.model is None:
                digest, reason = member.recorded.architecture, member.recorded.plain_reason
            else:
                digest, reason = self._architecture(member)
            digests[member.name] = digest
            unknown = unknown or (digest is None and reason is None)
        counts: dict[str, int] = {}
        for digest in digests.values():
            if digest is not None:
                counts[digest] = counts.get(digest, 0) + 1
        alike = []
        for member in members:
            if member.model is not None:
                continue
            digest, reason = member.recorded.architecture, member.recorded.plain_reason
            never_fused = digest is None and reason is not None
            if not never_fused and (digest is None or counts[digest] > 1 or unknown):
                alike.append(member)
        return alike

    def store(
        self,
        members: Sequence[Member],
        wiring: Wiring,
        probe: dict[str, np.ndarray],
        probe_values: dict[str, np.ndarray],
    ) -> None:
        """Write a record for each member file this build loaded."""
        for position, member in enumerate(members):
            if member.model is None or member.sha256 is None or member.format == "memory":
                continue
            if _custom(member):  # loaded every time: its classes must be found every time
                continue
            digest, reason = self._architecture(member)
            outputs = {
                index: np.asarray(probe_values[spec.name][position])
                for index, spec in zip(wiring.output_order[member.name], wiring.outputs)
            }
            feeds = [probe[name] for name in wiring.input_order[member.name]]
            recorded = records_lib.Recorded(
                hints=hints(member),
                architecture=digest,
                plain_reason=reason,
                probe_digest=records_lib.digest_of(feeds),
                probe_outputs=outputs,
            )
            records_lib.store(self.folder, member, self.loading, self.fingerprint, recorded)

    def _architecture(self, member: Member) -> tuple[str | None, str | None]:
        if member.name not in self.architectures:
            self.architectures[member.name] = architecture(member)
        return self.architectures[member.name]


def load_or_recall(
    specs: Sequence[MemberSpec],
    options: BuildOptions,
    records: Records | None,
    reporter: Reporter,
) -> tuple[list[Member], float]:
    """The members of ``specs`` in order, each loaded or taken from its record, and the wall
    time of loading (TensorFlow's import excluded)."""
    problems = check_names(specs)  # before records are looked up by name
    if problems:
        raise FuseError(problems)
    recalled = records.recall(specs) if records is not None else {}
    to_load = [spec for spec in specs if spec.name not in recalled]
    with reporter.task("Importing TensorFlow and loading members", total=len(to_load)) as advance:
        tensorflow()  # imported here even when every member comes from its record
        fresh, wall = [], 0.0
        if to_load:
            fresh, wall = load_members(
                to_load,
                jobs=options.jobs,
                safe_mode=options.safe_mode,
                custom_objects=options.custom_objects,
                max_member_bytes=options.max_member_bytes,
                on_loaded=lambda member: advance(member.name),
            )
    by_name = {member.name: member for member in fresh} | recalled
    single = sum(member.load_seconds for member in fresh)
    at_once = options.jobs or min(max(1, len(fresh)), os.cpu_count() or 1)
    note = (
        f"Loaded {len(fresh)} member{'s' if len(fresh) != 1 else ''} in {wall:.2f} s "
        f"(sum of the single loads {single:.2f} s, {at_once} at once)"
    )
    if recalled:
        note += (
            f"; {len(recalled)} unchanged member{'s' if len(recalled) != 1 else ''} taken from "
            "their records in the cache (loaded later only if needed)"
        )
    reporter.note(note + ".")
    return [by_name[spec.name] for spec in specs], wall


def _custom(member: Member) -> bool:
    """Whether the member uses a layer class or an activation from outside Keras."""
    walk = getattr(member.model, "_flatten_layers", None)
    if walk is None:  # a SavedModel member: TensorFlow ops only
        return False
    for layer in walk(include_self=True, recursive=True):
        for used in (type(layer), getattr(layer, "activation", None)):
            module = getattr(used, "__module__", None) or ""
            if used is not None and module.split(".")[0] not in KERAS_OWN:
                return True
    return False


def recorded(members: Sequence[Any]) -> list[Any]:
    """The members taken from records (not loaded)."""
    return [member for member in members if member.model is None]
