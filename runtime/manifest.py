"""The manifest: the JSON record that travels inside every fuser artifact.

Both sides read it: the compiler writes it, the runtime checks it before serving.
It lives here, in the runtime, because the runtime must never import the compiler.

Where it is stored:
- ONNX: ``metadata_props["fuser.manifest"]``;
- SavedModel: ``assets/fuser.json``;
- .keras: ``fuser.json`` inside the zip, beside Keras' own ``config.json``.

``MANIFEST`` below is its schema, written once (in ``runtime.schema``'s vocabulary): every field the runtime and
``fuser inspect`` read is checked against it when a manifest is read, so a manifest
that was edited (and sealed again) is refused at load, naming the field, instead of
failing later where the field is used.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from runtime.errors import ArtifactError
from runtime.schema import (
    MAX_DEPTH,
    Boolean,
    Integer,
    Invalid,
    Keyed,
    ListOf,
    MapOf,
    Number,
    OneOf,
    Record,
    Text,
    deep_path,
    found,
)

FORMAT = "fuser.manifest"
FORMAT_VERSION = 2  # 2: sealed with an integrity record (runtime.integrity)
ONNX_METADATA_KEY = "fuser.manifest"
SAVEDMODEL_ASSET = "assets/fuser.json"
KERAS_ZIP_ENTRY = "fuser.json"

ARTIFACT_FORMATS = ("onnx", "savedmodel", "keras")
# Values the compiler writes (``fuser`` declares them too; a test keeps both in step).
MEMBER_FORMATS = ("keras", "h5", "savedmodel", "memory")
TASKS = ("probabilities", "logits", "regression")
FUSION_MODES = ("auto", "on", "off", "stack")  # "stack": the first name of "on"
SELECTION_STRATEGIES = ("top", "greedy")
# The dtypes of the fused inputs and outputs: numpy's names, which ``predict`` casts to.
DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
)
# Deeper than any manifest fuser writes (about 7 levels) and far from Python's
# recursion limit, which deeper JSON would reach when read or written again.
MAX_RANK = 32  # numpy's limit before 2.0
_SHA256 = "[0-9a-f]{64}"


class ManifestError(ArtifactError):
    """The manifest is missing, malformed, or from an unknown format version."""


# The schema ---------------------------------------------------------------------------

_NAME = Text()
_DIMENSION = Integer(
    minimum=1, maximum=2**63 - 1, nullable=True, what="a positive integer (a 64-bit size)"
)
SPEC = Record(  # a fused input or output: batch first, a dtype numpy casts to
    {
        "name": _NAME,
        "shape": ListOf(_DIMENSION, min_items=1, max_items=MAX_RANK),
        "dtype": OneOf(*DTYPES),
    }
)
_MEMBER_SPEC = Record(  # only described, never fed: any of Keras' or TensorFlow's dtypes
    {"name": _NAME, "shape": ListOf(_DIMENSION, max_items=MAX_RANK), "dtype": _NAME}
)
_MEMBER = Record(
    {
        "name": _NAME,
        "format": OneOf(*MEMBER_FORMATS),
        "source": Text(nullable=True),  # null: a model given in memory
        "sha256": Text(pattern=_SHA256, nullable=True, what="a SHA-256 digest in hexadecimal"),
        "inputs": ListOf(_MEMBER_SPEC),
        "outputs": ListOf(_MEMBER_SPEC),
        "parameters": Integer(minimum=0),
    }
)
_TIMES = ListOf(Number())
_GROUP = Record(  # members fused into one computation (fuser.fusion)
    {
        "members": ListOf(_NAME, min_items=1),
        "layers": ListOf(
            Record({"layer": Text(empty=True), "type": _NAME, "lowering": Text(empty=True)})
        ),
    },
    {
        "max_stacked_batch": Integer(minimum=1, nullable=True),
        "measured": Record(
            {"batches": ListOf(Integer(minimum=1)), "plain_ms": _TIMES, "stacked_ms": _TIMES},
            {
                "engine": Text(),
                # read back as SwitchTiming(**record): no other keys
                "switch": Record(
                    {
                        "max_stacked_batch": Integer(minimum=1),
                        "plain_ms": _TIMES,
                        "switch_ms": _TIMES,
                    },
                    other=None,
                    nullable=True,
                ),
            },
            nullable=True,
        ),
    },
)
_SCORE = Number(nullable=True)  # null: not finite (JSON has no NaN)
_VALIDATION = Record(  # the members and the ensemble scored on --fit-data
    {
        "source": Text(),
        "rows": Integer(minimum=0),
        "outputs": MapOf(
            Record(
                {"metric": _NAME, "members": MapOf(_SCORE), "ensemble": _SCORE},
                {"ensemble_is_in_sample": Boolean()},
            )
        ),
    },
    {
        "selection": Record(
            {
                "strategy": OneOf(*SELECTION_STRATEGIES),
                "size": Integer(minimum=1),
                "metric": _NAME,
                "picks": MapOf(Integer(minimum=0)),
                "kept": ListOf(_NAME),
            },
            nullable=True,
        )
    },
    nullable=True,
)
_CHECK = Record(  # one self-verification: the largest error against the members
    {"probe_batch": Integer(minimum=1), "tolerance": Number(), "max_abs_error": Number()}
)
_COUNT = Integer(minimum=0)
_VERIFICATION = Record(
    {},
    {
        "fused_model": _CHECK,
        "artifact": _CHECK,
        "nonfinite_allowed": Boolean(),
        "nonfinite_values": MapOf(
            MapOf(Record({"nan": _COUNT, "inf": _COUNT}, {"values": _COUNT}))
        ),
    },
    other=Keyed("max_abs_error", _CHECK),  # fuser inspect prints any such entry as one
)
MANIFEST = Record(
    {
        "format": OneOf(FORMAT),
        "format_version": Integer(minimum=1, maximum=FORMAT_VERSION),
        "members": ListOf(_MEMBER),
        "head": Record({"name": _NAME}, {"params": MapOf()}),
        "inputs": ListOf(SPEC, min_items=1),
        "outputs": ListOf(SPEC, min_items=1),
        "artifact": Record(
            {"format": OneOf(*ARTIFACT_FORMATS)},
            {
                "opset": Integer(minimum=1),
                "switch_batch": Integer(minimum=1),
                "external_data": ListOf(_NAME),  # runtime.integrity checks they are plain names
            },
        ),
    },
    {
        "created": Text(),
        "versions": MapOf(Text(empty=True, nullable=True)),  # null: not installed
        "tasks": MapOf(Record({"task": OneOf(*TASKS), "reason": Text(empty=True)}), nullable=True),
        "validation": _VALIDATION,
        "fusion": Record(
            {},
            {
                "mode": OneOf(*FUSION_MODES),
                "groups": ListOf(_GROUP),
                "plain": MapOf(Text(empty=True)),  # member name -> why it is not fused
                "xla": Boolean(),
            },
            nullable=True,
        ),
        "build": MapOf(nullable=True),
        "verification": _VERIFICATION,
        # Its digests are checked by runtime.integrity, which refuses a malformed one.
        "integrity": Record(
            {},
            {"algorithm": Text(), "content": MapOf(Text(empty=True)), "manifest": Text(empty=True)},
            nullable=True,
        ),
    },
)


# Reading ------------------------------------------------------------------------------


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
        """The fused input or output ``data`` describes (``SPEC``); ``where`` names it.

        Raises:
            ManifestError: ``data`` does not fit ``SPEC``.
        """
        try:
            SPEC.check(data, 2)
        except Invalid as invalid:
            field = where + ("." + invalid.path() if invalid.keys else "")
            raise ManifestError(f"Manifest field {field} {invalid.problem}.") from None
        return cls(name=data["name"], shape=tuple(data["shape"]), dtype=data["dtype"])

    def describe(self) -> str:
        return f"{self.name}: {format_shape(self.shape)} {self.dtype}"


def format_shape(shape: Any) -> str:
    """A shape as Python prints a tuple, with ``None`` for free dimensions: ``(None, 20)``."""
    dims = ["None" if dim is None else str(dim) for dim in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def dumps(manifest: dict[str, Any]) -> str:
    """Serialise a manifest deterministically (sorted keys), ready to embed."""
    return json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False)


def loads(text: str | bytes, source: str, *, kind: str | None = None) -> dict[str, Any]:
    """Parse a manifest read from ``source`` and check it against ``MANIFEST``.

    Args:
        text: the manifest's JSON.
        source: the artifact, for messages.
        kind: the artifact's kind (``ARTIFACT_FORMATS``), if known: the manifest must say
            the same.

    Raises:
        ManifestError: naming ``source``, the field, what it must be and what it holds.
    """
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        where = deep_path(text)
        where = f"manifest field {where}" if where else "the manifest"
        raise ManifestError(
            f"The manifest in {source} is malformed: {where} is nested more than {MAX_DEPTH} "
            "levels deep, deeper than any manifest fuser writes."
        ) from None
    except ValueError as error:  # UnicodeDecodeError too
        raise ManifestError(f"The manifest in {source} is not valid JSON ({error}).") from None
    check(data, source, kind=kind)
    return data


def check(data: Any, source: str, *, kind: str | None = None) -> None:
    """Raise ``ManifestError`` unless ``data`` fits ``MANIFEST`` (and, if ``kind`` is
    given, describes an artifact of that kind)."""
    if isinstance(data, dict):
        # These two first, with their own advice: another file, or a newer fuser.
        if "format" in data and data["format"] != FORMAT:
            raise ManifestError(
                f"The manifest in {source} has format {data['format']!r:.60}, expected {FORMAT!r}."
            )
        version = data.get("format_version")
        if type(version) is int and version > FORMAT_VERSION:
            raise ManifestError(
                f"The manifest in {source} has format version {version!r}; this runtime reads "
                f"versions up to {FORMAT_VERSION}. Upgrade fuser to load it."
            )
    try:
        MANIFEST.check(data, 0)
    except Invalid as invalid:
        path = invalid.path()
        if path == "format_version":
            raise ManifestError(
                f"The manifest in {source} has format version {found(data[path])}; expected "
                "a positive integer."
            ) from None
        where = f"manifest field {path}" if path else "the manifest"
        raise ManifestError(
            f"The manifest in {source} is malformed: {where} {invalid.problem}."
        ) from None
    for key in ("inputs", "outputs"):
        names = [spec["name"] for spec in data[key]]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ManifestError(
                    f"The manifest in {source} is malformed: manifest field {key}[{index}].name "
                    f"repeats names in '{key}' ({name!r:.60} again); they must be unique."
                )
    if kind is not None and data["artifact"]["format"] != kind:
        raise ManifestError(
            f"The manifest in {source} is malformed: manifest field artifact.format is "
            f"{data['artifact']['format']!r}, but the artifact is {_KINDS.get(kind, kind)}."
        )


_KINDS = {
    "onnx": "an ONNX model ('onnx')",
    "savedmodel": "a SavedModel ('savedmodel')",
    "keras": "a .keras file ('keras')",
}


def specs(data: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    """The input or output specs (``key`` is ``"inputs"`` or ``"outputs"``) of a checked manifest."""
    return tuple(
        TensorSpec.from_json(spec, f"{key}[{index}]") for index, spec in enumerate(data[key])
    )


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")
