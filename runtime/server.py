"""``fuser serve``: one fused artifact behind TensorFlow Serving's REST API.

A client written for TF Serving works unchanged:

- ``POST /v1/models/<name>:predict`` (and ``/v1/models/<name>/versions/1:predict``), in row
  form ``{"instances": [...]}`` -> ``{"predictions": [...]}`` or columnar form
  ``{"inputs": ...}`` -> ``{"outputs": ...}``;
- ``GET /v1/models/<name>`` (status) and ``GET /v1/models/<name>/metadata`` (the
  ``serving_default`` signature);
- bad requests get HTTP 400 with ``{"error": "..."}``; an unknown model 404. Every error
  this server answers has that body, and counts in ``fuser_request_errors_total``.

Beyond TF Serving: ``GET /healthz`` and ``GET /metrics`` (Prometheus text). Concurrent
requests are coalesced by a ``DynamicBatcher`` (``max_batch_size`` rows, waiting at most
``batch_timeout_ms`` for more; only requests of the same shapes share a forward pass).
Bodies over ``INLINE_BODY_BYTES`` are decoded, and large answers encoded, in a worker
thread and in bounded pieces (``runtime._http_json``), so that one large request does not
stall the event loop, and with it everyone else. ``run`` serves with uvicorn's h11
protocol plus a deadline for each request and a cap on connections
(``runtime._http_guard``). Starlette and uvicorn come with the ``serve`` extra; TensorFlow
is only imported to serve a SavedModel or ``.keras`` artifact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime._http_json import as_blocks, decode_utf8, dumps_arrays, dumps_rows, loads
from runtime.batching import DynamicBatcher

VERSION = "1"  # one artifact is one version, as in models/<name>/1/ of TF Serving
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_MAX_CONNECTIONS = 512
INLINE_BODY_BYTES = 64 * 2**10  # larger bodies are decoded in a worker thread
INLINE_OUTPUT_VALUES = 2**14  # answers with more values are encoded in a worker thread
CODEC_THREADS = 2  # worker threads for large bodies: more would only share the GIL
LISTEN_BACKLOG = 128  # also the most connections one round of accept() takes at once
RESERVED_DESCRIPTORS = 64  # the listening socket, the artifact, logs, the event loop
# How long a thread may hold the GIL while another waits for it. The default, 5 ms, lets a
# worker decoding a large body delay the event loop 5 ms at each of the several hand-overs
# a small request needs; 1 ms halves its p99 latency then (benchmarks/results/SERVE.md).
GIL_SWITCH_INTERVAL_S = 0.001
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
logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request this server answers with HTTP 400 (or ``status``) and ``{"error": ...}``.

    ``close`` closes the connection after the answer: the rest of the body, still
    arriving, is not read.
    """

    def __init__(self, message: str, status: int = 400, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches and what it accepts; checked once, in ``check``.

    ``request_timeout_s`` and ``max_connections`` are enforced by ``run`` (the connection
    guard of ``runtime._http_guard``), not by the ASGI app alone.
    """

    name: str
    max_batch_size: int = 64
    batch_timeout_ms: float = 2.0
    batching: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

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
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            problems.append(
                f"--request-timeout-s must be a positive number of seconds, "
                f"got {self.request_timeout_s}."
            )
        if self.max_connections < 1:
            problems.append(f"--max-connections must be at least 1, got {self.max_connections}.")
        return problems


def create_app(model: Any, options: ServeOptions, *, connections: Any = None) -> Any:
    """The ASGI app serving ``model`` (a ``runtime.FusedModel``) under ``options.name``.

    Args:
        model: the loaded artifact.
        options: checked here.
        connections: the ``ConnectionStats`` of the connection guard, shown in ``/metrics``
            (``run`` passes them).

    Raises:
        ValueError: ``options`` fail their check.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    problems = options.check()
    if problems:
        raise ValueError(" ".join(problems))
    state = _State(model, options, connections)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(state.close)

    def respond(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        # TF Serving writes NaN and Infinity as JSON extensions; so does json.dumps.
        if not isinstance(payload, bytes):
            payload = json.dumps(payload, separators=(",", ":"))
        return Response(payload, status_code=status, media_type="application/json", headers=headers)

    async def models(request: Request) -> Response:
        try:
            return respond(await state.route(request))
        except BadRequest as error:
            state.errors += 1
            headers = {"connection": "close"} if error.close else None
            return respond({"error": str(error)}, error.status, headers)
        except Exception as error:  # the server's or the model's fault, not the client's
            state.errors += 1
            logger.exception("fuser serve failed on %s %s", request.method, request.url.path)
            message = f"The server failed on this request ({type(error).__name__}: {error})."
            return respond({"error": message}, 500)

    async def unrouted(request: Request, error: Any) -> Response:  # an HTTPException
        state.errors += 1
        where = f"{request.method} {request.url.path}"
        if error.status_code == 404:
            message = (
                f"No endpoint {where}; this server answers /v1/models/{options.name}, "
                "/healthz and /metrics."
            )
        elif error.status_code == 405:
            # Starlette lists the allowed methods in no fixed order.
            methods = (error.headers or {}).get("Allow", "GET").split(",")
            allowed = ", ".join(sorted(method.strip() for method in methods))
            message = f"No endpoint {where}; {request.url.path} answers {allowed} only."
        else:
            message = str(error.detail)
        return respond({"error": message}, error.status_code, error.headers)

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
        exception_handlers={HTTPException: unrouted},
        lifespan=lifespan,
    )


def build_server(
    model: Any,
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8501,
    log_level: str = "warning",
) -> Any:
    """A ``uvicorn.Server`` for ``model``, with the request deadline and connection cap of
    ``options`` (uvicorn's h11 protocol, guarded; see ``runtime._http_guard``).

    Raises:
        ValueError: ``options`` fail their check.
    """
    import uvicorn

    from runtime._http_guard import ConnectionStats, guarded_protocol

    stats = ConnectionStats()
    app = create_app(model, options, connections=stats)
    protocol = guarded_protocol(
        request_timeout_s=options.request_timeout_s,
        max_connections=options.max_connections,
        stats=stats,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",
        backlog=LISTEN_BACKLOG,
        log_level=log_level,
    )
    return uvicorn.Server(config)


def run(
    model: Any,
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8501,
    log_level: str = "warning",
) -> None:
    """Serve ``model`` until SIGINT or SIGTERM: what ``fuser serve`` runs.

    Raises the soft limit on open files if ``options.max_connections`` needs it, and sets
    the interpreter's GIL switch interval to ``GIL_SWITCH_INTERVAL_S``: both are settings of
    the whole process, which this function takes to be the server's own.

    Raises:
        ValueError: ``options`` fail their check, or the hard limit on open files is too
            low for ``options.max_connections``.
        OSError: the server could not start (for example, the port is taken).
    """
    problems = options.check()
    if problems:
        raise ValueError(" ".join(problems))
    ensure_descriptors(options.max_connections)
    server = build_server(model, options, host=host, port=port, log_level=log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # this process is the server
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises SIGINT once shut down
        server.run()
    if not server.started:
        raise OSError(f"fuser serve could not start on {host}:{port}; the log above says why.")


def ensure_descriptors(max_connections: int) -> None:
    """Make sure this process may open the file descriptors ``max_connections`` needs.

    Raises:
        ValueError: the hard limit (``ulimit -Hn``) is below what is needed.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    needed = max_connections + LISTEN_BACKLOG + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(
            f"--max-connections {max_connections} needs about {needed} open files, but this "
            f"process may open at most {hard} (ulimit -Hn); lower --max-connections to "
            f"{max(1, hard - LISTEN_BACKLOG - RESERVED_DESCRIPTORS)} or raise the limit."
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class _State:
    def __init__(self, model: Any, options: ServeOptions, connections: Any) -> None:
        self.model = model
        self.options = options
        self.connections = connections
        self.errors = 0
        self.requests = 0
        self.codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="fuser-json")
        self.batcher = (
            DynamicBatcher(
                lambda feeds: model.predict(feeds, as_dict=True),
                max_batch_size=options.max_batch_size,
                timeout=options.batch_timeout_ms / 1000,
            )
            if options.batching
            else None
        )

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.codec.shutdown()

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

    async def predict(self, request: Any) -> bytes:
        self.requests += 1
        body = await _read_body(request, self.options.max_body_bytes)
        loop = asyncio.get_running_loop()
        if len(body) <= INLINE_BODY_BYTES:
            columnar, feeds = parse_predict(body, self.model)
        else:
            columnar, feeds = await loop.run_in_executor(
                self.codec, parse_predict, body, self.model
            )
        del body  # a large body need not live while the model runs
        if self.batcher is not None:
            outputs = await asyncio.wrap_future(self.batcher.submit(feeds))
        else:
            outputs = await asyncio.to_thread(self.model.predict, feeds, as_dict=True)
        if sum(value.size for value in outputs.values()) <= INLINE_OUTPUT_VALUES:
            return format_outputs(outputs, self.model, columnar)
        return await loop.run_in_executor(self.codec, format_outputs, outputs, self.model, columnar)

    def metrics(self) -> str:
        lines = [
            "# TYPE fuser_predict_requests_total counter",
            f"fuser_predict_requests_total {self.requests}",
            "# TYPE fuser_request_errors_total counter",
            f"fuser_request_errors_total {self.errors}",
        ]
        if self.batcher is not None:
            stats = self.batcher.stats
            lines += [
                "# TYPE fuser_batched_requests_total counter",
                f"fuser_batched_requests_total {stats.requests}",
                "# TYPE fuser_batched_rows_total counter",
                f"fuser_batched_rows_total {stats.rows}",
                "# TYPE fuser_forward_passes_total counter",
                f"fuser_forward_passes_total {stats.forward_passes}",
                "# TYPE fuser_largest_batch_rows gauge",
                f"fuser_largest_batch_rows {stats.largest_batch}",
                "# TYPE fuser_requests_retried_alone_total counter",
                f"fuser_requests_retried_alone_total {stats.retried_alone}",
            ]
        if self.connections is not None:
            connections = self.connections
            lines += [
                "# TYPE fuser_open_connections gauge",
                f"fuser_open_connections {connections.open}",
                "# TYPE fuser_connections_timed_out_total counter",
                f"fuser_connections_timed_out_total {connections.timed_out}",
                "# TYPE fuser_connections_evicted_total counter",
                f"fuser_connections_evicted_total {connections.evicted}",
                "# TYPE fuser_connections_refused_total counter",
                f"fuser_connections_refused_total {connections.refused}",
                "# TYPE fuser_malformed_requests_total counter",
                f"fuser_malformed_requests_total {connections.malformed}",
            ]
        return "\n".join(lines) + "\n"


async def _read_body(request: Any, limit: int) -> bytes:
    """The body, if it has at most ``limit`` bytes.

    A body with a declared ``Content-Length`` over the limit is read to its end and dropped
    before the 400 (within the request deadline of ``run``), so that a client that sends
    its whole body before reading the answer gets the 400, not a reset connection. A body
    without a length (chunked) has no end to wait for: it is read up to the limit only,
    then answered, and its connection closed.
    """
    from starlette.requests import ClientDisconnect

    chunked = "transfer-encoding" in request.headers or "content-length" not in request.headers
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif chunked:
                raise BadRequest(
                    f"The request body has more than {limit} bytes; this server takes at "
                    f"most {limit}, and closes the connection.",
                    close=True,
                )
            else:
                chunks.clear()
    except ClientDisconnect:
        raise BadRequest("The client disconnected before sending the whole body.") from None
    if size > limit:
        raise BadRequest(f"The request body has {size} bytes; this server takes at most {limit}.")
    return b"".join(chunks)


def parse_predict(body: bytes, model: Any) -> tuple[bool, dict[str, np.ndarray]]:
    """``(columnar, checked feeds)`` from a TF Serving predict request body.

    Raises:
        BadRequest: an empty body, not UTF-8, malformed or too deeply nested JSON, neither
            or both of ``instances``/``inputs``, an unknown signature, missing or unknown
            inputs, wrong shapes or types, numbers beyond the range of float64 or of the
            input's float type.
    """
    from runtime.inputs import prepare_feeds

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
