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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from runtime.batching import DynamicBatcher
from runtime.tfserving_api import (
    VERSION,
    BadRequest,
    format_outputs,
    metadata,
    parse_predict,
    status,
)

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
# a small request needs; 1 ms shortens its tail latency then (docs/serving.md).
GIL_SWITCH_INTERVAL_S = 0.001
logger = logging.getLogger(__name__)


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
            return status()
        if request.method == "GET" and not verb and parts[1:] == ["metadata"]:
            return metadata(self.model, self.options.name)
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
