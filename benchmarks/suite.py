"""One benchmark run, start to end: build the member sets, measure every approach, collect rows.

For each family and each ensemble size N, in this order: write the members, build the
fused and per-member artifacts (timing the build and the loading), compute the reference
answer, then for each approach set it up, check its answer against the reference, measure
its latency at batch 1 and its throughput at larger batches, and close it. Cold starts run
last for their member sets, in fresh processes, one approach after another and repeated
round-robin so that a busy moment of the machine is spread over all approaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import artifacts, cold_start, measure
from benchmarks.approaches import APPROACHES, Approach
from benchmarks.machine import describe_machine
from benchmarks.members import FAMILIES, MemberSet, random_inputs, write_members
from benchmarks.settings import Settings

METHOD = (
    "All approaches serve the same members on the same inputs, one after another in one "
    "process, on CPU. Latency: requests of one row, after warm-up calls, repeated until "
    "the time budget is used; p50 and p99 over those calls. Throughput: rows per second "
    "in requests of 256 and 4096 rows, the median over repeated calls after a warm-up call. "
    "Cold start: a fresh `python` process from its creation to its first answer (import, "
    "load, compile, one request of one row), and the peak resident memory of the process "
    "and all its descendants (polled every 10 ms; RSS, so pages shared between pool "
    "workers are counted once per worker), the median of repeated starts. Loading: the "
    "wall time of fuser's member loading with one job and with one job per core "
    "(TensorFlow already imported). Build: `fuser.build` plus writing the verified ONNX "
    "artifact, in a process where TensorFlow is already imported. Correctness: every "
    "approach's answer on a batch of 256 rows (and each cold start's first answer) is "
    "compared with the members run one by one in Keras and averaged in float64. "
    "ONNX Runtime sessions use default SessionOptions (intra-op threads: one per "
    "physical core) for the per-member and the fused artifacts alike."
)


@dataclasses.dataclass
class Results:
    """What a run produced: the rows, where they were measured, and what went wrong."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[dict[str, Any]]
    failures: list[str]
    duration_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "method": METHOD,
            "families": {name: family.description for name, family in FAMILIES.items()},
            "approaches": {name: approach.description for name, approach in APPROACHES.items()},
            "duration_seconds": round(self.duration_seconds, 1),
            "failures": self.failures,
            "rows": self.rows,
        }


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, stamped with minutes:seconds since the suite was imported."""
    minutes, seconds = divmod(int(time.perf_counter() - _STARTED), 60)
    print(f"{minutes:3d}:{seconds:02d} {message}", file=sys.stderr, flush=True)


def run(
    settings: Settings,
    *,
    approaches: Sequence[str] | None = None,
    workdir: Path | None = None,
) -> Results:
    """Run the benchmarks described by ``settings``; ``approaches`` limits which run.

    Member files and artifacts go to ``workdir`` (kept and reused) or to a temporary
    directory (removed at the end).
    """
    from fuser._tf import tensorflow

    started = time.perf_counter()
    selected = [APPROACHES[name] for name in approaches or APPROACHES]
    results = Results(
        machine=describe_machine(), settings=_describe(settings), rows=[], failures=[]
    )
    tensorflow()  # imported once, quietly, before anything is timed
    with _working_directory(workdir) as work:
        for family_name, sizes in settings.member_counts.items():
            family = FAMILIES[family_name]
            log(f"[{family_name}] writing {max(sizes)} members")
            member_paths = write_members(family, max(sizes), work / "members")
            check_inputs = random_inputs(family, settings.check_rows, settings.seed)
            large_inputs = random_inputs(
                family, max(settings.throughput_batches), settings.seed + 1
            )
            for size in sizes:
                member_set = _prepare_set(
                    family_name, member_paths[:size], work, settings, results.rows
                )
                reference = measure.reference_mean(member_set.member_paths, check_inputs)
                for approach_class in selected:
                    results.rows.extend(
                        _measure_approach(
                            approach_class,
                            member_set,
                            settings,
                            check_inputs,
                            large_inputs,
                            reference,
                            results.failures,
                        )
                    )
                if family_name in settings.cold_start_families and (
                    size == settings.cold_start_members
                ):
                    results.rows.extend(
                        _measure_cold_starts(
                            selected,
                            member_set,
                            settings,
                            check_inputs[:1],
                            reference[:1],
                            work,
                            results.failures,
                        )
                    )
                _release_memory()
    results.duration_seconds = time.perf_counter() - started
    return results


def _describe(settings: Settings) -> dict[str, Any]:
    described = dataclasses.asdict(settings)
    described["member_counts"] = {
        name: list(sizes) for name, sizes in settings.member_counts.items()
    }
    return described


@contextlib.contextmanager
def _working_directory(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="fuser-benchmarks-") as temporary:
        yield Path(temporary)


def _row(
    approach: str, member_set: MemberSet, measure_name: str, batch: int | None, **figures: Any
) -> dict[str, Any]:
    return {
        "approach": approach,
        "family": member_set.family,
        "n_members": member_set.size,
        "batch": batch,
        "measure": measure_name,
        **figures,
    }


def _prepare_set(
    family: str,
    member_paths: Sequence[Path],
    work: Path,
    settings: Settings,
    rows: list[dict[str, Any]],
) -> MemberSet:
    """Export the members alone, fuse them, time the build and the loading; add the build row."""
    size = len(member_paths)
    log(f"[{family} N={size}] building artifacts")
    member_onnx_paths = [
        artifacts.export_member_onnx(path, work / "member_onnx") for path in member_paths
    ]
    member_set, build_figures = artifacts.build_member_set(
        family, member_paths, member_onnx_paths, work / "sets" / f"{family}_{size:02d}"
    )
    loading = measure.measure_loading(
        member_paths, jobs=os.cpu_count() or 1, repeats=settings.load_repeats
    )
    rows.append(
        _row("fuser_build", member_set, "build", None, **loading, **_rounded(build_figures))
    )
    log(
        f"[{family} N={size}] build {build_figures['build_and_onnx_export_seconds']:.2f} s; "
        f"loading {loading['load_seconds_sequential']:.2f} s sequential, "
        f"{loading['load_seconds_parallel']:.2f} s with {loading['jobs']} jobs"
    )
    return member_set


def _measure_approach(
    approach_class: type[Approach],
    member_set: MemberSet,
    settings: Settings,
    check_inputs: np.ndarray,
    large_inputs: np.ndarray,
    reference: np.ndarray,
    failures: list[str],
) -> list[dict[str, Any]]:
    """Correctness, latency and throughput rows of one approach on one member set."""
    name = approach_class.name
    where = f"[{member_set.family} N={member_set.size}] {name}"
    if approach_class.skipped_reason:
        log(f"{where}: skipped ({approach_class.skipped_reason})")
        return [
            _row(name, member_set, "all", None, skipped=True, note=approach_class.skipped_reason)
        ]
    rows: list[dict[str, Any]] = []
    approach = approach_class(member_set)
    try:
        approach.setup()
        difference = measure.max_abs_diff(approach.predict(check_inputs), reference)
        rows.append(
            _row(name, member_set, "correctness", len(check_inputs), max_abs_diff=difference)
        )
        if not difference <= settings.tolerance:
            failures.append(
                f"{name} differs from the reference by {difference:.3g} on {member_set.family} "
                f"N={member_set.size} (tolerance {settings.tolerance:g})."
            )
        latency = measure.measure_latency(approach.predict, check_inputs[:1], settings.latency)
        rows.append(_row(name, member_set, "latency", 1, **latency))
        rate = None
        for batch in settings.throughput_batches:
            estimate = batch / rate if rate else None
            if estimate is not None and estimate > settings.max_call_seconds:
                note = (
                    f"one call would take about {estimate:.1f} s, over the {settings.mode} "
                    f"mode's {settings.max_call_seconds:g} s per call"
                )
                rows.append(_row(name, member_set, "throughput", batch, skipped=True, note=note))
                continue
            throughput = measure.measure_throughput(
                approach.predict, large_inputs[:batch], settings.throughput
            )
            rows.append(_row(name, member_set, "throughput", batch, **throughput))
            rate = throughput["rows_per_second"]
        log(
            f"{where}: p50 {latency['latency_ms_p50']:.3f} ms, p99 {latency['latency_ms_p99']:.3f} ms "
            f"({latency['calls']} calls); max abs diff {difference:.1e}"
        )
    except Exception as error:  # one broken approach must not lose the whole run
        message = f"{name} failed on {member_set.family} N={member_set.size}: {error!r}"
        log(f"{where}: FAILED\n{traceback.format_exc()}")
        failures.append(message)
        rows.append(_row(name, member_set, "all", None, error=repr(error)))
    finally:
        with contextlib.suppress(Exception):
            approach.close()
    return rows


def _measure_cold_starts(
    selected: Sequence[type[Approach]],
    member_set: MemberSet,
    settings: Settings,
    request: np.ndarray,
    reference: np.ndarray,
    work: Path,
    failures: list[str],
) -> list[dict[str, Any]]:
    """Cold-start rows: each approach started ``cold_start_repeats`` times, round-robin."""
    directory = work / "cold_start" / f"{member_set.family}_{member_set.size:02d}"
    directory.mkdir(parents=True, exist_ok=True)
    set_path = directory / "member_set.json"
    set_path.write_text(member_set.to_json())
    input_path = directory / "request.npy"
    np.save(input_path, request)
    runnable = [approach for approach in selected if not approach.skipped_reason]
    samples: dict[str, list[dict[str, Any]]] = {approach.name: [] for approach in runnable}
    errors: dict[str, str] = {}
    for repeat in range(settings.cold_start_repeats):
        for approach in runnable:
            if approach.name in errors:
                continue
            output_path = directory / f"{approach.name}_{repeat}.npy"
            try:
                sample = cold_start.measure_cold_start(
                    approach.name, set_path, input_path, output_path
                )
            except RuntimeError as error:
                errors[approach.name] = str(error)
                failures.append(f"cold start of {approach.name}: {error}")
                log(
                    f"[{member_set.family} N={member_set.size}] cold start {approach.name}: FAILED\n{error}"
                )
                continue
            sample["max_abs_diff"] = measure.max_abs_diff(np.load(output_path), reference)
            samples[approach.name].append(sample)
            log(
                f"[{member_set.family} N={member_set.size}] cold start {approach.name}: "
                f"{sample['cold_start_seconds']:.2f} s, {sample['peak_rss_mb']:.0f} MB"
            )
    rows = []
    for approach in selected:
        if approach.skipped_reason:
            rows.append(
                _row(
                    approach.name,
                    member_set,
                    "cold_start",
                    1,
                    skipped=True,
                    note=approach.skipped_reason,
                )
            )
        elif approach.name in errors:
            rows.append(
                _row(approach.name, member_set, "cold_start", 1, error=errors[approach.name])
            )
        else:
            rows.append(
                _cold_start_row(
                    approach.name, member_set, samples[approach.name], settings, failures
                )
            )
    return rows


def _cold_start_row(
    name: str,
    member_set: MemberSet,
    samples: list[dict[str, Any]],
    settings: Settings,
    failures: list[str],
) -> dict[str, Any]:
    difference = max(sample["max_abs_diff"] for sample in samples)
    if not difference <= settings.tolerance:
        failures.append(
            f"the cold-start answer of {name} differs from the reference by {difference:.3g}."
        )
    return _row(
        name,
        member_set,
        "cold_start",
        1,
        cold_start_seconds=float(np.median([sample["cold_start_seconds"] for sample in samples])),
        peak_rss_mb=float(np.median([sample["peak_rss_mb"] for sample in samples])),
        cold_start_seconds_all=[round(sample["cold_start_seconds"], 3) for sample in samples],
        processes=max(sample["processes"] for sample in samples),
        tensorflow_imported=any(sample["tensorflow_imported"] for sample in samples),
        onnxruntime_imported=any(sample["onnxruntime_imported"] for sample in samples),
        max_abs_diff=difference,
        repeats=len(samples),
    )


def _rounded(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        key: round(value, 4) if isinstance(value, float) else value
        for key, value in figures.items()
    }


def _release_memory() -> None:
    import keras

    keras.backend.clear_session()
    gc.collect()
