"""A small vocabulary for checking JSON against a schema, with messages that name the field.

``runtime.manifest`` writes the manifest's schema in it. Each node checks a value and
raises ``Invalid`` naming what it must be; the path to the value is assembled only on
the way out of a failed check, so a valid document costs one walk and no strings.
Nothing here recurses on the document: a value nested deeper than ``MAX_DEPTH`` is
refused, naming where.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32
_FOUND_CHARS = 60
_PATH_KEYS = 8


class Invalid(Exception):
    """A value that does not fit the schema: what is wrong, and (reversed) where."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.keys: list[str | int] = []  # innermost first

    def path(self) -> str:
        return render(list(reversed(self.keys)))


class _Node:
    """A schema node. ``check(value, depth)`` returns if ``value`` (at ``depth`` in the
    manifest) fits, else raises ``Invalid``; ``nullable`` lets it be null as well."""

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
        raise Invalid(f"must be {self.describe()}, found {found(value)}")


class AnyValue(_Node):
    """Any JSON value nested no deeper than ``MAX_DEPTH`` in the manifest."""

    def expected(self) -> str:
        return "any JSON value"

    def check(self, value: Any, depth: int) -> None:
        if isinstance(value, (dict, list)):
            check_depth(value, depth)


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
        except Invalid as invalid:
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
        except Invalid as invalid:
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
            raise Invalid(f"lacks the keys {', '.join(missing)}")
        fields, other, depth = self.fields, self.other, depth + 1
        key = ""
        try:
            for key, item in value.items():
                node = fields.get(key, other)
                if node is None:
                    raise Invalid(f"is not one of the keys {', '.join(fields)}")
                node.check(item, depth)
        except Invalid as invalid:
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


def check_depth(value: Any, depth: int) -> None:
    """Raise ``Invalid`` at the first list or object inside ``value`` (itself a list or an
    object at ``depth``) nested deeper than ``MAX_DEPTH``. Iterative: no recursion."""
    pending: list[tuple[Any, int, tuple]] = [(value, depth, ())]
    while pending:
        container, level, keys = pending.pop()
        if level > MAX_DEPTH:
            invalid = Invalid(
                f"is nested more than {MAX_DEPTH} levels deep, deeper than any manifest "
                "fuser writes"
            )
            invalid.keys.extend(reversed(keys))
            raise invalid
        items = container.items() if isinstance(container, dict) else enumerate(container)
        pending.extend(
            (item, level + 1, (*keys, key)) for key, item in items if isinstance(item, (dict, list))
        )


def render(keys: list[str | int]) -> str:
    """``members[2].name``; a path deeper than any fuser writes is cut short."""
    text = ""
    for key in keys[:_PATH_KEYS]:
        text = f"{text}[{key}]" if isinstance(key, int) else _join(text, key)
    return text + ("…" if len(keys) > _PATH_KEYS else "")


def _join(path: str, key: str) -> str:
    name = key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else json.dumps(key)
    return f"{path}.{name}" if path else name


def found(value: Any) -> str:
    """A value for a message: its JSON text, cut short, after ``list`` or ``object``."""
    kind = "list " if isinstance(value, list) else "object " if isinstance(value, dict) else ""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = "…"
    if len(text) > _FOUND_CHARS:
        text = text[: _FOUND_CHARS - 1] + "…"
    return kind + text


_TOKEN = re.compile(r'[\[\]{},:"]')
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)


def deep_path(text: str | bytes) -> str:
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
    return render([key for _, key in stack])
