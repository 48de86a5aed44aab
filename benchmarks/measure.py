"""Timing and checking, in the benchmark process: latency, throughput, loading, correctness.

Every figure is a median over repeated calls after warm-up calls. Each measurement runs
until it has at least ``min_calls`` calls and has used its time budget (or reached
``max_calls``), so fast approaches get thousands of calls and slow ones a few; the
number of calls is recorded next to each figure.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Predict = Callable[[np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long one measurement may run, and how many calls it needs."""

    seconds: float
    min_calls: int
    max_calls: int
    warmup_calls: int
    warmup_seconds: float


def warm_up(predict: Predict, x: np.ndarray, budget: Budget) -> None:
    """Run ``budget.warmup_calls`` calls, or fewer (at least one) once the warm-up time is used."""
    started = time.perf_counter()
    for _ in range(budget.warmup_calls):
        predict(x)
        if time.perf_counter() - started >= budget.warmup_seconds:
            break


def timed_calls(predict: Predict, x: np.ndarray, budget: Budget) -> np.ndarray:
    """Seconds taken by each of repeated calls ``predict(x)``, after a warm-up."""
    warm_up(predict, x, budget)
    durations = []
    started = time.perf_counter()
    while len(durations) < budget.max_calls:
        call_started = time.perf_counter()
        predict(x)
        durations.append(time.perf_counter() - call_started)
        if len(durations) >= budget.min_calls and time.perf_counter() - started >= budget.seconds:
            break
    return np.asarray(durations)


def measure_latency(predict: Predict, x: np.ndarray, budget: Budget) -> dict[str, Any]:
    """Latency of one request of ``len(x)`` rows: median, 99th percentile and mean, in ms."""
    milliseconds = timed_calls(predict, x, budget) * 1000.0
    return {
        "latency_ms_p50": float(np.median(milliseconds)),
        "latency_ms_p99": float(np.percentile(milliseconds, 99)),
        "latency_ms_mean": float(milliseconds.mean()),
        "calls": len(milliseconds),
    }


def measure_throughput(predict: Predict, x: np.ndarray, budget: Budget) -> dict[str, Any]:
    """Rows per second answered in requests of ``len(x)`` rows (median over calls)."""
    seconds = timed_calls(predict, x, budget)
    return {
        "rows_per_second": float(len(x) / np.median(seconds)),
        "call_seconds_p50": float(np.median(seconds)),
        "calls": len(seconds),
    }


def measure_loading(member_paths: Sequence[Path], *, jobs: int, repeats: int) -> dict[str, Any]:
    """Wall time of ``fuser.members.load_members`` with ``jobs=1`` and with ``jobs``.

    The two are interleaved ``repeats`` times and the medians kept, so that a busy moment
    of the machine does not land on one side only. TensorFlow is imported beforehand.
    """
    from fuser.members import load_members, parse_specs

    specs = parse_specs(list(member_paths))
    load_members(specs[:1], jobs=1)  # first-use costs of Keras' deserialisation, untimed
    sequential, parallel, member_sums = [], [], []
    for _ in range(repeats):
        members, wall = load_members(specs, jobs=1)
        sequential.append(wall)
        member_sums.append(sum(member.load_seconds for member in members))
        _, wall = load_members(specs, jobs=jobs)
        parallel.append(wall)
    return {
        "load_seconds_sequential": float(np.median(sequential)),
        "load_seconds_parallel": float(np.median(parallel)),
        "load_seconds_per_member": float(np.median(member_sums)) / len(specs),
        "jobs": min(jobs, len(specs)),
        "repeats": repeats,
    }


def reference_mean(member_paths: Sequence[Path], x: np.ndarray) -> np.ndarray:
    """The ensemble's answer computed directly: each member run eagerly, averaged in float64."""
    import keras

    outputs = [
        np.asarray(keras.models.load_model(path, compile=False)(x, training=False), np.float64)
        for path in member_paths
    ]
    return np.mean(outputs, axis=0)


def max_abs_diff(got: Any, want: np.ndarray) -> float:
    """Largest absolute difference; infinite when the shapes differ."""
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got - want)))
