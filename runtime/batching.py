"""Dynamic batching: concurrent requests coalesced into one vectorized forward pass.

Callers ``submit`` already-checked feeds (``{input name: array}``, batch first) and get a
``concurrent.futures.Future`` of their own rows' outputs. One worker thread takes the
oldest waiting request, then keeps taking requests until the batch holds
``max_batch_size`` rows or ``timeout`` has passed since it took that first request, runs the model once on the concatenated rows and hands every caller its slice. This is
the scheme of TF Serving's batching (``max_batch_size``, ``batch_timeout_micros``) and
Triton's dynamic batcher (``max_queue_delay_microseconds``).

- **Shapes.** Only requests whose arrays can be joined share a pass: the same non-batch
  shape and dtype for every input. A model with a free non-batch dimension
  (variable-length sequences, ``(None, None, 4)``) thus batches requests of equal length
  together and never pads; requests of other shapes wait for a later pass, in arrival
  order.
- **Large requests.** A request of more than ``max_batch_size`` rows runs in parts of
  ``max_batch_size`` rows, and requests that arrive meanwhile take their turn between
  two parts (TF Serving's ``enable_large_batch_splitting``): one large request cannot
  hold the model for everyone else. Its caller gets all its rows at once, in order.
- **Failures.** If a coalesced pass fails, every request in it is run again on its own,
  so that each caller gets its own answer or its own error, never one caused by another
  caller's rows.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


@dataclass(eq=False)
class _Request:
    feeds: Feeds
    rows: int
    shapes: Hashable  # what must match for two requests to share a forward pass
    future: Future = field(default_factory=Future)
    # A request over max_batch_size: rows already split off, and the answered parts.
    parent: _Request | None = None
    split: int = 0
    answered: int = 0
    parts: list[Outputs] = field(default_factory=list)

    def next_part(self, rows: int) -> _Request:
        """The next ``rows`` rows (or fewer, the last ones) as a request of their own."""
        start, self.split = self.split, min(self.split + rows, self.rows)
        feeds = {name: value[start : self.split] for name, value in self.feeds.items()}
        return _Request(feeds, self.split - start, self.shapes, parent=self)


@dataclass
class BatchStats:
    """Counters for ``/metrics``: requests, rows and forward passes so far."""

    requests: int = 0
    rows: int = 0
    forward_passes: int = 0
    largest_batch: int = 0
    retried_alone: int = 0  # requests run again on their own after a coalesced pass failed


class DynamicBatcher:
    """Coalesce concurrent requests for ``run(feeds) -> outputs`` (thread-safe ``submit``)."""

    def __init__(
        self,
        run: Callable[[Feeds], Outputs],
        *,
        max_batch_size: int,
        timeout: float,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        if timeout < 0:
            raise ValueError(f"The batch timeout must be non-negative, got {timeout}.")
        self._run = run
        self.max_batch_size = max_batch_size
        self.timeout = timeout
        self.stats = BatchStats()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        # Taken from the queue, not yet run: other shapes, no room, the rest of a large one.
        self._waiting: collections.deque[_Request] = collections.deque()
        self._closing = False
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="fuser-batcher", daemon=True)
        self._worker.start()

    def submit(self, feeds: Feeds) -> Future:
        """Queue one request; the future resolves to its own rows of every output.

        Raises:
            RuntimeError: the batcher is closed.
        """
        if self._closed:
            raise RuntimeError("The batcher is closed; it takes no more requests.")
        rows = next(iter(feeds.values())).shape[0]
        shapes = tuple((name, value.shape[1:], value.dtype.str) for name, value in feeds.items())
        request = _Request(feeds, rows, shapes)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        """Finish the queued requests, then stop the worker."""
        self._closed = True
        self._queue.put(None)
        self._worker.join()

    def _serve(self) -> None:
        unfinished: _Request | None = None  # a large request that has just had its turn
        while True:
            # Requests that arrived meanwhile go ahead of the rest of a large request.
            self._take_arrivals(block=not self._waiting and not unfinished and not self._closing)
            if unfinished is not None:
                self._waiting.append(unfinished)
                unfinished = None
            if not self._waiting:
                return  # closing, and every request is answered
            first = self._waiting.popleft()
            if first.parent is None and first.rows > self.max_batch_size:
                if first.split == 0 and not first.future.set_running_or_notify_cancel():
                    continue  # cancelled before it started
                if first.future.done():
                    continue  # an earlier part failed
                part = first.next_part(self.max_batch_size)
                if first.split < first.rows:
                    unfinished = first
                first = part
            self._execute(self._gather(first))

    def _take_arrivals(self, *, block: bool) -> None:
        while True:
            try:
                request = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                return
            block = False
            if request is None:
                self._closing = True
            else:
                self._waiting.append(request)

    def _gather(self, first: _Request) -> list[_Request]:
        """``first`` and the requests that can join it: same shapes, within the row budget."""
        batch, rows = [first], first.rows
        kept: collections.deque[_Request] = collections.deque()
        while self._waiting:
            request = self._waiting.popleft()
            if request.shapes == first.shapes and rows + request.rows <= self.max_batch_size:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._waiting = kept
        deadline = time.monotonic() + self.timeout
        while rows < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                # Past the deadline (or when closing), still take what is already queued.
                if remaining > 0 and not self._closing:
                    request = self._queue.get(timeout=remaining)
                else:
                    request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:
                self._closing = True
            elif request.shapes != first.shapes or rows + request.rows > self.max_batch_size:
                self._waiting.append(request)
                if request.shapes == first.shapes:
                    break  # no room left for requests of this shape
            else:
                batch.append(request)
                rows += request.rows
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        batch = [
            request
            for request in batch
            if (request.parent is not None and not request.parent.future.done())
            or (request.parent is None and request.future.set_running_or_notify_cancel())
        ]
        if len(batch) == 1:
            self._run_alone(batch[0])
        elif batch:
            self._run_together(batch)

    def _run_alone(self, request: _Request) -> None:
        self._count_pass(request.rows)
        try:
            outputs = self._run(request.feeds)
        except BaseException as error:  # the caller learns of its own failure
            self._fail(request, error)
            return
        self._answer(request, outputs)

    def _run_together(self, batch: list[_Request]) -> None:
        rows = sum(request.rows for request in batch)
        self._count_pass(rows)
        try:
            joined = {
                name: np.concatenate([request.feeds[name] for request in batch])
                for name in batch[0].feeds
            }
            outputs = self._run(joined)
            # Slicing is only right if every output has one row per input row.
            if any(value.shape[:1] != (rows,) for value in outputs.values()):
                raise ValueError("The coalesced outputs do not have one row per input row.")
        except Exception:
            # Any one request may have broken the pass: each runs again on its own.
            self.stats.retried_alone += len(batch)
            for request in batch:
                self._run_alone(request)
            return
        except BaseException as error:
            for request in batch:
                self._fail(request, error)
            return
        start = 0
        for request in batch:
            end = start + request.rows
            self._answer(request, {name: value[start:end] for name, value in outputs.items()})
            start = end

    def _count_pass(self, rows: int) -> None:
        self.stats.forward_passes += 1
        self.stats.largest_batch = max(self.stats.largest_batch, rows)

    def _answer(self, request: _Request, outputs: Outputs) -> None:
        self.stats.rows += request.rows
        whole = request.parent
        if whole is None:
            self.stats.requests += 1
            request.future.set_result(outputs)
            return
        whole.parts.append(outputs)
        whole.answered += request.rows
        if whole.answered == whole.rows:
            self.stats.requests += 1
            whole.future.set_result(
                {name: np.concatenate([part[name] for part in whole.parts]) for name in outputs}
            )
            whole.parts = []

    def _fail(self, request: _Request, error: BaseException) -> None:
        whole = request.parent or request
        if not whole.future.done():
            whole.future.set_exception(error)
        whole.parts = []
