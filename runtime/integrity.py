"""Integrity: SHA-256 digests the compiler seals into the manifest and the runtime checks.

The manifest travels inside the artifact it describes, so the digests cover everything
*except* the manifest's own bytes, and the manifest is covered by a digest of its
canonical JSON:

- ``content``: one digest per piece of the artifact, as each format defines its pieces
  (``runtime.readers``: an ONNX model and its external data files, a SavedModel's files,
  a ``.keras`` zip's entries), never the manifest itself.
- ``manifest``: the digest of the manifest as compact JSON with sorted keys, with this
  one field left out.

A flipped byte anywhere then either breaks parsing (refused as damaged) or changes a
digest (refused as not matching). Checking costs one SHA-256 pass over the artifact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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


def _pieces(names: list[str]) -> str:
    labels = ["the graph and weights" if name == ONNX_CONTENT else repr(name) for name in names]
    return ", ".join(labels)
