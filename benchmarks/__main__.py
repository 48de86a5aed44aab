"""``python -m benchmarks [--quick] [--out DIR]``: run the benchmarks, write results and plots.

Exit status: 0 when every approach agrees with the reference, 1 when one differs or fails
(the results are written either way), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,8,32, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.approaches import APPROACHES
    from benchmarks.members import FAMILIES

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Serve the same ensembles every way side by side; write results.json, "
        "RESULTS.md and plots.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small subset, about two minutes (default: full)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: benchmarks/results, or benchmarks/quick with --quick)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep member files and artifacts here and reuse them (default: a temporary directory)",
    )
    parser.add_argument(
        "--approaches",
        type=lambda text: text.split(","),
        help=f"comma-separated subset of: {', '.join(APPROACHES)}",
    )
    for family in FAMILIES:
        parser.add_argument(
            f"--{family}",
            type=_sizes,
            metavar="N,N,...",
            help=f"ensemble sizes of the {family} family (default: the mode's)",
        )
    parser.add_argument(
        "--families",
        type=lambda text: text.split(","),
        help=f"comma-separated subset of: {', '.join(FAMILIES)}",
    )
    arguments = parser.parse_args(argv)
    for option, allowed in (("approaches", APPROACHES), ("families", FAMILIES)):
        unknown = [name for name in getattr(arguments, option) or [] if name not in allowed]
        if unknown:
            parser.error(f"unknown {option} {unknown}; choose from: {', '.join(allowed)}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    from benchmarks import plots, report, suite
    from benchmarks.settings import FULL, QUICK

    settings = QUICK if arguments.quick else FULL
    counts = {
        family: getattr(arguments, family) or sizes
        for family, sizes in settings.member_counts.items()
        if family in (arguments.families or settings.member_counts)
    }
    settings = settings.with_member_counts(counts)
    out = arguments.out or HERE / ("quick" if arguments.quick else "results")
    results = suite.run(settings, approaches=arguments.approaches, workdir=arguments.workdir)
    figures = plots.write_plots(results, out)
    written = report.write(results, out, figures)
    suite.log(f"Wrote {', '.join(str(path) for path in [*written, *figures])}")
    suite.log(f"Took {results.duration_seconds:.0f} s.")
    if results.failures:
        suite.log("FAILED:\n" + "\n".join(f"- {failure}" for failure in results.failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
