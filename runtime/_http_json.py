"""JSON for ``fuser serve`` in bounded pieces, so that no large body holds the GIL for long.

``json.loads`` and ``json.dumps`` are single C calls: on a 60 MiB body each holds the GIL
for most of a second, and then the millions of Python lists they create (or that
``tolist`` creates) cost as much again in garbage collection and deallocation. Run in a
worker thread, that would still stop the event loop, and every other client, for that
long. Here the same JSON is read and written in pieces of bounded size:

- ``loads`` walks the top levels of the document in Python (the request object, the
  ``inputs`` object, the list of rows) and hands each row, or each slice of at most
  ``PIECE_CHARS`` characters of a long flat array, to the C scanner; every
  ``BLOCK_ROWS`` elements of such an array become one numpy block, so no more than one
  block's worth of Python objects exists at a time. It returns what ``json.loads`` returns,
  except that such arrays arrive as numpy arrays (of bool, int64 or float64: what
  ``numpy.asarray`` makes of the same list) whenever their elements are regular numbers.
- ``dumps_arrays`` and ``dumps_rows`` write arrays ``BLOCK_ROWS`` rows at a time, as
  pieces of bytes that ``b"".join`` copies without holding the GIL.

Between pieces the worker thread lets the event loop run. The results are the same as
``json.loads``/``json.dumps`` (a test checks it), including the ``NaN`` and ``Infinity``
extensions that TF Serving reads and writes too.
"""

from __future__ import annotations

import codecs
import json
from json.decoder import WHITESPACE, scanstring
from typing import Any

import numpy as np

PIECE_CHARS = 1 << 16  # characters handed to the C scanner at once, for long flat arrays
BLOCK_ROWS = 1024  # elements gathered before they become one numpy block
STREAM_DEPTH = 3  # containers nested deeper than this are read by the C scanner whole
_DECODE_CHARS = 1 << 20  # bytes decoded from UTF-8 at once
_NUMERIC = (np.dtype(bool), np.dtype(np.int64), np.dtype(np.float64))
_SEPARATORS = (",", ":")


def decode_utf8(body: bytes) -> str:
    """``body`` as text (a leading byte-order mark dropped), decoded a megabyte at a time.

    Raises:
        UnicodeDecodeError: the body is not UTF-8.
    """
    if len(body) <= _DECODE_CHARS:
        return body.decode("utf-8-sig")
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    view = memoryview(body)
    parts = [
        decoder.decode(view[start : start + _DECODE_CHARS])
        for start in range(0, len(body), _DECODE_CHARS)
    ]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def loads(text: str) -> Any:
    """The JSON value of ``text``, as ``json.loads`` reads it, arrays of numbers as numpy.

    Raises:
        json.JSONDecodeError: ``text`` is not JSON.
        RecursionError: arrays or objects nested too deep for the C scanner.
    """
    reader = _Reader(text)
    value, end = reader.value(reader.skip(0), 0)
    end = reader.skip(end)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def as_blocks(values: list[Any]) -> Any:
    """``values`` as one numpy array made a block at a time, or as the list if irregular."""
    elements = _Elements()
    for start in range(0, len(values), BLOCK_ROWS):
        elements.extend(values[start : start + BLOCK_ROWS])
    return elements.result()


def dumps_arrays(array: np.ndarray) -> list[bytes]:
    """``json.dumps(array.tolist())`` without spaces, as pieces of at most ``BLOCK_ROWS`` rows.

    ``b"".join`` of the pieces is the JSON; it copies without holding the GIL.
    """
    pieces = [
        json.dumps(array[start : start + BLOCK_ROWS].tolist(), separators=_SEPARATORS)[1:-1]
        for start in range(0, len(array), BLOCK_ROWS)
    ]
    return _bracketed(pieces)


def dumps_rows(arrays: dict[str, np.ndarray]) -> list[bytes]:
    """``[{name: row of arrays[name]}, ...]`` as JSON without spaces, in pieces of rows."""
    rows = len(next(iter(arrays.values())))
    pieces = []
    for start in range(0, rows, BLOCK_ROWS):
        lists = {name: value[start : start + BLOCK_ROWS].tolist() for name, value in arrays.items()}
        count = len(next(iter(lists.values())))
        block = [{name: lists[name][i] for name in lists} for i in range(count)]
        pieces.append(json.dumps(block, separators=_SEPARATORS)[1:-1])
    return _bracketed(pieces)


def _bracketed(pieces: list[str]) -> list[bytes]:
    """``[`` + the comma-joined pieces + ``]``, as bytes pieces."""
    if not pieces:
        return [b"[]"]
    encoded = [b"[" + pieces[0].encode()]
    encoded += [b"," + piece.encode() for piece in pieces[1:]]
    encoded.append(b"]")
    return encoded


class _Reader:
    """A recursive-descent reader for the top ``STREAM_DEPTH`` levels of one document."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.scan_once = json.JSONDecoder().scan_once

    def skip(self, position: int) -> int:
        return WHITESPACE.match(self.text, position).end()

    def value(self, position: int, depth: int) -> tuple[Any, int]:
        char = self.text[position : position + 1]
        if char == "{" and depth < STREAM_DEPTH:
            return self.object(position, depth)
        if char == "[" and depth < STREAM_DEPTH:
            return self.array(position, depth)
        return self.scan(position)

    def scan(self, position: int) -> tuple[Any, int]:
        try:
            return self.scan_once(self.text, position)
        except StopIteration as stop:
            raise json.JSONDecodeError("Expecting value", self.text, stop.value) from None

    def object(self, position: int, depth: int) -> tuple[dict[str, Any], int]:
        text, result = self.text, {}
        position = self.skip(position + 1)
        if text[position : position + 1] == "}":
            return result, position + 1
        while True:
            if text[position : position + 1] != '"':
                raise json.JSONDecodeError(
                    "Expecting property name enclosed in double quotes", text, position
                )
            key, position = scanstring(text, position + 1)
            position = self.skip(position)
            if text[position : position + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, position)
            result[key], position = self.value(self.skip(position + 1), depth + 1)
            position = self.skip(position)
            char = text[position : position + 1]
            if char == "}":
                return result, position + 1
            if char != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            position = self.skip(position + 1)

    def array(self, position: int, depth: int) -> tuple[Any, int]:
        text = self.text
        end = text.find("]", position)
        if end != -1 and all(text.find(char, position + 1, end) == -1 for char in '[{"'):
            # A flat array of numbers and literals: no brackets or strings before its end.
            if end - position <= PIECE_CHARS:
                return self.scan(position)
            return self.flat_pieces(position, end), end + 1
        elements = _Elements()
        position = self.skip(position + 1)
        if text[position : position + 1] == "]":
            return [], position + 1
        while True:
            value, position = self.value(position, depth + 1)
            elements.add(value)
            position = self.skip(position)
            char = text[position : position + 1]
            if char == "]":
                return elements.result(), position + 1
            if char != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            position = self.skip(position + 1)

    def flat_pieces(self, position: int, end: int) -> Any:
        """The flat array from ``position`` to ``end`` (its ``]``), cut at commas."""
        text, elements = self.text, _Elements()
        start = position + 1
        if self.skip(start) == end:
            return []  # only whitespace between the brackets
        while True:
            cut = text.find(",", min(start + PIECE_CHARS, end), end)
            stop = end if cut == -1 else cut
            piece = text[start:stop]
            if not piece.strip(" \t\n\r"):
                raise json.JSONDecodeError("Expecting value", text, start)
            try:
                values = json.loads("[" + piece + "]")
            except json.JSONDecodeError as error:
                raise json.JSONDecodeError(error.msg, text, start + error.pos - 1) from None
            elements.extend(values)
            if stop == end:
                return elements.result()
            start = stop + 1


class _Elements:
    """The elements of one JSON array, made into numpy blocks while they are regular numbers.

    A block is kept if ``numpy.asarray`` makes bool, int64 or float64 of it with the same
    trailing shape as the blocks before; joining such blocks gives what ``numpy.asarray``
    gives for the whole list. Anything else (ragged rows, strings, nulls, objects) turns the
    array back into the plain list ``json.loads`` would have made, so that whoever checks
    it later sees exactly what the client sent.
    """

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.pending: list[Any] = []
        self.plain: list[Any] | None = None

    def add(self, value: Any) -> None:
        if self.plain is not None:
            self.plain.append(value)
            return
        self.pending.append(value)
        if len(self.pending) >= BLOCK_ROWS:
            self.flush()

    def extend(self, values: list[Any]) -> None:
        if self.plain is not None:
            self.plain.extend(values)
            return
        self.pending.extend(values)
        if len(self.pending) >= BLOCK_ROWS:
            self.flush()

    def flush(self) -> None:
        block = _numeric_block(self.pending)
        if block is None or (self.blocks and block.shape[1:] != self.blocks[0].shape[1:]):
            self.plain = [row for done in self.blocks for row in done.tolist()]
            self.plain += [_plain(value) for value in self.pending]
            self.blocks = []
        else:
            self.blocks.append(block)
        self.pending = []

    def result(self) -> Any:
        if self.plain is None and self.pending:
            self.flush()
        if self.plain is not None:
            return self.plain
        if not self.blocks:
            return []
        if len(self.blocks) == 1:
            return self.blocks[0]
        # Block by block, rather than one np.concatenate: numpy copies without the GIL.
        joined = np.empty(
            (sum(len(block) for block in self.blocks), *self.blocks[0].shape[1:]),
            dtype=np.result_type(*self.blocks),
        )
        start = 0
        for block in self.blocks:
            joined[start : start + len(block)] = block
            start += len(block)
        return joined


def _numeric_block(values: list[Any]) -> np.ndarray | None:
    if any(isinstance(value, (dict, str)) for value in values):
        return None
    try:
        block = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        return None
    return block if block.dtype in _NUMERIC else None


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value
