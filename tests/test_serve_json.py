"""The server's JSON in bounded pieces (``runtime._http_json``) reads and writes what
``json.loads`` and ``json.dumps`` do. Pieces and blocks are made tiny here, so that every
document is cut at every level."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from runtime import _http_json
from runtime.manifest import TensorSpec
from runtime.tfserving_api import format_outputs


@pytest.fixture(autouse=True)
def tiny_pieces(monkeypatch):
    monkeypatch.setattr(_http_json, "PIECE_CHARS", 16)
    monkeypatch.setattr(_http_json, "BLOCK_ROWS", 3)


def same(got, expected) -> bool:
    """``got`` matches ``json.loads``' value: numpy arrays as ``numpy.asarray`` makes them."""
    if isinstance(got, np.ndarray):
        wanted = np.asarray(expected)
        return (
            wanted.dtype == got.dtype
            and wanted.shape == got.shape
            and np.array_equal(got, wanted, equal_nan=got.dtype.kind == "f")
        )
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(map(same, got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same(got[k], expected[k]) for k in got)
    if isinstance(got, float) and isinstance(expected, float) and math.isnan(expected):
        return math.isnan(got)
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        # A list that stopped being numpy gives back floats where a block was float64.
        return got == expected
    return type(got) is type(expected) and got == expected


def documents(count: int):
    """Seeded random JSON: nested rows, ragged rows, mixed scalars, objects, strings."""
    rng = random.Random(0)
    scalars = [0, 1, -3, 2**63, 2**64, 2.5, -1e-7, True, False, None, "s]", math.nan, math.inf]

    def value(depth):
        roll = rng.random()
        if depth > 4 or roll < 0.3:
            return rng.choice(scalars)
        if roll < 0.8:
            if rng.random() < 0.5:
                return [value(depth + 1) for _ in range(rng.randint(0, 8))]
            row = [rng.random() for _ in range(rng.randint(1, 4))]
            return [row if rng.random() < 0.9 else row[:-1] for _ in range(rng.randint(0, 8))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 3))}

    for _ in range(count):
        yield json.dumps(value(0), indent=rng.choice([None, 1]))


def test_bounded_json_reads_what_json_loads_reads():
    for text in documents(3000):
        assert same(_http_json.loads(text), json.loads(text)), text


FLAT = "[" + ", ".join(str(i) for i in range(40)) + "]"  # longer than a piece


@pytest.mark.parametrize(
    "text",
    [
        '{"instances": ' + FLAT + "}",
        "[" + " " * 100 + "]",
        "[ [1, 2], [3, 4.5], [true, 0], [NaN, Infinity], [-Infinity, 1e-300] ]",
        '{"a": {"b": [[1], [2], [3], [4]]}, "a": 2}',
        '"\\u00e9t\\u00e9"',
        "\ufeff",  # not JSON: the byte-order mark is dropped in decode_utf8, not here
    ],
)
def test_bounded_json_agrees_with_json_loads_on_edge_cases(text):
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            _http_json.loads(text)
        return
    assert same(_http_json.loads(text), expected)


@pytest.mark.parametrize(
    "text",
    [
        FLAT[:-1] + ",]",  # a trailing comma at a piece boundary
        FLAT.replace(", 20,", ",,"),
        FLAT.replace(", 20,", ", x,"),
        '{"instances": ' + FLAT,
        '{"instances": ' + FLAT + "} []",
        '{"instances" ' + FLAT + "}",
        "[[1, 2] [3, 4]]",
        '{"a": 1,}',
        "",
    ],
)
def test_bounded_json_refuses_what_json_loads_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        _http_json.loads(text)


def test_nesting_beyond_the_c_scanner_raises_recursion_error():
    with pytest.raises(RecursionError):
        _http_json.loads("[" * 100000 + "]" * 100000)


def test_utf8_is_decoded_in_pieces_across_multibyte_characters(monkeypatch):
    monkeypatch.setattr(_http_json, "_DECODE_CHARS", 5)
    text = '{"name": "été ☃ 𝄞"}' * 7
    assert _http_json.decode_utf8(("\ufeff" + text).encode()) == text
    with pytest.raises(UnicodeDecodeError):
        _http_json.decode_utf8(text.encode()[:-20] + b"\xff" + text.encode()[-20:])


class _Outputs:
    def __init__(self, names):
        self.outputs = tuple(TensorSpec(name, (None, 2), "float32") for name in names)


@pytest.mark.parametrize("names", [["y"], ["score", "probs"]])
@pytest.mark.parametrize("columnar", [False, True])
def test_answers_are_written_as_json_dumps_writes_them(names, columnar):
    rng = np.random.default_rng(0)
    outputs = {name: rng.normal(size=(10, 2)).astype(np.float32) for name in names}
    outputs[names[0]][3] = [np.nan, np.inf]
    lists = {name: value.tolist() for name, value in outputs.items()}
    if columnar:
        payload = {"outputs": lists[names[0]] if len(names) == 1 else lists}
    elif len(names) == 1:
        payload = {"predictions": lists[names[0]]}
    else:
        payload = {"predictions": [{name: lists[name][i] for name in names} for i in range(10)]}
    written = format_outputs(outputs, _Outputs(names), columnar)
    assert written == json.dumps(payload, separators=(",", ":")).encode()
