"""Connection limits for ``fuser serve`` that uvicorn does not have.

uvicorn's h11 protocol (read in uvicorn 0.54) times out only idle keep-alive connections,
once a response has been sent (``timeout_keep_alive``): a connection that never completes
its first request, or trickles its headers or its body, is kept open forever.
``limit_concurrency`` answers 503 only once a whole request has arrived and never closes a
connection, and ``h11_max_incomplete_event_size`` bounds the size of the headers, not the
time they take. So slow clients could hold every file descriptor. ``guarded_protocol``
returns uvicorn's h11 protocol with two more rules:

- **A deadline for each request.** From the moment a connection opens, or its previous
  response is sent, the client has ``request_timeout_s`` to deliver a complete request,
  headers and body. Otherwise it is answered 408 (if it had begun a request and no
  response has started) and disconnected. The time the model takes does not count.
- **A cap on connections.** A connection beyond ``max_connections`` makes room by closing
  the connection that has waited longest for its next request (an idle keep-alive client,
  or a slow one); if every connection has a request in progress, the newcomer is answered
  503 and closed. So an attacker holding slow connections only ever displaces other slow
  connections, and ``/healthz`` still gets through.
"""

from __future__ import annotations

import asyncio
import http
import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class ConnectionStats:
    """Counters for ``/metrics``, kept by the protocol and read by the app."""

    open: int = 0
    timed_out: int = 0
    evicted: int = 0
    refused: int = 0
    malformed: int = 0


def guarded_protocol(
    *, request_timeout_s: float, max_connections: int, stats: ConnectionStats
) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a request deadline and a connection cap (one server's)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # Connections waiting for a request, oldest first (dicts keep insertion order).
    waiting: dict[GuardedH11Protocol, float] = {}
    closing = 0  # connections this guard has closed whose loss uvicorn has not yet seen

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _closed_by_guard = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            stats.open += 1
            if len(self.connections) - closing > max_connections and not self._make_room():
                stats.refused += 1
                self._close(
                    503,
                    f"The server holds {max_connections} connections, its limit "
                    "(--max-connections), each with a request in progress; try again later.",
                )
                return
            self._wait_for_request()

        def connection_lost(self, exc: Exception | None) -> None:
            nonlocal closing
            self._stop_waiting()
            stats.open -= 1
            if self._closed_by_guard:
                closing -= 1
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            cycle = self.cycle
            if cycle is not None and not cycle.more_body and not cycle.response_complete:
                self._stop_waiting()  # the whole request is in; the model's time is not counted

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._wait_for_request()
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            stats.malformed += 1
            self._close(400, f"The request is not valid HTTP/1.1: {msg}")

        def _wait_for_request(self) -> None:
            self._stop_waiting()
            waiting[self] = time.monotonic()
            self._deadline = self.loop.call_later(request_timeout_s, self._on_deadline)

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _make_room(self) -> bool:
            """Close the connection waiting longest for a request; False if there is none."""
            oldest = next((other for other in waiting if other is not self), None)
            if oldest is None:
                return False
            stats.evicted += 1
            oldest._close()
            return True

        def _on_deadline(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            stats.timed_out += 1
            cycle, state = self.cycle, self.conn.their_state
            partial_head = state is h11.IDLE and bool(self.conn.trailing_data[0])
            partial_body = (
                state is h11.SEND_BODY and cycle is not None and not cycle.response_started
            )
            # A client still sending a body it was already answered for gets no second answer.
            if partial_head or partial_body:
                self._close(
                    408,
                    f"The request was not complete within {request_timeout_s:g} s "
                    "(--request-timeout-s); the connection is closed.",
                )
            else:
                self._close()

        def _close(self, status: int | None = None, message: str = "") -> None:
            """Answer ``status`` with ``{"error": message}`` if given, then close."""
            nonlocal closing
            self._stop_waiting()
            if self.transport.is_closing():
                return
            if status is not None:
                body = json.dumps({"error": message}).encode()
                head = (
                    f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n"
                )
                self.transport.write(head.encode() + body)
            self._closed_by_guard = True
            closing += 1
            self.transport.close()

    return GuardedH11Protocol
