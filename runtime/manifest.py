"""The manifest: the JSON record that travels inside every fuser artifact.

Both sides read it: the compiler writes it, the runtime checks it before serving.
It lives here, in the runtime, because the runtime must never import the compiler.

Where it is stored:
- ONNX: ``metadata_props["fuser.manifest"]``;
- SavedModel: ``assets/fuser.json``;
- .keras: ``fuser.json`` inside the zip, beside Keras' own ``config.json``.

``MANIFEST`` below is its schema, written once: every field the runtime and
``fuser inspect`` read is checked against it when a manifest is read, so a manifest
that was edited (and sealed again) is refused at load, naming the field, instead of
failing later where the field is used.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from runtime.errors import ArtifactError

FORMAT = "fuser.manifest"
FORMAT_VERSION = 2  # 2: sealed with an integrity record (runtime.integrity)
ONNX_METADATA_KEY = "fuser.manifest"
SAVEDMODEL_ASSET = "assets/fuser.json"
KERAS_ZIP_ENTRY = "fuser.json"

ARTIFACT_FORMATS = ("onnx", "savedmodel", "keras")
# Values the compiler writes (``fuser`` declares them too; a test keeps both in step).
MEMBER_FORMATS = ("keras", "h5", "savedmodel", "memory")
TASKS = ("probabilities", "logits", "regression")
FUSION_MODES = ("auto", "off", "stack")
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
MAX_DEPTH = 32
MAX_RANK = 32  # numpy's limit before 2.0
_SHA256 = "[0-9a-f]{64}"
_FOUND_CHARS = 60
_PATH_KEYS = 8


class ManifestError(ArtifactError):
    """The manifest is missing, malformed, or from an unknown format version."""


# The schema's vocabulary --------------------------------------------------------------
# Each node checks a value and raises ``_Invalid`` naming what it must be; the path to
# the value is assembled only on the way out of a failed check, so a valid manifest
# costs one walk and no strings.


class _Invalid(Exception):
    """A value that does not fit the schema: what is wrong, and (reversed) where."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.keys: list[str | int] = []  # innermost first

    def path(self) -> str:
        return _render(list(reversed(self.keys)))


class _Node:
    """A schema node. ``check(value, depth)`` returns if ``value`` (at ``depth`` in the
    manifest) fits, else raises ``_Invalid``; ``nullable`` lets it be null as well."""

    nullable = False

    def expected(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return self.expected() + (" or null" if self.nullable else "")

    def check(self, value: Any, depth: int) -> None:
        raise NotImplementedError

    def _refuse(self, value: Any) -> None:
        if value is None and self.nullable:
            return
        raise _Invalid(f"must be {self.describe()}, found {_found(value)}")


class AnyValue(_Node):
    """Any JSON value nested no deeper than ``MAX_DEPTH`` in the manifest."""

    def expected(self) -> str:
        return "any JSON value"

    def check(self, value: Any, depth: int) -> None:
        if isinstance(value, (dict, list)):
            _check_depth(value, depth)


_ANY = AnyValue()


class Text(_Node):
    """A string: non-empty unless ``empty``; matching ``pattern`` in full if given."""

    def __init__(
        self,
        *,
        empty: bool = False,
        pattern: str | None = None,
        nullable: bool = False,
        what: str | None = None,
    ) -> None:
        self.empty, self.nullable, self.what = empty, nullable, what
        self.pattern = re.compile(pattern) if pattern else None

    def expected(self) -> str:
        if self.what is not None:
            return self.what
        if self.pattern is not None:
            return f"a string matching {self.pattern.pattern}"
        return "a string" if self.empty else "a non-empty string"

    def check(self, value: Any, depth: int) -> None:
        if not (
            isinstance(value, str)
            and (self.empty or value)
            and (self.pattern is None or self.pattern.fullmatch(value))
        ):
            self._refuse(value)


class Integer(_Node):
    def __init__(
        self,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        nullable: bool = False,
        what: str | None = None,
    ) -> None:
        self.minimum, self.maximum, self.nullable = minimum, maximum, nullable
        self.what = what

    def expected(self) -> str:
        if self.what is not None:
            return self.what
        if self.minimum is not None and self.maximum is not None:
            return f"an integer from {self.minimum} to {self.maximum}"
        return "an integer" + (f" of at least {self.minimum}" if self.minimum is not None else "")

    def check(self, value: Any, depth: int) -> None:
        if not (
            type(value) is int  # never a bool
            and (self.minimum is None or value >= self.minimum)
            and (self.maximum is None or value <= self.maximum)
        ):
            self._refuse(value)


class Number(_Node):
    def __init__(self, *, nullable: bool = False) -> None:
        self.nullable = nullable

    def expected(self) -> str:
        return "a number"

    def check(self, value: Any, depth: int) -> None:
        if type(value) is not float and type(value) is not int:  # JSON's numbers, no bool
            self._refuse(value)


class Boolean(_Node):
    def expected(self) -> str:
        return "true or false"

    def check(self, value: Any, depth: int) -> None:
        if not isinstance(value, bool):
            self._refuse(value)


class OneOf(_Node):
    def __init__(self, *values: str) -> None:
        self.values = values

    def expected(self) -> str:
        return "one of " + ", ".join(self.values)

    def check(self, value: Any, depth: int) -> None:
        if not (isinstance(value, str) and value in self.values):
            self._refuse(value)


class ListOf(_Node):
    def __init__(
        self,
        item: _Node,
        *,
        min_items: int = 0,
        max_items: int | None = None,
        nullable: bool = False,
    ) -> None:
        self.item, self.min_items, self.max_items = item, min_items, max_items
        self.nullable = nullable

    def expected(self) -> str:
        text = "a non-empty list" if self.min_items else "a list"
        if self.max_items is not None:
            text += f" of at most {self.max_items} items"
        return text

    def check(self, value: Any, depth: int) -> None:
        if not (
            isinstance(value, list)
            and len(value) >= self.min_items
            and (self.max_items is None or len(value) <= self.max_items)
        ):
            self._refuse(value)
            return
        check, depth = self.item.check, depth + 1
        index = 0
        try:
            for index, item in enumerate(value):  # noqa: B007 - the index names a failure
                check(item, depth)
        except _Invalid as invalid:
            invalid.keys.append(index)
            raise


class MapOf(_Node):
    """A JSON object with any keys, each holding a ``value``."""

    def __init__(self, value: _Node = _ANY, *, nullable: bool = False) -> None:
        self.value, self.nullable = value, nullable

    def expected(self) -> str:
        return "a JSON object"

    def check(self, value: Any, depth: int) -> None:
        if not isinstance(value, dict):
            self._refuse(value)
            return
        check, depth = self.value.check, depth + 1
        key = ""
        try:
            for key, item in value.items():  # noqa: B007 - the key names a failure
                check(item, depth)
        except _Invalid as invalid:
            invalid.keys.append(key)
            raise


class Record(_Node):
    """A JSON object with ``required`` and ``optional`` keys; any other key holds an
    ``other`` (by default any value: a newer fuser may add fields), or is refused (None)."""

    def __init__(
        self,
        required: dict[str, _Node],
        optional: dict[str, _Node] | None = None,
        *,
        other: _Node | None = _ANY,
        nullable: bool = False,
    ) -> None:
        self.required, self.optional, self.other = required, optional or {}, other
        self.fields = {**self.optional, **required}
        self.keys = frozenset(required)
        self.nullable = nullable

    def expected(self) -> str:
        return "a JSON object"

    def check(self, value: Any, depth: int) -> None:
        if not isinstance(value, dict):
            self._refuse(value)
            return
        if not self.keys <= value.keys():
            missing = [key for key in self.required if key not in value]
            raise _Invalid(f"lacks the keys {', '.join(missing)}")
        fields, other, depth = self.fields, self.other, depth + 1
        key = ""
        try:
            for key, item in value.items():
                node = fields.get(key, other)
                if node is None:
                    raise _Invalid(f"is not one of the keys {', '.join(fields)}")
                node.check(item, depth)
        except _Invalid as invalid:
            invalid.keys.append(key)
            raise


class Keyed(_Node):
    """Any JSON value; but an object holding ``key`` must be a ``record``."""

    def __init__(self, key: str, record: _Node) -> None:
        self.key, self.record = key, record

    def expected(self) -> str:
        return self.record.expected()

    def check(self, value: Any, depth: int) -> None:
        if isinstance(value, dict) and self.key in value:
            self.record.check(value, depth)
        else:
            _ANY.check(value, depth)


def _check_depth(value: Any, depth: int) -> None:
    """Raise ``_Invalid`` at the first list or object inside ``value`` (itself a list or an
    object at ``depth``) nested deeper than ``MAX_DEPTH``. Iterative: no recursion."""
    pending: list[tuple[Any, int, tuple]] = [(value, depth, ())]
    while pending:
        container, level, keys = pending.pop()
        if level > MAX_DEPTH:
            invalid = _Invalid(
                f"is nested more than {MAX_DEPTH} levels deep, deeper than any manifest "
                "fuser writes"
            )
            invalid.keys.extend(reversed(keys))
            raise invalid
        items = container.items() if isinstance(container, dict) else enumerate(container)
        pending.extend(
            (item, level + 1, (*keys, key)) for key, item in items if isinstance(item, (dict, list))
        )


def _render(keys: list[str | int]) -> str:
    """``members[2].name``; a path deeper than any fuser writes is cut short."""
    text = ""
    for key in keys[:_PATH_KEYS]:
        text = f"{text}[{key}]" if isinstance(key, int) else _join(text, key)
    return text + ("…" if len(keys) > _PATH_KEYS else "")


def _join(path: str, key: str) -> str:
    name = key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else json.dumps(key)
    return f"{path}.{name}" if path else name


def _found(value: Any) -> str:
    """A value for a message: its JSON text, cut short, after ``list`` or ``object``."""
    kind = "list " if isinstance(value, list) else "object " if isinstance(value, dict) else ""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = "…"
    if len(text) > _FOUND_CHARS:
        text = text[: _FOUND_CHARS - 1] + "…"
    return kind + text


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
_GROUP = Record(  # members stacked into one computation (fuser.stack)
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
                "plain": MapOf(Text(empty=True)),  # member name -> why it is not stacked
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
        except _Invalid as invalid:
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
        where = _deep_path(text)
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
    except _Invalid as invalid:
        path = invalid.path()
        if path == "format_version":
            raise ManifestError(
                f"The manifest in {source} has format version {_found(data[path])}; expected "
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


_TOKEN = re.compile(r'[\[\]{},:"]')
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)


def _deep_path(text: str | bytes) -> str:
    """The path of the first value in ``text`` nested deeper than ``MAX_DEPTH``, for the
    message refusing JSON too deep for Python's parser. Reads the text once, token by
    token, stopping there (or at anything it cannot follow)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    stack: list[list[Any]] = []  # per open container: "[" and the index, or "{" and the key
    expecting_key = False
    position = 0
    while len(stack) <= MAX_DEPTH:
        token = _TOKEN.search(text, position)
        if token is None:
            break
        character, position = token.group(), token.end()
        if character == '"':
            rest = _STRING_REST.match(text, position)
            if rest is None:
                break
            if expecting_key and stack:
                stack[-1][1] = text[position : rest.end() - 1]
                expecting_key = False
            position = rest.end()
        elif character in "[{":
            stack.append([character, 0 if character == "[" else ""])
            expecting_key = character == "{"
        elif character in "]}":
            if stack:
                stack.pop()
            expecting_key = False
        elif character == ",":
            if stack and stack[-1][0] == "[":
                stack[-1][1] += 1
            expecting_key = bool(stack) and stack[-1][0] == "{"
    return _render([key for _, key in stack])
