"""The cache of converted units: keyed by what they depend on, written atomically, pruned.

A unit's key is the SHA-256 of the member files (and for a fused group its lowering), the
fused input names and output slots it was converted for, the opset, the versions of
TensorFlow, Keras, tf2onnx, ONNX, NumPy, protobuf and fuser, and the source of the code
that converts (a change to it converts every unit again). The folder is
``ConversionOptions.cache_dir``, else ``$FUSER_CACHE_DIR``, else ``$XDG_CACHE_HOME/fuser``,
else ``~/.cache/fuser``; the least recently used units go beyond ``$FUSER_CACHE_BYTES``
(default 4 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuser.conversion.unit import ConversionOptions, Unit
from fuser.members.records import write_atomically

# The code a converted unit depends on, beside the versions.
_SOURCES = (
    "conversion/convert.py",
    "conversion/unit.py",
    "conversion/units.py",
    "conversion/_worker.py",
    "conversion/graph_units.py",
)
_SOURCE_FOLDERS = ("fusion",)
_DEFAULT_CACHE_BYTES = 4_000_000_000
UNITS = "savedmodel-units"  # the SavedModel's units (``fuser.conversion.graph_units``)


def cache_folder(options: ConversionOptions) -> Path | None:
    """Where converted units are kept, or None without a cache."""
    if not options.cache:
        return None
    if options.cache_dir is not None:
        return Path(options.cache_dir)
    if os.environ.get("FUSER_CACHE_DIR"):
        return Path(os.environ["FUSER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fuser"


def fingerprint(
    sources: Sequence[str] = _SOURCES, folders: Sequence[str] = _SOURCE_FOLDERS
) -> dict[str, str]:
    """The versions, and the code in ``sources`` and ``folders`` (paths inside the
    package), that a cached thing depends on: by default, a converted unit."""
    from importlib import metadata

    versions = {}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "numpy", "protobuf", "fuser"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    code = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    paths = [package / name for name in sources]
    paths += sorted(path for folder in folders for path in (package / folder).glob("*.py"))
    for path in paths:
        code.update(path.read_bytes())
    versions["code"] = code.hexdigest()
    return versions


def key(
    unit: Unit, input_specs: Sequence[Any], opset: int | None, *, target: str = "onnx"
) -> str | None:
    """A unit's cache key for ``target`` ("onnx", or "savedmodel" without an opset); None
    for members that are not files (nothing to hash)."""
    hashes = [member.sha256 for member in unit.members]
    if any(digest is None for digest in hashes):
        return None
    description: dict[str, Any] = {
        "kind": unit.kind,
        "members": hashes,
        "inputs": unit.inputs,
        "input_specs": [
            [spec.name, list(spec.shape), spec.dtype]
            for spec in input_specs
            if spec.name in unit.inputs
        ],
        "slots": unit.slots,
        "opset": opset,
        "target": target,
        "fingerprint": fingerprint(),
    }
    if unit.kind == "group":
        description["lowering"] = unit.group.layers
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cached(folder: Path, key: str) -> Any:
    import onnx

    path = folder / "onnx-units" / f"{key}.onnx"
    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
    except (OSError, Exception):  # missing, or damaged: converted again
        return None
    os.utime(path)  # recently used: pruned last
    return model


def store(folder: Path, key: str, model: Any) -> None:
    """Write a converted unit to the cache; a cache that cannot be written is skipped."""
    try:
        write_atomically(folder / "onnx-units" / f"{key}.onnx", model.SerializeToString())
    except OSError:
        return


def prune(folder: Path) -> None:
    """Remove the least recently used units (ONNX and SavedModel) beyond
    ``FUSER_CACHE_BYTES``."""
    try:
        limit = int(os.environ.get("FUSER_CACHE_BYTES", _DEFAULT_CACHE_BYTES))
        found = [*(folder / "onnx-units").glob("*.onnx"), *(folder / UNITS).glob("*.npz")]
        entries = sorted((entry.stat().st_mtime, entry.stat().st_size, entry) for entry in found)
    except (OSError, ValueError):
        return
    total = sum(size for _, size, _ in entries)
    for _, size, entry in entries:
        if total <= limit:
            break
        entry.unlink(missing_ok=True)
        total -= size
