"""PNG figures of a run (matplotlib, Agg backend): latency, throughput, cold start, loading."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import report

if TYPE_CHECKING:
    from benchmarks.suite import Results

# One look per approach across all figures: baselines dashed, fused solid.
STYLES = {
    "seed_predict_loop": {"color": "#9e9e9e", "linestyle": "--", "marker": "v"},
    "seed_multiprocessing": {"color": "#795548", "linestyle": "--", "marker": "^"},
    "per_member_tf_function": {"color": "#ff9800", "linestyle": "--", "marker": "s"},
    "per_member_onnxruntime": {"color": "#e91e63", "linestyle": "--", "marker": "D"},
    "fused_tf_function": {"color": "#2196f3", "linestyle": "-", "marker": "o"},
    "fused_xla": {"color": "#673ab7", "linestyle": "-", "marker": "P"},
    "fused_onnx": {"color": "#2e7d32", "linestyle": "-", "marker": "*", "markersize": 11},
    "fused_onnx_stacked": {"color": "#00bcd4", "linestyle": "-", "marker": "X"},
}


def write_plots(results: Results, out: Path) -> list[Path]:
    """Write every figure that has data into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (
        *(
            (f"latency_{family}.png", _latency(family))
            for family in results.settings["member_counts"]
        ),
        ("throughput.png", _throughput),
        ("cold_start.png", _cold_start),
        ("loading.png", _loading),
    ):
        figure = draw(results, plt)
        if figure is None:
            continue
        path = out / name
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _subplots(
    plt: Any, count: int, width: float = 6.0, height: float = 4.2
) -> tuple[Any, list[Any]]:
    figure, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return figure, list(axes[0])


def _log_axes(axis: Any, ticks: Sequence[int], *, base: int = 10) -> None:
    """Log-log axes with the measured x values as ticks and plain numbers on y.

    Call after plotting: when the data spans under two decades, the 2s and 5s between
    the powers of ten are labelled too, so that the axis is readable.
    """
    import math

    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_xscale("log", base=base)
    axis.set_yscale("log")
    axis.set_xticks(ticks, [str(tick) for tick in ticks])
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    low, high = axis.get_ylim()
    if math.log10(high / low) < 2:

        def label_twos_and_fives(value: float, _: Any) -> str:
            mantissa = round(value / 10 ** math.floor(math.log10(value)))
            return f"{value:g}" if mantissa in (2, 5) else ""

        axis.yaxis.set_minor_formatter(FuncFormatter(label_twos_and_fives))
    else:
        axis.yaxis.set_minor_formatter(NullFormatter())


def _finish(axis: Any, title: str, xlabel: str, ylabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)


def _latency(family: str) -> Any:
    def draw(results: Results, plt: Any) -> Any:
        sizes = report.sizes(results, family)
        figure, (axis,) = _subplots(plt, 1, 7.0, 4.8)
        for approach in report.approaches_in(results):
            points = [
                (size, value)
                for size in sizes
                if (
                    value := report.figure(
                        results.rows,
                        "latency_ms_p50",
                        approach=approach,
                        family=family,
                        n_members=size,
                        measure="latency",
                    )
                )
                is not None
            ]
            if points:
                axis.plot(*zip(*points), label=approach, **STYLES.get(approach, {}))
        _log_axes(axis, sizes, base=2)
        _finish(axis, f"{family}: latency of one row (p50)", "members N", "milliseconds")
        axis.legend(fontsize=8)
        return figure

    return draw


def _throughput(results: Results, plt: Any) -> Any:
    families = list(results.settings["member_counts"])
    batches = [1, *results.settings["throughput_batches"]]
    figure, axes = _subplots(plt, len(families))
    for axis, family in zip(axes, families):
        size = report.headline_size(results, family)
        for approach in report.approaches_in(results):
            points = [
                (batch, rate)
                for batch in batches
                if (rate := report.rows_per_second(results, approach, family, size, batch))
                is not None
            ]
            if points:
                axis.plot(*zip(*points), label=approach, **STYLES.get(approach, {}))
        _log_axes(axis, batches)
        _finish(axis, f"{family}, N = {size}: throughput", "batch size", "rows per second")
    axes[0].legend(fontsize=8)
    return figure


def _cold_start(results: Results, plt: Any) -> Any:
    rows = [
        row
        for row in report.cold_start_rows(results)
        if not row.get("skipped") and not row.get("error")
    ]
    if not rows:
        return None
    families = sorted({row["family"] for row in rows})
    approaches = [
        name
        for name in report.approaches_in(results)
        if any(row["approach"] == name for row in rows)
    ]
    figure, axes = _subplots(plt, 2, 6.5, 4.5)
    width = 0.8 / len(families)
    for axis, key, label in (
        (axes[0], "cold_start_seconds", "seconds to first answer"),
        (axes[1], "peak_rss_mb", "peak resident memory, MB"),
    ):
        for offset, family in enumerate(families):
            values = [
                report.figure(rows, key, approach=approach, family=family) or 0.0
                for approach in approaches
            ]
            positions = [index + offset * width for index in range(len(approaches))]
            bars = axis.bar(
                positions,
                values,
                width,
                label=family,
                color=[STYLES.get(approach, {}).get("color", "gray") for approach in approaches],
                alpha=1.0 if offset == 0 else 0.55,
                edgecolor="black",
                linewidth=0.4,
            )
            axis.bar_label(bars, [_short(value) for value in values], fontsize=7)
        axis.set_xticks(
            [index + width * (len(families) - 1) / 2 for index in range(len(approaches))],
            approaches,
            rotation=35,
            ha="right",
            fontsize=8,
        )
        size = results.settings["cold_start_members"]
        _finish(axis, f"cold start, N = {size} ({', '.join(families)})", "", label)
        axis.grid(False, axis="x")
    return figure


def _short(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def _loading(results: Results, plt: Any) -> Any:
    rows = [row for row in results.rows if row["measure"] == "build"]
    if not rows:
        return None
    families = list(dict.fromkeys(row["family"] for row in rows))
    figure, axes = _subplots(plt, len(families))
    for axis, family in zip(axes, families):
        family_rows: Sequence[dict[str, Any]] = sorted(
            (row for row in rows if row["family"] == family), key=lambda row: row["n_members"]
        )
        sizes = [row["n_members"] for row in family_rows]
        for key, label, style in (
            (
                "load_seconds_sequential",
                "load, 1 job",
                {"color": "#ff9800", "linestyle": "--", "marker": "s"},
            ),
            (
                "load_seconds_parallel",
                "load, one job per core",
                {"color": "#2e7d32", "marker": "o"},
            ),
            (
                "build_and_onnx_export_seconds",
                "whole build + ONNX export",
                {"color": "#2196f3", "marker": "^"},
            ),
        ):
            axis.plot(sizes, [row[key] for row in family_rows], label=label, **style)
        _log_axes(axis, sizes, base=2)
        _finish(axis, f"{family}: loading and building", "members N", "seconds")
        axis.legend(fontsize=8)
    return figure
