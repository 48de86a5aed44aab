"""Member records: what a build learned about a member file, so that a rebuild need not load it.

A build that keeps converted units in the cache (``fuser.conversion.cache``) also keeps a
record of each member file it loaded: its format, signature and parameter count, what task
inference read from its layers, the digest of its architecture for the fusion planner, and
its outputs on the probe batch beside a digest of the inputs they answer. A later build
finds the record by the member's SHA-256, the options it was loaded with (safe mode, custom
classes, the size limit) and the versions and code that made it, and takes the member from
it instead of loading it (``recall``). The build loads such a member after all when anything
needs it: another probe batch, validation data, a member of the same architecture (they may
be fused), a unit missing from the cache, or the fused Keras model itself (a SavedModel or
``.keras`` output, ``Ensemble.predict``). Retraining one member of five therefore loads and
converts that one.

A record is two files in ``<cache>/members/``: ``<key>.json`` and ``<key>.npz`` (the probe
outputs, read without pickle); a damaged or missing one is no record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuser.members.spec import Member, MemberSpec, sha256_of
from runtime.manifest import ManifestError, TensorSpec

# The code a record depends on, beside the versions (``fuser.conversion.cache.fingerprint``).
SOURCES = ("tasks.py", "reference.py", "validate.py")
SOURCE_FOLDERS = ("members", "fusion")
_FOLDER = "members"


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a record holds beyond the member's signature."""

    hints: dict[str, Any]  # ``fuser.tasks.hints``
    architecture: str | None  # digest of the planner's signature; None: never fused or unknown
    plain_reason: str | None  # why it is never fused, or None
    probe_digest: str  # digest of the inputs the outputs below answer
    probe_outputs: dict[int, np.ndarray]  # output index -> values (float64)

    def answers(self, feeds: Sequence[np.ndarray], indices: Sequence[int]) -> bool:
        """Whether the record holds the member's outputs ``indices`` on ``feeds`` (its
        inputs, in order)."""
        held = all(index in self.probe_outputs for index in indices)
        return held and digest_of(feeds) == self.probe_digest


def key(sha256: str, options: dict[str, Any], fingerprint: dict[str, Any]) -> str:
    """A record's key: the member's content, how it is loaded, the versions and code."""
    text = json.dumps(
        {"member": sha256, "options": options, "fingerprint": fingerprint},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def digest_of(feeds: Sequence[np.ndarray]) -> str:
    """A digest of input arrays: dtype, shape and bytes of each, in order."""
    digest = hashlib.sha256()
    for array in feeds:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def recall(
    folder: Path, specs: Sequence[MemberSpec], options: dict[str, Any], fingerprint: dict
) -> dict[str, Member]:
    """The members of ``specs`` that have a record, by name, as recorded (``model`` None)."""
    found = {}
    for spec in specs:
        if spec.source is None or not spec.source.exists():
            continue
        try:
            sha256 = spec.sha256 = sha256_of(spec.source)  # loading needs it too
        except OSError:
            continue
        member = _read(folder, spec, sha256, key(sha256, options, fingerprint))
        if member is not None:
            found[spec.name] = member
    return found


def store(
    folder: Path,
    member: Member,
    options: dict[str, Any],
    fingerprint: dict,
    recorded: Recorded,
) -> None:
    """Write a loaded member's record; a cache that cannot be written is skipped."""
    if member.sha256 is None or member.source is None:
        return
    name = key(member.sha256, options, fingerprint)
    description = {
        "format": member.format,
        "inputs": [spec.to_json() for spec in member.inputs],
        "outputs": [spec.to_json() for spec in member.outputs],
        "parameters": member.parameters,
        "hints": recorded.hints,
        "architecture": recorded.architecture,
        "plain_reason": recorded.plain_reason,
        "probe_digest": recorded.probe_digest,
        "outputs_recorded": sorted(recorded.probe_outputs),
    }
    arrays = io.BytesIO()
    np.savez(
        arrays, **{f"output_{index}": value for index, value in recorded.probe_outputs.items()}
    )
    try:
        write_atomically(folder / _FOLDER / f"{name}.npz", arrays.getvalue())
        write_atomically(folder / _FOLDER / f"{name}.json", json.dumps(description).encode())
    except OSError:
        return


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` beside ``target`` and rename it into place (the cache's one write,
    for records and converted units): a reader sees the old file or the new one, whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as out:
        out.write(data)
    os.replace(out.name, target)


def _read(folder: Path, spec: MemberSpec, sha256: str, name: str) -> Member | None:
    directory = folder / _FOLDER
    try:
        description = json.loads((directory / f"{name}.json").read_text())
        with np.load(directory / f"{name}.npz", allow_pickle=False) as arrays:
            outputs = {
                index: np.asarray(arrays[f"output_{index}"])
                for index in description["outputs_recorded"]
            }
        recorded = Recorded(
            hints=description["hints"],
            architecture=description["architecture"],
            plain_reason=description["plain_reason"],
            probe_digest=description["probe_digest"],
            probe_outputs=outputs,
        )
        member = Member(
            name=spec.name,
            source=spec.source,
            format=description["format"],
            inputs=tuple(TensorSpec.from_json(each, "record") for each in description["inputs"]),
            outputs=tuple(TensorSpec.from_json(each, "record") for each in description["outputs"]),
            parameters=int(description["parameters"]),
            sha256=sha256,
            load_seconds=0.0,
            model=None,
            recorded=recorded,
        )
    # Missing or damaged: no record.
    except (OSError, ValueError, KeyError, TypeError, ManifestError):
        return None
    os.utime(directory / f"{name}.json")  # recently used
    return member
