"""The written results: ``results.json`` (every row) and ``RESULTS.md`` (the tables people read).

Ratios are always "how many times fused_onnx is better": an approach's latency (or cold
start time, or memory) divided by fused_onnx's, measured in the same run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.approaches import APPROACHES, BASELINES, STRONG_BASELINES
from benchmarks.machine import describe_onednn
from benchmarks.members import FAMILIES

if TYPE_CHECKING:
    from benchmarks.suite import Results

FUSED = "fused_onnx"
HEADLINE_SIZE = 8


def find(rows: Sequence[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    """The first row whose values match ``keys``, or None."""
    for row in rows:
        if all(row.get(key) == value for key, value in keys.items()):
            return row
    return None


def figure(rows: Sequence[dict[str, Any]], name: str, **keys: Any) -> float | None:
    """The value ``name`` of the matching row; None if absent, skipped or failed."""
    row = find(rows, **keys)
    if row is None or row.get("skipped") or row.get("error") or name not in row:
        return None
    return row[name]


def sizes(results: Results, family: str) -> list[int]:
    return list(results.settings["member_counts"].get(family, []))


def headline_size(results: Results, family: str) -> int | None:
    """N = 8 when measured, else the largest N measured for ``family``."""
    measured = sizes(results, family)
    if not measured:
        return None
    return HEADLINE_SIZE if HEADLINE_SIZE in measured else max(measured)


def approaches_in(results: Results) -> list[str]:
    """The approaches that have rows, in the declared order."""
    present = {row["approach"] for row in results.rows}
    return [name for name in APPROACHES if name in present]


def write(results: Results, out: Path, figures: Sequence[Path] = ()) -> list[Path]:
    """Write ``results.json`` and ``RESULTS.md`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    _write_atomically(json_path, json.dumps(results.to_json(), indent=1, default=_jsonable) + "\n")
    markdown_path = out / "RESULTS.md"
    _write_atomically(markdown_path, markdown(results, [path.name for path in figures]))
    return [json_path, markdown_path]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def markdown(results: Results, figure_names: Sequence[str] = ()) -> str:
    """The whole ``RESULTS.md``."""
    machine, settings = results.machine, results.settings
    command = "python -m benchmarks" + (" --quick" if settings["mode"] == "quick" else "")
    lines = [
        f"# Benchmark results ({settings['mode']} run)",
        "",
        f"Written by `{command}` on {machine['date']}; the run took "
        f"{results.duration_seconds / 60:.1f} minutes. Every figure below comes from this one "
        "run; `results.json` holds every row.",
    ]
    if settings["mode"] == "quick":
        lines += [
            "",
            "> A quick run: a few member sets and short time budgets. The numbers show that "
            "everything runs; the committed full run (`benchmarks/results/`) is the one to quote.",
        ]
    if results.failures:
        lines += ["", "**The run FAILED:**", ""]
        lines += [f"- {failure}" for failure in results.failures]
    lines += ["", *_machine_section(machine), "", *_method_section(results)]
    lines += ["", *_headline_section(results)]
    lines += ["", *_latency_section(results, figure_names)]
    lines += ["", *_throughput_section(results, figure_names)]
    lines += ["", *_cold_start_section(results, figure_names)]
    lines += ["", *_build_section(results, figure_names)]
    lines += ["", *_correctness_section(results)]
    lines += ["", *_notes_section(results)]
    return "\n".join(lines).rstrip() + "\n"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table; ``align`` gives 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if side == "r" else ":---" for side in align]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(rule) + " |",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def number(value: float | None, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits, or an em dash for a missing one."""
    if value is None:
        return "—"
    if value >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(value: float | None, base: float | None) -> str:
    """``value / base`` as "12.3×" (three significant digits, at least one decimal below 100)."""
    if value is None or not base:
        return "—"
    quotient = value / base
    return f"{quotient:,.0f}×" if quotient >= 100 else f"{quotient:.1f}×"


def _machine_section(machine: dict[str, Any]) -> list[str]:
    cores = f"{machine['cores_logical']} logical"
    if machine.get("cores_physical"):
        cores += f", {machine['cores_physical']} physical"
    load = ", ".join(str(value) for value in machine.get("load_average_at_start", []))
    versions = ", ".join(
        f"{package} {machine[package]}"
        for package in ("tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx", "numpy", "fuser")
        if machine.get(package)
    )
    rows = [
        ("CPU", machine["cpu_model"]),
        ("vector extensions", ", ".join(machine.get("cpu_vector_extensions") or []) or "?"),
        ("TensorFlow", describe_onednn(machine)),
        ("cores", cores),
        ("memory", f"{machine['memory_gb']} GB"),
        ("load average at start (1, 5, 15 min)", load),
        ("system", machine["os"]),
        ("Python", machine["python"]),
        ("packages", versions),
        ("GPU", "none used (CPU only)"),
    ]
    return ["## Machine", "", *table(["", ""], rows, "ll")]


def _method_section(results: Results) -> list[str]:
    from benchmarks.suite import METHOD

    settings = results.settings
    latency, throughput = settings["latency"], settings["throughput"]
    families = "; ".join(
        f"**{name}**: {FAMILIES[name].description}, N ∈ {{{', '.join(map(str, counts))}}}"
        for name, counts in settings["member_counts"].items()
    )
    budgets = (
        f"Budgets of this run: latency {latency['warmup_calls']} warm-up calls, then at least "
        f"{latency['min_calls']} calls and {latency['seconds']:g} s; throughput "
        f"{throughput['warmup_calls']} warm-up calls, then at least {throughput['min_calls']} "
        f"calls and {throughput['seconds']:g} s; a throughput call estimated over "
        f"{settings['max_call_seconds']:g} s is skipped; cold start "
        f"{settings['cold_start_repeats']}× per approach at N = {settings['cold_start_members']}; "
        f"loading {settings['load_repeats']}× per set."
    )
    approaches = [f"- `{name}`: {APPROACHES[name].description}" for name in approaches_in(results)]
    return [
        "## Method",
        "",
        f"Member families — {families}. Random seeded weights (no training needed to time "
        "serving), saved as `.keras`.",
        "",
        "Approaches:",
        "",
        *approaches,
        "",
        METHOD,
        "",
        budgets,
    ]


def _latency_ms(
    results: Results, approach: str, family: str, size: int, key: str = "latency_ms_p50"
) -> float | None:
    return figure(
        results.rows, key, approach=approach, family=family, n_members=size, measure="latency"
    )


def _headline_section(results: Results) -> list[str]:
    lines = ["## Headline: latency of one request of one row"]
    for family in results.settings["member_counts"]:
        size = headline_size(results, family)
        fused = _latency_ms(results, FUSED, family, size)
        rows = []
        for approach in approaches_in(results):
            p50 = _latency_ms(results, approach, family, size)
            p99 = _latency_ms(results, approach, family, size, "latency_ms_p99")
            calls = figure(
                results.rows,
                "calls",
                approach=approach,
                family=family,
                n_members=size,
                measure="latency",
            )
            difference = figure(
                results.rows,
                "max_abs_diff",
                approach=approach,
                family=family,
                n_members=size,
                measure="correctness",
            )
            rows.append(
                [
                    f"`{approach}`",
                    number(p50),
                    number(p99),
                    ratio(p50, fused) if approach != FUSED else "1.0× (itself)",
                    calls if calls is not None else _why_missing(results, approach, family, size),
                    f"{difference:.1e}" if difference is not None else "—",
                ]
            )
        lines += [
            "",
            f"### {family}, N = {size}, batch 1",
            "",
            *table(
                [
                    "approach",
                    "p50 ms",
                    "p99 ms",
                    "fused_onnx is faster by",
                    "calls",
                    "max abs diff",
                ],
                rows,
            ),
        ]
        lines += ["", *_claims(results, family, size, fused)]
    return lines


def _claims(results: Results, family: str, size: int, fused: float | None) -> list[str]:
    """Sentences stating the ratios against the strongest and against every baseline."""
    if fused is None:
        return ["fused_onnx was not measured on this set."]
    measured = {
        approach: value
        for approach in BASELINES
        if (value := _latency_ms(results, approach, family, size)) is not None
    }
    strong = {approach: measured[approach] for approach in STRONG_BASELINES if approach in measured}
    sentences = []
    if strong:
        best = min(strong, key=strong.get)
        sentences.append(
            f"Strongest baseline: `{best}` at {number(strong[best])} ms; fused_onnx answers in "
            f"{number(fused)} ms, **{ratio(strong[best], fused)} faster**."
        )
    if measured:
        against = ", ".join(f"`{name}` {ratio(value, fused)}" for name, value in measured.items())
        sentences.append(f"Against every baseline (p50 ratio): {against}.")
    stacked = _latency_ms(results, "fused_onnx_stacked", family, size)
    if strong and stacked is not None:
        sentences.append(
            f"With horizontal fusion (`fused_onnx_stacked`, `--fusion on`) the artifact "
            f"answers in {number(stacked)} ms, **{ratio(strong[best], stacked)} faster** than "
            f"`{best}`."
        )
    return [" ".join(sentences)] if sentences else []


def _why_missing(results: Results, approach: str, family: str, size: int) -> str:
    for row in results.rows:
        if row["approach"] == approach and row["family"] == family and row["n_members"] == size:
            if row.get("skipped"):
                return "skipped¹"
            if row.get("error"):
                return "failed"
    return "—"


def _image(figure_names: Sequence[str], name: str, caption: str) -> list[str]:
    return ["", f"![{caption}]({name})"] if name in figure_names else []


def _latency_section(results: Results, figure_names: Sequence[str]) -> list[str]:
    lines = ["## Latency at batch 1 against the number of members (p50, ms)"]
    for family in results.settings["member_counts"]:
        counts = sizes(results, family)
        rows = [
            [
                f"`{approach}`",
                *(number(_latency_ms(results, approach, family, size)) for size in counts),
            ]
            for approach in approaches_in(results)
        ]
        lines += [
            "",
            f"### {family}",
            "",
            *table(["approach", *(f"N={size}" for size in counts)], rows),
        ]
        lines += _image(
            figure_names, f"latency_{family}.png", f"latency at batch 1 against N, {family}"
        )
    return lines


def _throughput_section(results: Results, figure_names: Sequence[str]) -> list[str]:
    batches = results.settings["throughput_batches"]
    lines = ["## Throughput (rows per second)"]
    for family in results.settings["member_counts"]:
        size = headline_size(results, family)
        fused_rates = {
            batch: rows_per_second(results, FUSED, family, size, batch) for batch in [1, *batches]
        }
        rows = []
        for approach in approaches_in(results):
            cells = []
            for batch in [1, *batches]:
                rate = rows_per_second(results, approach, family, size, batch)
                cell = number(rate)
                if rate is not None and approach != FUSED and fused_rates[batch]:
                    cell += f" ({ratio(fused_rates[batch], rate)})"
                if rate is None:
                    cell = _throughput_gap(results, approach, family, size, batch)
                cells.append(cell)
            rows.append([f"`{approach}`", *cells])
        lines += [
            "",
            f"### {family}, N = {size}",
            "",
            "Batch 1 is 1000 / p50 latency. In parentheses: how many times more rows fused_onnx answers.",
            "",
            *table(["approach", *(f"batch {batch}" for batch in [1, *batches])], rows),
        ]
    lines += _image(figure_names, "throughput.png", "throughput against batch size")
    return lines


def rows_per_second(
    results: Results, approach: str, family: str, size: int, batch: int
) -> float | None:
    if batch == 1:
        p50 = _latency_ms(results, approach, family, size)
        return 1000.0 / p50 if p50 else None
    return figure(
        results.rows,
        "rows_per_second",
        approach=approach,
        family=family,
        n_members=size,
        measure="throughput",
        batch=batch,
    )


def _throughput_gap(results: Results, approach: str, family: str, size: int, batch: int) -> str:
    row = find(
        results.rows,
        approach=approach,
        family=family,
        n_members=size,
        measure="throughput",
        batch=batch,
    )
    if row is not None and row.get("skipped"):
        return "skipped¹"
    return _why_missing(results, approach, family, size) if row is None else "—"


def cold_start_rows(results: Results) -> list[dict[str, Any]]:
    return [row for row in results.rows if row["measure"] == "cold_start"]


def _cold_start_section(results: Results, figure_names: Sequence[str]) -> list[str]:
    lines = ["## Cold start: a fresh process, from its start to its first answer"]
    families = sorted({row["family"] for row in cold_start_rows(results)}, key=list(FAMILIES).index)
    if not families:
        return [*lines, "", "Not measured in this run."]
    for family in families:
        size = results.settings["cold_start_members"]
        keys = {"family": family, "n_members": size, "measure": "cold_start"}
        fused_seconds = figure(results.rows, "cold_start_seconds", approach=FUSED, **keys)
        fused_memory = figure(results.rows, "peak_rss_mb", approach=FUSED, **keys)
        rows = []
        for approach in approaches_in(results):
            row = find(results.rows, approach=approach, **keys)
            if row is None:
                continue
            if row.get("skipped") or row.get("error"):
                rows.append(
                    [
                        f"`{approach}`",
                        "skipped" if row.get("skipped") else "failed",
                        "—",
                        "—",
                        "—",
                        "—",
                        "—",
                    ]
                )
                continue
            rows.append(
                [
                    f"`{approach}`",
                    number(row["cold_start_seconds"]),
                    number(row["peak_rss_mb"]),
                    row["processes"],
                    "yes" if row["tensorflow_imported"] else "no",
                    ratio(row["cold_start_seconds"], fused_seconds),
                    ratio(row["peak_rss_mb"], fused_memory),
                ]
            )
        lines += [
            "",
            f"### {family}, N = {size}",
            "",
            *table(
                [
                    "approach",
                    "seconds",
                    "peak RSS MB",
                    "processes",
                    "imports TensorFlow",
                    "fused_onnx faster by",
                    "fused_onnx lighter by",
                ],
                rows,
            ),
        ]
        baseline_seconds = figure(
            results.rows, "cold_start_seconds", approach="per_member_tf_function", **keys
        )
        baseline_memory = figure(
            results.rows, "peak_rss_mb", approach="per_member_tf_function", **keys
        )
        if fused_seconds and baseline_seconds and baseline_memory:
            lines += [
                "",
                f"Against loading the members with TensorFlow (`per_member_tf_function`), the runtime "
                f"on the ONNX artifact starts **{ratio(baseline_seconds, fused_seconds)} faster** "
                f"and uses **{ratio(baseline_memory, fused_memory)} less memory**.",
            ]
    lines += _image(figure_names, "cold_start.png", "cold start time and peak memory per approach")
    return lines


def _build_section(results: Results, figure_names: Sequence[str]) -> list[str]:
    rows = []
    for row in results.rows:
        if row["measure"] != "build":
            continue
        sequential, parallel = row["load_seconds_sequential"], row["load_seconds_parallel"]
        rows.append(
            [
                row["family"],
                row["n_members"],
                number(sequential),
                f"{number(parallel)} ({row['jobs']})",
                ratio(sequential, parallel),
                number(row["build_seconds"]),
                number(row["onnx_export_seconds"]),
                number(row["build_and_onnx_export_seconds"]),
            ]
        )
    return [
        "## Building: loading members one by one and in parallel, and the whole build",
        "",
        "Seconds. Loading is `fuser.members.load_members` (threads); the build is `fuser.build` "
        "(load in parallel, validate, fuse, compile, verify) and the ONNX export is writing the "
        "verified `.onnx` artifact. TensorFlow's import (a few seconds, once per process) is not included.",
        "",
        *table(
            [
                "family",
                "N",
                "load, 1 job",
                "load, parallel (jobs)",
                "speed-up",
                "build",
                "ONNX export",
                "build + export",
            ],
            rows,
            "lrrrrrrr",
        ),
        *_image(figure_names, "loading.png", "loading members sequentially and in parallel"),
    ]


def _correctness_section(results: Results) -> list[str]:
    worst: dict[str, float] = {}
    for row in results.rows:
        if "max_abs_diff" in row:
            worst[row["approach"]] = max(worst.get(row["approach"], 0.0), row["max_abs_diff"])
    rows = [
        [f"`{approach}`", f"{worst[approach]:.1e}" if approach in worst else "—"]
        for approach in approaches_in(results)
    ]
    return [
        "## Correctness",
        "",
        f"Largest absolute difference from the reference over every set measured (the run fails "
        f"beyond {results.settings['tolerance']:g}).",
        "",
        *table(["approach", "max abs diff"], rows),
    ]


def _notes_section(results: Results) -> list[str]:
    notes: dict[str, list[str]] = {}
    for row in results.rows:
        if row.get("skipped"):
            where = f"{row['family']} N={row['n_members']}" + (
                f" batch {row['batch']}" if row["measure"] == "throughput" else ""
            )
            notes.setdefault(f"`{row['approach']}` {row['measure']}: {row['note']}", []).append(
                where
            )
    if not notes:
        return []
    lines = ["## Skipped", "", "¹ Skipped measurements, and why:", ""]
    lines += [f"- {note} ({'; '.join(places)})" for note, places in notes.items()]
    return lines
