"""What a member is: as the user names it (``MemberSpec``) and once loaded (``Member``)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fuser.errors import FuseError
from runtime.manifest import TensorSpec

FORMATS = ("keras", "h5", "savedmodel", "memory")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass
class MemberSpec:
    """A member as the user named it, before loading."""

    name: str
    source: Path | None
    model: Any = None  # an in-memory keras.Model, when given one
    sha256: str | None = None  # the file's SHA-256 once computed (records look members up by it)

    def describe(self) -> str:
        where = self.source.name if self.source is not None else "in memory"
        return f'Member "{self.name}" ({where})'


@dataclasses.dataclass
class Member:
    """A loaded member: its signature, provenance and the object that computes it."""

    name: str
    source: Path | None
    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: int
    sha256: str | None
    load_seconds: float
    model: Any  # keras.Model, or a layer calling a SavedModel signature; None when recorded
    # Taken from an earlier build's record instead of loaded (``fuser.members.records``).
    recorded: Any = None

    def describe(self) -> str:
        where = self.source.name if self.source is not None else "in memory"
        return f'Member "{self.name}" ({where})'

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source.name if self.source is not None else None,
            "format": self.format,
            "sha256": self.sha256,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "parameters": self.parameters,
        }

    def call(self, tensors: Sequence[Any]) -> list[Any]:
        """Apply the member to tensors in the order of ``self.inputs``; return its flat outputs."""
        if self.model is None:
            raise RuntimeError(f"{self.describe()} is recorded, not loaded; load it first.")
        if self.format == "savedmodel":
            named = dict(zip((spec.name for spec in self.inputs), tensors))
            outputs = self.model(named)
            return [outputs[spec.name] for spec in self.outputs]
        import keras

        structure = getattr(self.model, "_inputs_struct", None)
        if structure is not None:
            arguments = keras.tree.pack_sequence_as(structure, list(tensors))
        else:
            arguments = tensors[0] if len(tensors) == 1 else list(tensors)
        return keras.tree.flatten(self.model(arguments, training=False))


def parse_specs(members: Sequence[Any]) -> list[MemberSpec]:
    """Turn what the user passed into named member specs (no I/O beyond ``Path``)."""
    specs = []
    for item in members:
        if isinstance(item, (str, os.PathLike)):
            text = os.fspath(item)
            name, _, rest = text.partition("=")
            if rest and name and os.sep not in name and "/" not in name:
                specs.append(MemberSpec(name=name, source=Path(rest)))
            else:
                path = Path(text)
                specs.append(MemberSpec(name=stem(path), source=path))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, target = item
            if isinstance(target, (str, os.PathLike)):
                specs.append(MemberSpec(name=name, source=Path(target)))
            else:
                specs.append(MemberSpec(name=name, source=None, model=target))
        else:
            raise FuseError(
                f"A member must be a path, 'name=path', or a (name, path or keras.Model) pair; "
                f"received {type(item).__name__}."
            )
    return specs


def check_names(specs: Sequence[MemberSpec]) -> list[str]:
    """Problems with the member names: empty list, bad characters, duplicates."""
    if not specs:
        return ["No members were given; an ensemble needs at least one member."]
    problems = []
    seen: dict[str, MemberSpec] = {}
    for spec in specs:
        if not _NAME_PATTERN.match(spec.name):
            problems.append(
                f"{spec.describe()} has an invalid name {spec.name!r}: use letters, digits, "
                "'_', '-' and '.', starting with a letter or digit (name it with name=path)."
            )
        elif spec.name in seen:
            problems.append(
                f"{spec.describe()} has the same name as {seen[spec.name].describe()}; member "
                "names must be unique (name them with name=path)."
            )
        else:
            seen[spec.name] = spec
    return problems


def refuse(spec: MemberSpec, what: str) -> NoReturn:
    raise FuseError(f'Member "{spec.name}": {what}.')


def stem(path: Path) -> str:
    name = path.name.rstrip("/") or path.resolve().name
    for suffix in (".keras", ".hdf5", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a directory's relative paths and contents in sorted order."""
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
        return digest.hexdigest()
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        _hash_file(file, digest)
    return digest.hexdigest()


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def branch_name(member: Member) -> str:
    """The layer name of a member's branch. Unique because member names are."""
    return f"member_{member.name}"


def branch(member: Member) -> Any:
    """The member wrapped in a Keras model of its own, uniquely named (``branch_name``):
    members loaded from files often share a model name (``functional``), which a
    functional model refuses twice. The member itself is not modified."""
    import keras

    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"{member.name}_{index}")
        for index, spec in enumerate(member.inputs)
    ]
    return keras.Model(inputs=inputs, outputs=member.call(inputs), name=branch_name(member))
