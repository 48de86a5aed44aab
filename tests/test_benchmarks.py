"""The benchmark suite: approaches agree, a mismatch fails the run, the report gets written.

No timing is asserted here (performance claims live in the benchmark results); these
tests check that the suite measures what it says and writes what it promises.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

# benchmarks/ is not an installed package; it runs from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import fusion, plots, report, suite
from benchmarks import serve as serve_benchmark
from benchmarks.__main__ import main
from benchmarks.approaches import APPROACHES
from benchmarks.measure import Budget
from benchmarks.settings import QUICK, Settings

TINY_BUDGET = Budget(seconds=0.01, min_calls=2, max_calls=5, warmup_calls=1, warmup_seconds=0.01)


def tiny_settings(**changes) -> Settings:
    settings = dataclasses.replace(
        QUICK,
        member_counts={"mlp": (2,)},
        latency=TINY_BUDGET,
        throughput=TINY_BUDGET,
        throughput_batches=(16, 64),
        max_call_seconds=60.0,
        cold_start_members=2,
        cold_start_families=("mlp",),
    )
    return dataclasses.replace(settings, **changes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("benchmarks")


@pytest.mark.slow
@pytest.mark.fusion
def test_every_approach_agrees_with_the_reference_and_fused_onnx_starts_without_tensorflow(
    workdir, tmp_path
):
    results = suite.run(tiny_settings(), workdir=workdir)

    assert results.failures == []
    runnable = [name for name, approach in APPROACHES.items() if not approach.skipped_reason]
    for name in runnable:
        correctness = report.find(results.rows, approach=name, measure="correctness")
        assert correctness["max_abs_diff"] <= 1e-4, name
        latency = report.find(results.rows, approach=name, measure="latency", batch=1)
        assert latency["latency_ms_p99"] >= latency["latency_ms_p50"] > 0, name
        for batch in (16, 64):
            throughput = report.find(results.rows, approach=name, measure="throughput", batch=batch)
            assert throughput["rows_per_second"] > 0, name
    fused_cold = report.find(results.rows, approach="fused_onnx", measure="cold_start")
    baseline_cold = report.find(results.rows, approach="seed_predict_loop", measure="cold_start")
    assert fused_cold["tensorflow_imported"] is False
    assert baseline_cold["tensorflow_imported"] is True
    assert fused_cold["peak_rss_mb"] > 0 and fused_cold["max_abs_diff"] <= 1e-4
    assert "fused_onnx_stacked" in runnable

    figures = plots.write_plots(results, tmp_path)
    written = report.write(results, tmp_path, figures)
    assert {path.name for path in figures} == {
        "latency_mlp.png",
        "throughput.png",
        "cold_start.png",
        "loading.png",
    }
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["cores_logical"] >= 1 and saved["machine"]["tensorflow"]
    assert {row["approach"] for row in saved["rows"]} >= set(APPROACHES)
    text = written[1].read_text()
    assert "### mlp, N = 2, batch 1" in text and "Strongest baseline" in text
    assert "![latency at batch 1 against N, mlp](latency_mlp.png)" in text


@pytest.mark.slow
def test_an_approach_that_disagrees_fails_the_run(workdir, monkeypatch):
    fused_onnx = APPROACHES["fused_onnx"]
    monkeypatch.setattr(fused_onnx, "predict", lambda self, x: self.model.predict(x) + 1e-3)

    results = suite.run(
        tiny_settings(cold_start_families=()), approaches=["fused_onnx"], workdir=workdir
    )

    assert len(results.failures) == 1
    assert results.failures[0].startswith("fused_onnx differs from the reference by 0.001")


def test_report_marks_missing_figures_and_states_ratios():
    rows = [
        {
            "approach": approach,
            "family": "mlp",
            "n_members": 8,
            "batch": 1,
            "measure": "latency",
            "latency_ms_p50": p50,
            "latency_ms_p99": 2 * p50,
            "calls": 100,
        }
        for approach, p50 in (("per_member_onnxruntime", 0.3), ("fused_onnx", 0.1))
    ]
    rows.append(
        {
            "approach": "fused_onnx_stacked",
            "family": "mlp",
            "n_members": 8,
            "batch": None,
            "measure": "all",
            "skipped": True,
            "note": "not available on this machine",
        }
    )
    settings = dataclasses.asdict(tiny_settings(member_counts={"mlp": (8,)}))
    results = suite.Results(
        machine={
            "date": "2026-01-01",
            "cpu_model": "test CPU",
            "cores_logical": 2,
            "memory_gb": 1.0,
            "os": "Linux",
            "python": "3.11",
        },
        settings=settings,
        rows=rows,
        failures=[],
    )

    text = report.markdown(results)

    assert "fused_onnx answers in 0.1 ms, **3.0× faster**" in text
    assert "| `fused_onnx_stacked` | — | — | — | skipped¹ | — |" in text
    assert "not available on this machine (mlp N=8)" in text


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--approaches", "fused_onnx,nope"], "unknown approaches ['nope']"),
        (["--families", "rnn"], "unknown families ['rnn']"),
        (["--mlp", "0,8"], "sizes must be positive integers"),
    ],
)
def test_bad_arguments_exit_with_status_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_inputs_are_the_same_for_every_call():
    from benchmarks.members import FAMILIES, random_inputs

    first = random_inputs(FAMILIES["cnn"], 4, seed=3)
    assert first.shape == (4, 32, 32, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, random_inputs(FAMILIES["cnn"], 4, seed=3))


@pytest.mark.slow
@pytest.mark.fusion
def test_fusion_benchmark_compares_stacked_plain_auto_and_one_member(tmp_path):
    results = fusion.run(
        tmp_path / "out",
        quick=True,
        workdir=tmp_path / "work",
        cases={"mlp": 3, "cnn": 2},
        batches={"mlp": (1, 8), "cnn": (1,)},
        budget=TINY_BUDGET,
    )

    mlp, cnn = results["families"]["mlp"], results["families"]["cnn"]
    # --fusion auto times both forms on this machine: either choice, with its figures.
    for family, size in ((mlp, 3), (cnn, 2)):
        assert family["auto_stacked_groups"] in ([size], [])
        assert "fused vs plain: batch 1: " in " ".join(family["auto_notes"])
    for family in (mlp, cnn):
        assert family["max_abs_difference_stacked_vs_plain"] <= 1e-5
        for row in family["rows"]:
            for label in (
                "one_member",
                "plain",
                "stacked",
                "auto",
                "one_member_1t",
                "stacked_1t",
                "tf_plain",
                "tf_stacked",
            ):
                assert row[f"{label}_ms"] > 0 and row[f"{label}_calls"] >= 2
            # Rounded to three decimals in the results.
            assert row["stacked_over_plain"] == pytest.approx(
                row["stacked_ms"] / row["plain_ms"], rel=1e-2, abs=6e-4
            )
    assert [row["batch"] for row in mlp["rows"]] == [1, 8]
    written = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert written["families"]["mlp"]["rows"] == mlp["rows"]
    markdown = (tmp_path / "out" / "FUSION.md").read_text()
    assert "## mlp, 3 members" in markdown and "## cnn, 2 members" in markdown
    assert "stacked / one member, 1 thread" in markdown
    assert "TensorFlow stacked / plain" in markdown
    onednn = written["machine"]["tensorflow_onednn"]
    assert onednn in (True, False)
    assert ("oneDNN on" if onednn else "oneDNN off") in markdown


@pytest.mark.slow
def test_serve_benchmark_drives_both_servers_and_reports_the_ratio(tmp_path):
    results = serve_benchmark.run(tmp_path / "out", tmp_path / "work", seconds=1.0, clients=4)

    batched, alone = results["rows"]
    assert batched["server"] == "dynamic batching" and alone["server"] == "no batching"
    for row in results["rows"]:
        assert row["requests"] > 0
        assert row["latency_ms_p99"] >= row["latency_ms_p50"] > 0
    assert batched["rows_per_forward_pass"] >= 1 and "rows_per_forward_pass" not in alone
    assert results["throughput_ratio"] == pytest.approx(
        batched["requests_per_second"] / alone["requests_per_second"], rel=1e-2
    )
    markdown = (tmp_path / "out" / "SERVE.md").read_text()
    assert "| dynamic batching" in markdown and "| no batching" in markdown


def test_real_members_report_names_the_outputs_and_the_rebuild_speedup():
    from benchmarks import real_members

    def run(seconds: float) -> dict:
        return {"seconds": seconds, "peak_rss_mb": 900, "worker_peak_rss_mb": 0, "steps": {}}

    machine = {
        "cpu_model": "Test CPU",
        "cores_logical": 2,
        "memory_gb": 8,
        "load_average_at_start": [0.0, 0.0, 0.0],
        "tensorflow_onednn": False,
    }
    row = {
        "label": "this version, ONNX",
        "architectures": ["A", "B"],
        "size": 32,
        "outputs": ["onnx"],
        "weights_mb": 10.0,
        "first": [run(60.0), run(62.0), run(58.0)],
        "rebuild_one_changed": [run(20.0), run(19.0), run(21.0)],
    }
    older = {**row, "label": "before"}
    del older["outputs"]  # rows measured before --outputs existed wrote ONNX + SavedModel
    text = real_members.report({"machine": machine, "rows": [older, row]})
    assert "| this version, ONNX, first build | ONNX | A, B at 32 px | 10 MB | 60 s" in text
    assert "20 s (19 to 21 s, 3 runs, 3.0x faster than the first build)" in text
    assert "| before, first build | ONNX + SavedModel |" in text
