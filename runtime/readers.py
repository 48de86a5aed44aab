"""Each artifact format read back: what it is, where its manifest lies, what its seal covers.

The one place the runtime knows the formats. ``read_manifest`` (``fuser inspect``, the
packaging) and the backends (``runtime.load``) read manifests through it, before any model
is parsed; the compiler seals what ``content_of`` digests (``runtime.integrity``).

- ONNX: the manifest is a ``metadata_props`` entry; the content is ``model``, the
  serialized model with that entry cut out (graph, weights, everything else), and each
  external data file by name (artifacts over ONNX's 2 GB protobuf limit).
- SavedModel: the manifest is an asset; the content is every other file, by its path
  relative to the directory.
- ``.keras``: the manifest is a zip entry; the content is every other entry, by name.

To add a format: its kind in ``artifact_format``, a manifest reader and a content
function here, listed in ``READERS``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import manifest as manifest_lib
from runtime.errors import ArtifactError
from runtime.integrity import ONNX_CONTENT, IntegrityError, check, check_manifest, sha256_file

_CHUNK = 1 << 20


def artifact_format(path: str | os.PathLike) -> str:
    """The artifact kind of ``path`` by its form: ``onnx``, ``keras`` or ``savedmodel``.

    Raises:
        ArtifactError: the path does not exist or is none of the three kinds.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"Artifact {path} does not exist.")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise ArtifactError(
            f"Artifact {path} is a directory without saved_model.pb, so it is not a SavedModel."
        )
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".keras":
        return "keras"
    raise ArtifactError(
        f"Artifact {path} is neither an .onnx file, a .keras file nor a SavedModel directory."
    )


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


# Content: what the seal covers, per format --------------------------------------------


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


# Manifests ----------------------------------------------------------------------------


def onnx_manifest(path: Path, data: bytes, *, verify: bool = True) -> dict[str, Any] | None:
    """The manifest in the ONNX model ``data`` (the bytes of ``path``), checked against its
    seal unless ``verify=False``; None when the model carries none. The bytes are checked
    as given: the caller parses the same bytes, never the file again."""
    text, pieces = split_onnx(data)
    if text is None:
        return None
    manifest = manifest_lib.loads(text, str(path), kind="onnx")
    if verify:
        # The manifest against its own digest first, and only then the files it names:
        # an edited manifest cannot have the runtime hash files it chose.
        source = str(path)
        check_manifest(manifest, source)
        directory = path.resolve().parent  # beside the model, also through a symbolic link
        check(manifest, onnx_content(pieces, directory, external_data(manifest, source)), source)
    return manifest


def savedmodel_manifest(path: Path, *, verify: bool = True) -> dict[str, Any] | None:
    """The manifest asset of the SavedModel directory ``path``, checked unless
    ``verify=False``; None when there is none."""
    asset = path / manifest_lib.SAVEDMODEL_ASSET
    if not asset.is_file():
        return None
    manifest = manifest_lib.loads(asset.read_bytes(), str(asset), kind="savedmodel")
    if verify:
        check(manifest, savedmodel_content(path), str(path))
    return manifest


def keras_manifest(path: Path, *, verify: bool = True) -> dict[str, Any] | None:
    """The manifest entry of the ``.keras`` zip ``path``, checked unless ``verify=False``;
    None when there is none.

    Raises:
        ArtifactError: the file is not a readable zip.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            if manifest_lib.KERAS_ZIP_ENTRY not in archive.namelist():
                return None
            text = archive.read(manifest_lib.KERAS_ZIP_ENTRY)
            manifest = manifest_lib.loads(text, str(path), kind="keras")
            if verify:
                check(manifest, keras_content(archive), str(path))
            return manifest
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArtifactError(f"Artifact {path} is not a valid .keras (zip) file: {reason}") from None


@dataclass(frozen=True)
class Reader:
    """How the runtime reads one artifact format."""

    what: str  # for messages: "an ONNX model"
    where: str  # where its manifest lies
    manifest: Callable[[Path, bool], dict[str, Any] | None]  # (path, verify) -> it, or None
    content: Callable[[Path, Sequence[str]], dict[str, str]]  # (path, external data) -> digests


READERS = {
    "onnx": Reader(
        "an ONNX model",
        f"metadata '{manifest_lib.ONNX_METADATA_KEY}'",
        lambda path, verify: onnx_manifest(path, path.read_bytes(), verify=verify),
        lambda path, external: onnx_content(
            split_onnx(path.read_bytes())[1], path.parent, external
        ),
    ),
    "savedmodel": Reader(
        "a SavedModel",
        manifest_lib.SAVEDMODEL_ASSET,
        lambda path, verify: savedmodel_manifest(path, verify=verify),
        lambda path, external: savedmodel_content(path),
    ),
    "keras": Reader(
        "a .keras file",
        manifest_lib.KERAS_ZIP_ENTRY,
        lambda path, verify: keras_manifest(path, verify=verify),
        lambda path, external: _zip_content(path),
    ),
}


def no_manifest(kind: str, path: Path) -> ArtifactError:
    """The error for an artifact of ``kind`` that carries no fuser manifest."""
    reader = READERS[kind]
    return ArtifactError(
        f"Artifact {path} is {reader.what} without a fuser manifest ({reader.where}); build it "
        "with fuser."
    )


def read_manifest(kind: str, path: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checked against its seal unless
    ``verify=False``, without loading the model (no ONNX Runtime, no TensorFlow).

    Raises:
        ArtifactError: no manifest, or a damaged one; ``IntegrityError`` on a mismatch.
    """
    manifest = READERS[kind].manifest(path, verify)
    if manifest is None:
        raise no_manifest(kind, path)
    return manifest


def content_of(kind: str, path: Path, external: Sequence[str] = ()) -> dict[str, str]:
    """The content digests of the artifact at ``path`` (the compiler seals them)."""
    return READERS[kind].content(path, external)


def _zip_content(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as archive:
        return keras_content(archive)
