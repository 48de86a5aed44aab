"""Dynamic batching: concurrent requests coalesced into one vectorized forward pass.

Callers ``submit`` already-checked feeds (``{input name: array}``, batch first) and get a
``concurrent.futures.Future`` of their own rows' outputs. One worker thread takes the
first waiting request, then keeps taking requests until the batch holds
``max_batch_size`` rows or ``timeout`` has passed since that first request, runs the
model once on the concatenated rows and hands every caller its slice. A request larger
than ``max_batch_size`` runs on its own (the model splits it). This is the scheme of TF
Serving's batching (``max_batch_size``, ``batch_timeout_micros``) and Triton's dynamic
batcher (``max_queue_delay_microseconds``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


@dataclass
class _Request:
    feeds: Feeds
    rows: int
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters for ``/metrics``: requests, rows and forward passes so far."""

    requests: int = 0
    rows: int = 0
    forward_passes: int = 0
    largest_batch: int = 0


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
        self._held: _Request | None = None  # taken from the queue but not fitting the batch
        self._worker = threading.Thread(target=self._serve, name="fuser-batcher", daemon=True)
        self._worker.start()

    def submit(self, feeds: Feeds) -> Future:
        """Queue one request; the future resolves to its own rows of every output."""
        rows = next(iter(feeds.values())).shape[0]
        request = _Request(feeds, rows)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        """Finish the queued requests, then stop the worker."""
        self._queue.put(None)
        self._worker.join()

    def _serve(self) -> None:
        while True:
            first = self._held or self._queue.get()
            self._held = None
            if first is None:
                return
            batch = [first]
            rows = first.rows
            deadline = time.monotonic() + self.timeout
            stop = False
            while rows < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    # Past the deadline, still take what is already waiting.
                    if remaining > 0:
                        request = self._queue.get(timeout=remaining)
                    else:
                        request = self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                if rows + request.rows > self.max_batch_size:
                    self._held = request
                    break
                batch.append(request)
                rows += request.rows
            self._execute(batch, rows)
            if stop:
                self._drain()
                return

    def _drain(self) -> None:
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                self._execute([request], request.rows)

    def _execute(self, batch: list[_Request], rows: int) -> None:
        batch = [request for request in batch if request.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            if len(batch) == 1:
                outputs = self._run(batch[0].feeds)
            else:
                names = list(batch[0].feeds)
                joined = {name: np.concatenate([r.feeds[name] for r in batch]) for name in names}
                outputs = self._run(joined)
        except BaseException as error:  # every waiting caller learns of the failure
            for request in batch:
                request.future.set_exception(error)
            return
        self.stats.requests += len(batch)
        self.stats.rows += rows
        self.stats.forward_passes += 1
        self.stats.largest_batch = max(self.stats.largest_batch, rows)
        start = 0
        for request in batch:
            end = start + request.rows
            request.future.set_result({name: value[start:end] for name, value in outputs.items()})
            start = end
