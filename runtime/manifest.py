"""The manifest: the JSON record that travels inside every fuser artifact.

Both sides read it: the compiler writes it, the runtime checks it before serving.
It lives here, in the runtime, because the runtime must never import the compiler.

Where it is stored:
- ONNX: ``metadata_props["fuser.manifest"]``;
- SavedModel: ``assets/fuser.json``;
- .keras: ``fuser.json`` inside the zip, beside Keras' own ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from runtime.errors import ArtifactError

FORMAT = "fuser.manifest"
FORMAT_VERSION = 2  # 2: sealed with an integrity record (runtime.integrity)
ONNX_METADATA_KEY = "fuser.manifest"
SAVEDMODEL_ASSET = "assets/fuser.json"
KERAS_ZIP_ENTRY = "fuser.json"

ARTIFACT_FORMATS = ("onnx", "savedmodel", "keras")
_REQUIRED_KEYS = ("format", "format_version", "members", "head", "inputs", "outputs", "artifact")


class ManifestError(ArtifactError):
    """The manifest is missing, malformed, or from an unknown format version."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``None`` for a free dimension, the batch first) and dtype of a tensor."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TensorSpec:
        if not isinstance(data, dict):
            raise ManifestError(f"{where} must be an object, found {type(data).__name__}.")
        name, shape, dtype = data.get("name"), data.get("shape"), data.get("dtype")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where} needs a non-empty string 'name', found {name!r}.")
        if not isinstance(shape, list) or not all(
            dim is None or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0)
            for dim in shape
        ):
            raise ManifestError(
                f"{where} needs 'shape' as a list of non-negative integers or null, "
                f"found {shape!r}."
            )
        if not isinstance(dtype, str) or not dtype:
            raise ManifestError(f"{where} needs a string 'dtype', found {dtype!r}.")
        return cls(name=name, shape=tuple(shape), dtype=dtype)

    def describe(self) -> str:
        return f"{self.name}: {format_shape(self.shape)} {self.dtype}"


def format_shape(shape: Any) -> str:
    """A shape as Python prints a tuple, with ``None`` for free dimensions: ``(None, 20)``."""
    dims = ["None" if dim is None else str(dim) for dim in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def dumps(manifest: dict[str, Any]) -> str:
    """Serialise a manifest deterministically (sorted keys), ready to embed."""
    return json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False)


def loads(text: str | bytes, source: str) -> dict[str, Any]:
    """Parse and check a manifest read from ``source``.

    Raises:
        ManifestError: naming ``source`` and what is wrong.
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ManifestError(f"The manifest in {source} is not valid JSON ({error}).") from None
    check(data, source)
    return data


def check(data: Any, source: str) -> None:
    """Raise ``ManifestError`` unless ``data`` is a manifest this runtime can serve."""
    if not isinstance(data, dict):
        raise ManifestError(
            f"The manifest in {source} must be a JSON object, found {type(data).__name__}."
        )
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise ManifestError(f"The manifest in {source} lacks the keys {', '.join(missing)}.")
    if data["format"] != FORMAT:
        raise ManifestError(
            f"The manifest in {source} has format {data['format']!r}, expected {FORMAT!r}."
        )
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(
            f"The manifest in {source} has format version {version!r}; expected a positive integer."
        )
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"The manifest in {source} has format version {version!r}; this runtime reads "
            f"versions up to {FORMAT_VERSION}. Upgrade fuser to load it."
        )
    for key in ("inputs", "outputs"):
        specs = data[key]
        if not isinstance(specs, list) or not specs:
            raise ManifestError(f"The manifest in {source} needs a non-empty list '{key}'.")
        names = [
            TensorSpec.from_json(spec, f"{key}[{i}] in {source}").name
            for i, spec in enumerate(specs)
        ]
        if len(set(names)) != len(names):
            raise ManifestError(f"The manifest in {source} repeats names in '{key}': {names}.")
    artifact = data["artifact"]
    if not isinstance(artifact, dict) or artifact.get("format") not in ARTIFACT_FORMATS:
        raise ManifestError(
            f"The manifest in {source} needs 'artifact.format' to be one of "
            f"{', '.join(ARTIFACT_FORMATS)}."
        )


def specs(data: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    """The input or output specs (``key`` is ``"inputs"`` or ``"outputs"``) of a checked manifest."""
    return tuple(TensorSpec.from_json(spec, key) for spec in data[key])
