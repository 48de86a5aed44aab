"""TensorFlow Serving's REST API, as ``fuser serve`` speaks it: predict bodies parsed and
checked, answers, status and metadata written.

A predict body is ``{"instances": [...]}`` (rows) or ``{"inputs": ...}`` (columns), with an
optional ``"signature_name"``; every way it can be wrong is a ``BadRequest`` naming what
was expected and what was found. Large bodies are decoded in bounded pieces
(``runtime._http_json``) so that the server can run this in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime._http_json import as_blocks, decode_utf8, dumps_arrays, dumps_rows, loads
from runtime.inputs import prepare_feeds

VERSION = "1"  # one artifact is one version, as in models/<name>/1/ of TF Serving
_DTYPES = {
    "float16": "DT_HALF",
    "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE",
    "int8": "DT_INT8",
    "int16": "DT_INT16",
    "int32": "DT_INT32",
    "int64": "DT_INT64",
    "uint8": "DT_UINT8",
    "bool": "DT_BOOL",
}


class BadRequest(ValueError):
    """A request this server answers with HTTP 400 (or ``status``) and ``{"error": ...}``.

    ``close`` closes the connection after the answer: the rest of the body, still
    arriving, is not read.
    """

    def __init__(self, message: str, status: int = 400, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


def parse_predict(body: bytes, model: Any) -> tuple[bool, dict[str, np.ndarray]]:
    """``(columnar, checked feeds)`` from a TF Serving predict request body.

    Raises:
        BadRequest: an empty body, not UTF-8, malformed or too deeply nested JSON, neither
            or both of ``instances``/``inputs``, an unknown signature, missing or unknown
            inputs, wrong shapes or types, numbers beyond the range of float64 or of the
            input's float type.
    """
    if not body or body.isspace():
        raise BadRequest(
            'The request body is empty; send a JSON object with "instances" or "inputs".'
        )
    try:
        text = decode_utf8(body)
    except UnicodeDecodeError as error:
        raise BadRequest(
            f"The request body must be UTF-8 JSON, but it is not UTF-8 ({error.reason})."
        ) from None
    try:
        payload = loads(text)
    except RecursionError:
        raise BadRequest(
            "The request body nests JSON arrays or objects too deeply to read; a predict "
            "request needs one level per input dimension."
        ) from None
    except ValueError as error:
        raise BadRequest(f"The request body is not valid JSON: {error}.") from None
    if not isinstance(payload, dict):
        raise BadRequest(
            f'The request must be a JSON object with "instances" or "inputs", not '
            f"{_json_type(payload)}."
        )
    if ("instances" in payload) == ("inputs" in payload):
        raise BadRequest(
            'The request must have exactly one of "instances" (row format) or "inputs" '
            "(columnar format)."
        )
    signature = payload.get("signature_name", "serving_default")
    if signature != "serving_default":
        raise BadRequest(
            f"Serving signature name: {signature!r} not found; this model has 'serving_default'."
        )
    names = [spec.name for spec in model.inputs]
    columnar = "inputs" in payload
    values = _columns(payload["inputs"], names) if columnar else _rows(payload["instances"], names)
    values = _check_ranges(model.inputs, values, text)
    try:
        feeds = prepare_feeds(model.inputs, values)
    except (ValueError, TypeError) as error:
        raise BadRequest(str(error)) from None
    if next(iter(feeds.values())).shape[0] == 0:
        raise BadRequest("The request holds no rows.")
    return columnar, feeds


def _json_type(value: Any) -> str:
    if isinstance(value, (list, np.ndarray)):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def _rows(instances: Any, names: list[str]) -> dict[str, Any]:
    if isinstance(instances, np.ndarray) and len(names) == 1:
        return {names[0]: instances}
    if not isinstance(instances, (list, np.ndarray)) or not len(instances):
        raise BadRequest('"instances" must be a non-empty list of rows.')
    if isinstance(instances, list) and all(isinstance(row, dict) for row in instances):
        columns = {}
        for name in names:
            try:
                columns[name] = as_blocks([row[name] for row in instances])
            except KeyError:
                raise BadRequest(
                    f"Every instance needs the input {name!r}; this model takes {names}."
                ) from None
        unknown = sorted({key for row in instances for key in row} - set(names))
        if unknown:
            raise BadRequest(f"Unknown inputs {unknown}; this model takes {names}.")
        return columns
    if len(names) > 1 or any(isinstance(row, dict) for row in instances):
        raise BadRequest(
            f"This model takes {len(names)} inputs {names}: every instance must be an object "
            "keyed by input name."
        )
    return {names[0]: instances}


def _columns(inputs: Any, names: list[str]) -> dict[str, Any]:
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - set(names))
        missing = [name for name in names if name not in inputs]
        if unknown or missing:
            raise BadRequest(f"Expected inputs {names}; missing {missing}, unknown {unknown}.")
        return inputs
    if len(names) > 1:
        raise BadRequest(
            f'This model takes {len(names)} inputs {names}: "inputs" must be an object keyed '
            "by input name."
        )
    return {names[0]: inputs}


def _check_ranges(inputs: Sequence[Any], values: dict[str, Any], text: str) -> dict[str, Any]:
    """``values`` with float inputs as arrays, once none holds a number that overflowed.

    JSON numbers beyond float64 (``1e999``) parse as infinity, and float64 values beyond
    the range of a float32 (or float16) input would become infinity when cast: both are
    refused here rather than fed to the model as infinities. The literals ``Infinity`` and
    ``-Infinity`` (and ``NaN``) are accepted, as TF Serving accepts them.

    Raises:
        BadRequest: such a number, named.
    """
    checked = dict(values)
    literals_checked = False
    for spec in inputs:
        value = values[spec.name]
        try:
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            continue  # prepare_feeds says what is wrong with it
        if array.dtype.kind != "f":
            continue
        checked[spec.name] = array
        finite = np.isfinite(array)
        if not literals_checked and not finite.all() and np.isinf(array).any():
            _refuse_overflowing_literals(text)
            literals_checked = True
        expected = np.dtype(spec.dtype)
        if expected.kind == "f" and expected.itemsize < array.dtype.itemsize:
            with np.errstate(over="ignore"):
                overflow = finite & ~np.isfinite(array.astype(expected))
            if overflow.any():
                raise BadRequest(
                    f"Input {spec.name!r} expects {expected} values, but "
                    f"{float(array[overflow].flat[0])!r} is beyond {expected}'s largest "
                    f"magnitude {float(np.finfo(expected).max):.8g} and would become infinity."
                )
    return checked


def _refuse_overflowing_literals(text: str) -> None:
    """Raise if a number in ``text`` is beyond float64 (read again: only once one is inf)."""

    def finite_float(literal: str) -> float:
        value = float(literal)
        if math.isinf(value):
            shown = literal if len(literal) <= 40 else f"{literal[:37]}..."
            raise BadRequest(
                f"The request holds the number {shown}, beyond the range of 64-bit floats; "
                "send finite values, or the literals Infinity and -Infinity for infinity."
            )
        return value

    with contextlib.suppress(RecursionError):
        json.loads(text, parse_float=finite_float)


def format_outputs(outputs: dict[str, np.ndarray], model: Any, columnar: bool) -> bytes:
    """The JSON answer: ``json.dumps`` of TF Serving's form, written a block at a time."""
    names = [spec.name for spec in model.outputs]
    key = b'{"outputs":' if columnar else b'{"predictions":'
    if len(names) == 1:
        pieces = [key, *dumps_arrays(outputs[names[0]]), b"}"]
    elif columnar:
        pieces = [key + b"{"]
        for index, name in enumerate(names):
            pieces.append((b"," if index else b"") + json.dumps(name).encode() + b":")
            pieces += dumps_arrays(outputs[name])
        pieces.append(b"}}")
    else:
        pieces = [key, *dumps_rows({name: outputs[name] for name in names}), b"}"]
    return b"".join(pieces)


def status() -> dict[str, Any]:
    return {
        "model_version_status": [
            {
                "version": VERSION,
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


def _tensor_info(spec: Any) -> dict[str, Any]:
    return {
        "dtype": _DTYPES.get(spec.dtype, "DT_INVALID"),
        "tensor_shape": {
            "dim": [{"size": str(-1 if dim is None else dim), "name": ""} for dim in spec.shape],
            "unknown_rank": False,
        },
        "name": spec.name,
    }


def metadata(model: Any, name: str) -> dict[str, Any]:
    signature = {
        "inputs": {spec.name: _tensor_info(spec) for spec in model.inputs},
        "outputs": {spec.name: _tensor_info(spec) for spec in model.outputs},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": VERSION},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }
