"""Integrity: SHA-256 digests the compiler seals into the manifest and the runtime checks.

The manifest travels inside the artifact it describes, so the digests cover everything
*except* the manifest's own bytes, and the manifest is covered by a digest of its
canonical JSON:

- ``content``: one digest per piece of the artifact. ONNX: ``model``, the serialized
  model with the manifest's metadata entry cut out (graph, weights, everything else),
  and each external data file by name (artifacts over ONNX's 2 GB protobuf limit).
  SavedModel: every file by its path relative to the directory, except the manifest
  asset. ``.keras``: every zip entry by name, except the manifest entry.
- ``manifest``: the digest of the manifest as compact JSON with sorted keys, with this
  one field left out.

A flipped byte anywhere then either breaks parsing (refused as damaged) or changes a
digest (refused as not matching). Checking costs one SHA-256 pass over the artifact.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime import manifest as manifest_lib
from runtime.errors import ArtifactError

ALGORITHM = "sha256"
ONNX_CONTENT = "model"
_CHUNK = 1 << 20


class IntegrityError(ArtifactError):
    """The artifact does not match the digests its manifest records: damaged or modified."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ONNX ---------------------------------------------------------------------------------
# ModelProto.metadata_props is field 14, a repeated StringStringEntryProto {key = 1,
# value = 2}. Its entry is found and cut out byte for byte, without a protobuf library,
# so the runtime checks the file before ONNX Runtime parses any of it.

_METADATA_TAG = b"\x72"  # field 14, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7
    raise ValueError("truncated varint")


def split_onnx(data: bytes) -> tuple[str | None, tuple[memoryview, ...]]:
    """``(manifest text, the model's bytes around the manifest entry)``.

    The bytes come as views into ``data`` (no copy of a large model): the part before
    the entry and the part after it. The text is ``None`` when no well-formed manifest
    entry is present; the views then cover ``data`` whole.
    """
    view = memoryview(data)
    key = manifest_lib.ONNX_METADATA_KEY.encode()
    key_field = b"\x0a" + _varint(len(key)) + key + b"\x12"
    start = data.rfind(key_field)
    while start >= 0:
        try:
            length, value_start = _read_varint(data, start + len(key_field))
        except ValueError:
            length, value_start = -1, 0
        value_end = value_start + length
        if length >= 0 and value_end <= len(data):
            entry = data[start:value_end]
            prefix = _METADATA_TAG + _varint(len(entry))
            entry_start = start - len(prefix)
            if entry_start >= 0 and data[entry_start:start] == prefix:
                try:
                    text = data[value_start:value_end].decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                if text is not None:
                    return text, (view[:entry_start], view[value_end:])
        start = data.rfind(key_field, 0, start)
    return None, (view,)


# Content digests ----------------------------------------------------------------------


def onnx_content(
    pieces: tuple[memoryview, ...], directory: Path | None = None, external: Sequence[str] = ()
) -> dict[str, str]:
    """The model's digest, and one per external data file (``external``, beside the model).

    A data file that is not there is left out, so ``check`` reports it missing.
    """
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    content = {ONNX_CONTENT: digest.hexdigest()}
    for name in external:
        if directory is not None and (directory / name).is_file():
            content[name] = sha256_file(directory / name)
    return content


def external_data(manifest: dict[str, Any], source: str) -> list[str]:
    """The external data files an ONNX artifact's manifest lists (plain names beside it)."""
    names = manifest.get("artifact", {}).get("external_data", [])
    if not isinstance(names, list) or not all(
        isinstance(name, str)
        and name
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        for name in names
    ):
        raise IntegrityError(
            f"Artifact {source} lists external data {names!r}; expected plain file names "
            "beside the model."
        )
    return names


def savedmodel_content(path: Path) -> dict[str, str]:
    """Every file of the SavedModel directory except the manifest asset."""
    return {
        item.relative_to(path).as_posix(): sha256_file(item)
        for item in sorted(path.rglob("*"))
        if item.is_file() and item.relative_to(path).as_posix() != manifest_lib.SAVEDMODEL_ASSET
    }


def keras_content(archive: zipfile.ZipFile) -> dict[str, str]:
    """Every entry of the ``.keras`` zip except the manifest (reading checks each CRC too)."""
    digests = {}
    for name in sorted(archive.namelist()):
        if name == manifest_lib.KERAS_ZIP_ENTRY:
            continue
        digest = hashlib.sha256()
        with archive.open(name) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests


def content_of(kind: str, path: Path, external: Sequence[str] = ()) -> dict[str, str]:
    """The content digests of the artifact at ``path`` (the compiler calls this to seal)."""
    if kind == "onnx":
        return onnx_content(split_onnx(path.read_bytes())[1], path.parent, external)
    if kind == "savedmodel":
        return savedmodel_content(path)
    with zipfile.ZipFile(path) as archive:
        return keras_content(archive)


# Sealing and checking -----------------------------------------------------------------


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The digest of ``manifest`` as compact sorted JSON, without ``integrity.manifest``."""
    unsealed = dict(manifest)
    if isinstance(unsealed.get("integrity"), dict):
        unsealed["integrity"] = {
            key: value for key, value in unsealed["integrity"].items() if key != "manifest"
        }
    canonical = json.dumps(unsealed, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return sha256_bytes(canonical.encode())


def seal(manifest: dict[str, Any], content: dict[str, str]) -> None:
    """Record ``content`` and the manifest's own digest in ``manifest["integrity"]``."""
    manifest["integrity"] = {"algorithm": ALGORITHM, "content": dict(content)}
    manifest["integrity"]["manifest"] = manifest_digest(manifest)


def check_manifest(manifest: dict[str, Any], source: str) -> dict[str, Any]:
    """Check the manifest against its own digest; return its integrity record.

    Done before any file the manifest names is read, so that an edited manifest cannot
    have the runtime hash files it chose.
    """
    record = manifest.get("integrity")
    if record is None:
        raise IntegrityError(
            f"Artifact {source} carries no integrity record (built by a fuser without "
            "one); rebuild it, or load it with verify=False if you trust it."
        )
    if (
        not isinstance(record, dict)
        or record.get("algorithm") != ALGORITHM
        or not isinstance(record.get("content"), dict)
        or not isinstance(record.get("manifest"), str)
    ):
        raise IntegrityError(
            f"Artifact {source} has a malformed integrity record; expected algorithm "
            f"{ALGORITHM!r} with 'content' and 'manifest' digests."
        )
    if manifest_digest(manifest) != record["manifest"]:
        raise IntegrityError(
            f"Artifact {source}: its manifest does not match the SHA-256 it was sealed with; "
            "the artifact was modified or damaged. Rebuild it or restore a good copy."
        )
    return record


def check(manifest: dict[str, Any], content: dict[str, str], source: str) -> None:
    """Raise ``IntegrityError`` unless ``content`` and ``manifest`` match the recorded seal.

    Args:
        manifest: the manifest read from the artifact (already checked for shape).
        content: the digests computed from the artifact as it is now.
        source: the artifact's path, for messages.
    """
    record = check_manifest(manifest, source)
    expected = record["content"]
    missing = sorted(set(expected) - set(content))
    unexpected = sorted(set(content) - set(expected))
    changed = sorted(
        name for name in set(expected) & set(content) if expected[name] != content[name]
    )
    if missing or unexpected or changed:
        parts = []
        if changed:
            plural = len(changed) > 1 or changed == [ONNX_CONTENT]
            parts.append(f"{_pieces(changed)} {'do' if plural else 'does'} not match")
        if missing:
            parts.append(f"{_pieces(missing)} {'are' if len(missing) > 1 else 'is'} missing")
        if unexpected:
            parts.append(f"{_pieces(unexpected)} {'were' if len(unexpected) > 1 else 'was'} added")
        raise IntegrityError(
            f"Artifact {source} failed its integrity check: {'; '.join(parts)} "
            "(SHA-256 against the manifest); it was modified or damaged. Rebuild it or "
            "restore a good copy."
        )


def check_onnx(manifest: dict[str, Any], pieces: tuple[memoryview, ...], path: Path) -> None:
    """``check`` for the ONNX artifact at ``path``: its manifest against its own digest
    first, and only then the model's bytes (``pieces``) and the external data files the
    manifest lists, beside the model itself (also when ``path`` is a symbolic link)."""
    source = str(path)
    check_manifest(manifest, source)
    content = onnx_content(pieces, path.resolve().parent, external_data(manifest, source))
    check(manifest, content, source)


def read_manifest(kind: str, path: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checked against its seal unless
    ``verify=False``, without loading the model (no ONNX Runtime, no TensorFlow).

    Raises:
        ArtifactError: no manifest, or a damaged one; ``IntegrityError`` on a mismatch.
    """
    source = str(path)
    if kind == "onnx":
        text, pieces = split_onnx(path.read_bytes())
        if text is None:
            raise ArtifactError(f"Artifact {path} is not an ONNX model with a fuser manifest.")
        manifest = manifest_lib.loads(text, source, kind=kind)
        if verify:
            check_onnx(manifest, pieces, path)
        return manifest
    if kind == "savedmodel":
        asset = path / manifest_lib.SAVEDMODEL_ASSET
        if not asset.is_file():
            raise ArtifactError(
                f"Artifact {path} has no fuser manifest ({manifest_lib.SAVEDMODEL_ASSET})."
            )
        manifest = manifest_lib.loads(asset.read_bytes(), source, kind=kind)
        if verify:
            check(manifest, savedmodel_content(path), source)
        return manifest
    try:
        with zipfile.ZipFile(path) as archive:
            if manifest_lib.KERAS_ZIP_ENTRY not in archive.namelist():
                raise ArtifactError(
                    f"Artifact {path} is a .keras file without a fuser manifest "
                    f"({manifest_lib.KERAS_ZIP_ENTRY})."
                )
            manifest = manifest_lib.loads(
                archive.read(manifest_lib.KERAS_ZIP_ENTRY), source, kind=kind
            )
            if verify:
                check(manifest, keras_content(archive), source)
            return manifest
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ArtifactError(f"Artifact {path} is not a valid .keras (zip) file: {error}") from None


def _pieces(names: list[str]) -> str:
    labels = ["the graph and weights" if name == ONNX_CONTENT else repr(name) for name in names]
    return ", ".join(labels)
