"""``fuser serve``: one fused artifact behind TensorFlow Serving's REST API.

A client written for TF Serving works unchanged:

- ``POST /v1/models/<name>:predict`` (and ``/v1/models/<name>/versions/1:predict``), in row
  form ``{"instances": [...]}`` -> ``{"predictions": [...]}`` or columnar form
  ``{"inputs": ...}`` -> ``{"outputs": ...}``;
- ``GET /v1/models/<name>`` (status) and ``GET /v1/models/<name>/metadata`` (the
  ``serving_default`` signature);
- bad requests get HTTP 400 with ``{"error": "..."}``; an unknown model 404.

Beyond TF Serving: ``GET /healthz`` and ``GET /metrics`` (Prometheus text). Concurrent
requests are coalesced by a ``DynamicBatcher`` (``max_batch_size`` rows, waiting at most
``batch_timeout_ms`` for more). Starlette and uvicorn come with the ``serve`` extra;
TensorFlow is only imported to serve a SavedModel or ``.keras`` artifact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.batching import DynamicBatcher

VERSION = "1"  # one artifact is one version, as in models/<name>/1/ of TF Serving
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
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
    """A request this server answers with HTTP 400 (or ``status``) and ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches and what it accepts; checked once, in ``check``."""

    name: str
    max_batch_size: int = 64
    batch_timeout_ms: float = 2.0
    batching: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def check(self) -> list[str]:
        problems = []
        if not self.name or "/" in self.name or ":" in self.name:
            problems.append(
                f"The model name must be non-empty without '/' or ':', got {self.name!r}."
            )
        if self.max_batch_size < 1:
            problems.append(f"--max-batch-size must be at least 1, got {self.max_batch_size}.")
        if not (math.isfinite(self.batch_timeout_ms) and self.batch_timeout_ms >= 0):
            problems.append(
                f"--batch-timeout-ms must be a non-negative number, got {self.batch_timeout_ms}."
            )
        if self.max_body_bytes < 1:
            problems.append(f"--max-body-bytes must be positive, got {self.max_body_bytes}.")
        return problems


def create_app(model: Any, options: ServeOptions) -> Any:
    """The ASGI app serving ``model`` (a ``runtime.FusedModel``) under ``options.name``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    problems = options.check()
    if problems:
        raise ValueError(" ".join(problems))
    state = _State(model, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if state.batcher is not None:
            await asyncio.to_thread(state.batcher.close)

    def respond(payload: Any, status: int = 200) -> Response:
        # TF Serving writes NaN and Infinity as JSON extensions; so does json.dumps.
        body = json.dumps(payload, separators=(",", ":"))
        return Response(body, status_code=status, media_type="application/json")

    async def models(request: Request) -> Response:
        try:
            return respond(await state.route(request))
        except BadRequest as error:
            state.errors += 1
            return respond({"error": str(error)}, error.status)

    async def health(request: Request) -> Response:
        return respond({"status": "ok", "model": options.name})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics(), media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/v1/models/{rest:path}", models, methods=["GET", "POST"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


class _State:
    def __init__(self, model: Any, options: ServeOptions) -> None:
        self.model = model
        self.options = options
        self.errors = 0
        self.requests = 0
        self.batcher = (
            DynamicBatcher(
                lambda feeds: model.predict(feeds, as_dict=True),
                max_batch_size=options.max_batch_size,
                timeout=options.batch_timeout_ms / 1000,
            )
            if options.batching
            else None
        )

    async def route(self, request: Any) -> Any:
        rest = request.path_params["rest"]
        name, _, verb = rest.partition(":")
        parts = name.split("/")
        version = None
        if len(parts) >= 3 and parts[1] == "versions":
            version = parts[2]
            parts = [parts[0], *parts[3:]]
        if parts[0] != self.options.name or (version is not None and version != VERSION):
            wanted = f"Specific({parts[0]}, {version})" if version else f"Latest({parts[0]})"
            raise BadRequest(f"Servable not found for request: {wanted}", 404)
        if request.method == "POST" and verb == "predict" and len(parts) == 1:
            return await self.predict(request)
        if request.method == "GET" and not verb and parts[1:] == []:
            return _status()
        if request.method == "GET" and not verb and parts[1:] == ["metadata"]:
            return _metadata(self.model, self.options.name)
        raise BadRequest(f"No {request.method} endpoint /v1/models/{rest}.", 404)

    async def predict(self, request: Any) -> Any:
        body = await _read_body(request, self.options.max_body_bytes)
        columnar, feeds = parse_predict(body, self.model)
        self.requests += 1
        if self.batcher is not None:
            outputs = await asyncio.wrap_future(self.batcher.submit(feeds))
        else:
            outputs = await asyncio.to_thread(self.model.predict, feeds, as_dict=True)
        return format_outputs(outputs, self.model, columnar)

    def metrics(self) -> str:
        stats = self.batcher.stats if self.batcher is not None else None
        lines = [
            "# TYPE fuser_predict_requests_total counter",
            f"fuser_predict_requests_total {self.requests}",
            "# TYPE fuser_request_errors_total counter",
            f"fuser_request_errors_total {self.errors}",
        ]
        if stats is not None:
            lines += [
                "# TYPE fuser_batched_requests_total counter",
                f"fuser_batched_requests_total {stats.requests}",
                "# TYPE fuser_batched_rows_total counter",
                f"fuser_batched_rows_total {stats.rows}",
                "# TYPE fuser_forward_passes_total counter",
                f"fuser_forward_passes_total {stats.forward_passes}",
                "# TYPE fuser_largest_batch_rows gauge",
                f"fuser_largest_batch_rows {stats.largest_batch}",
            ]
        return "\n".join(lines) + "\n"


async def _read_body(request: Any, limit: int) -> bytes:
    """The body, at most ``limit`` bytes kept; a larger one is read to its end and dropped,
    so that the client, still sending, receives the 400 instead of a reset connection."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        else:
            chunks.clear()
    if size > limit:
        raise BadRequest(f"The request body has {size} bytes; this server takes at most {limit}.")
    return b"".join(chunks)


def parse_predict(body: bytes, model: Any) -> tuple[bool, dict[str, np.ndarray]]:
    """``(columnar, checked feeds)`` from a TF Serving predict request body.

    Raises:
        BadRequest: malformed JSON, neither or both of ``instances``/``inputs``, an unknown
            signature, missing or unknown inputs, wrong shapes or types.
    """
    from runtime.inputs import prepare_feeds

    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"The request body is not valid JSON: {error}.") from None
    if not isinstance(payload, dict):
        raise BadRequest(
            f'The request must be a JSON object with "instances" or "inputs", not '
            f"{type(payload).__name__}."
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
    try:
        feeds = prepare_feeds(model.inputs, values)
    except (ValueError, TypeError) as error:
        raise BadRequest(str(error)) from None
    if next(iter(feeds.values())).shape[0] == 0:
        raise BadRequest("The request holds no rows.")
    return columnar, feeds


def _rows(instances: Any, names: list[str]) -> dict[str, Any]:
    if not isinstance(instances, list) or not instances:
        raise BadRequest('"instances" must be a non-empty list of rows.')
    if all(isinstance(row, dict) for row in instances):
        columns = {}
        for name in names:
            try:
                columns[name] = [row[name] for row in instances]
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


def format_outputs(outputs: dict[str, np.ndarray], model: Any, columnar: bool) -> Any:
    names = [spec.name for spec in model.outputs]
    if columnar:
        if len(names) == 1:
            return {"outputs": outputs[names[0]].tolist()}
        return {"outputs": {name: outputs[name].tolist() for name in names}}
    if len(names) == 1:
        return {"predictions": outputs[names[0]].tolist()}
    lists = {name: outputs[name].tolist() for name in names}
    rows = len(lists[names[0]])
    return {"predictions": [{name: lists[name][i] for name in names} for i in range(rows)]}


def _status() -> dict[str, Any]:
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


def _metadata(model: Any, name: str) -> dict[str, Any]:
    signature = {
        "inputs": {spec.name: _tensor_info(spec) for spec in model.inputs},
        "outputs": {spec.name: _tensor_info(spec) for spec in model.outputs},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": VERSION},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }
