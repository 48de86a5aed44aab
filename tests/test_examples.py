"""The digits example runs end to end and shows a fused ensemble that agrees with its members."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import runtime

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.py"


def _run_quickly(example: Path, out: Path) -> str:
    """What ``example --quick`` prints, writing its files under ``out``."""
    finished = subprocess.run(
        [sys.executable, str(example), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return finished.stdout


def _accuracies(report: str) -> dict[str, str]:
    """The held-out accuracies a report lists, ``   name   0.9722``, by name."""
    return dict(re.findall(r"^   (\w+)\s+(0\.\d{4})$", report, flags=re.MULTILINE))


@pytest.mark.slow
def test_digits_example_builds_a_fused_ensemble_and_reports_its_gains(tmp_path):
    report = _run_quickly(EXAMPLE, tmp_path)
    accuracies = _accuracies(report)
    assert set(accuracies) == {"small", "wide", "deep", "conv", "normed", "ensemble"}
    assert float(accuracies["ensemble"]) > 0.85
    difference = float(re.search(r"max abs difference (\S+)", report).group(1))
    assert difference <= 1e-4
    for label in ("model.predict", "tf.function each", "fused ONNX artifact (runtime)"):
        assert re.search(rf"{re.escape(label)}\s+\d+\.\d+ ms", report), label
    assert re.search(r"starts [\d.]+x faster with [\d.]+x less memory", report)

    heads = dict(
        re.findall(
            r"^   (best single member|\w+ \([^)]*\)|greedy selection, 10 rounds)\s+(0\.\d{4})",
            report,
            flags=re.MULTILINE,
        )
    )
    assert set(heads) == {
        "best single member",
        "mean (soft voting)",
        "vote (hard majority)",
        "stack (fitted on validation)",
        "greedy selection, 10 rounds",
    }, heads
    best = float(heads["best single member"])
    assert float(heads["stack (fitted on validation)"]) >= max(
        best, float(heads["mean (soft voting)"])
    )
    assert float(heads["greedy selection, 10 rounds"]) >= best
    assert re.search(r"hold \d+ of the ensemble's \d+ mistakes", report)

    served = runtime.load(tmp_path / "digits.onnx")
    assert [member["name"] for member in served.manifest["members"]] == [
        "small",
        "wide",
        "deep",
        "conv",
        "normed",
    ]
    assert {member["format"] for member in served.manifest["members"]} >= {"keras", "h5"}
    assert runtime.load(tmp_path / "digits_savedmodel").format == "savedmodel"


CASCADE_EXAMPLE = EXAMPLE.with_name("cascade.py")


@pytest.mark.slow
def test_cascade_example_prints_the_accuracy_cost_curve_and_plots_it(tmp_path):
    report = _run_quickly(CASCADE_EXAMPLE, tmp_path)
    accuracies = _accuracies(report)
    assert set(accuracies) == {"small", "wide", "deep", "conv", "full", "cascade"}
    assert float(accuracies["cascade"]) > float(accuracies["small"]) - 0.02
    assert re.search(r"^   stage 1: small ", report, flags=re.MULTILINE)
    assert re.search(r"expected cost per row [\d.]+ us against [\d.]+ us", report)
    assert re.search(r"test digits leave the cascade at stage 1 [\d.]+%", report)
    curve = re.findall(r"^\s+([\d.]+)\s+(0\.\d{4})\s+([\d.]+)%", report, flags=re.MULTILINE)
    assert len(curve) == 7, report
    assert all(float(cost) < 100 for _, _, cost in curve)  # cheaper than the full ensemble
    assert (tmp_path / "cascade" / "cascade_curve.png").stat().st_size > 10_000
    served = runtime.load(tmp_path / "cascade" / "cascade.onnx")
    assert served.manifest["head"]["name"] == "cascade"
    assert [spec.name for spec in served.outputs] == ["prediction", "exit_stage"]
