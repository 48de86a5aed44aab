"""The fuser command: build, inspect, predict, exit statuses, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import member_mean

from fuser.cli import main


def run_cli(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fuser", *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_does_not_import_tensorflow():
    code = (
        "import sys\nfrom fuser.cli import main\n"
        "for argv in (['--help'], ['build', '--help'], ['predict', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('HEAVY', sorted(m for m in ('tensorflow', 'keras', 'onnxruntime') if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert "HEAVY []" in completed.stdout


def test_console_script_and_module_both_answer():
    completed = run_cli("--help")
    assert (
        completed.returncode == 0 and "build" in completed.stdout and "inspect" in completed.stdout
    )


def test_build_inspect_predict_end_to_end(members_dir, tmp_path, features, capsys):
    onnx_path, saved = tmp_path / "cli.onnx", tmp_path / "cli_savedmodel"
    status = main(
        [
            "build",
            f"first={members_dir / 'a.keras'}",
            str(members_dir / "b.h5"),
            str(members_dir / "c_export"),
            "-o",
            str(onnx_path),
            "-o",
            str(saved),
            "--quiet",
        ]
    )
    assert status == 0 and onnx_path.is_file() and (saved / "saved_model.pb").is_file()

    assert main(["inspect", str(onnx_path)]) == 0
    text = capsys.readouterr().out
    for expected in (
        "head       mean",
        "features: (None, 20) float32",
        "prediction: (None, 5) float32",
        "members    3",
        "first",
        "c_export",
        "verified   artifact: max abs error",
    ):
        assert expected in text
    assert main(["inspect", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["artifact"]["format"] == "savedmodel"

    np.save(tmp_path / "x.npy", features)
    assert (
        main(
            [
                "predict",
                str(onnx_path),
                "--input",
                str(tmp_path / "x.npy"),
                "--output",
                str(tmp_path / "y.npy"),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    expected = member_mean(
        [members_dir / "a.keras", members_dir / "b.h5", members_dir / "c_export"], features
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
    assert (
        main(
            [
                "predict",
                str(saved),
                "--input",
                str(tmp_path / "x.npy"),
                "--output",
                str(tmp_path / "y.npz"),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["prediction"], expected, atol=1e-5)


def test_predict_with_several_inputs_and_outputs_uses_npz(members_dir, tmp_path):
    artifact = tmp_path / "multi.onnx"
    assert (
        main(
            [
                "build",
                str(members_dir / "multi_a.keras"),
                str(members_dir / "multi_b.keras"),
                "-o",
                str(artifact),
                "-q",
            ]
        )
        == 0
    )
    np.savez(tmp_path / "x.npz", num=np.ones((2, 4), np.float32), cat=np.ones((2, 3), np.float32))
    assert (
        main(
            [
                "predict",
                str(artifact),
                "--input",
                str(tmp_path / "x.npz"),
                "--output",
                str(tmp_path / "y.npz"),
            ]
        )
        == 0
    )
    with np.load(tmp_path / "y.npz") as result:
        assert set(result.files) == {"score", "probs"} and result["probs"].shape == (2, 3)
    assert (
        main(
            [
                "predict",
                str(artifact),
                "--input",
                str(tmp_path / "x.npz"),
                "--output",
                str(tmp_path / "y.npy"),
            ]
        )
        == 2
    )


BAD_COMMANDS = [
    pytest.param(
        ["build", "{m}/missing.keras", "-o", "{t}/x.onnx"],
        r'Member "missing": .*missing\.keras does not exist',
        id="missing-member",
    ),
    pytest.param(
        ["build", "{m}/empty_dir", "-o", "{t}/x.onnx"], r"is an empty directory", id="empty-dir"
    ),
    pytest.param(
        ["build", "{m}/random.keras", "-o", "{t}/x.onnx"],
        r"is not a zip archive",
        id="random-bytes",
    ),
    pytest.param(
        ["build", "{m}/a.keras", "{m}/conv.keras", "-o", "{t}/x.onnx"],
        r"members must share one input shape",
        id="shape-mismatch",
    ),
    pytest.param(
        ["build", "{m}/a.keras", "-o", "{t}/x.h5"],
        r"has suffix \.h5; fuser writes \.onnx files",
        id="h5-output",
    ),
    pytest.param(
        ["build", "{m}/a.keras", "-o", "{t}/x.onnx", "--head", "nope"],
        r"Unknown head 'nope'",
        id="unknown-head",
    ),
    pytest.param(
        ["build", "{m}/a.keras", "-o", "{t}/x.onnx", "--opset", "5"],
        r"ONNX opset 5 is not supported",
        id="bad-opset",
    ),
    pytest.param(
        ["build", "{m}/a.keras", "{m}/c_export", "-o", "{t}/x.keras"],
        r"a \.keras artifact cannot hold whole",
        id="keras-with-savedmodel",
    ),
    pytest.param(
        ["build", "{m}/a.keras", "-o", "{t}/x.onnx", "--custom-objects", "nomodule"],
        r"--custom-objects expects MODULE:NAME",
        id="custom-objects",
    ),
    pytest.param(
        ["inspect", "{m}/notes.txt"],
        r"neither an \.onnx file, a \.keras file nor a SavedModel",
        id="inspect-non-artifact",
    ),
    pytest.param(
        ["predict", "{t}/none.onnx", "--input", "{t}/x.npy", "--output", "{t}/y.npy"],
        r"none\.onnx does not exist",
        id="predict-missing",
    ),
]


@pytest.mark.parametrize(("arguments", "pattern"), BAD_COMMANDS)
def test_bad_input_exits_2_with_one_sentence_and_no_traceback(
    members_dir, tmp_path, capsys, arguments, pattern
):
    import re

    argv = [argument.format(m=members_dir, t=tmp_path) for argument in arguments]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert re.search(pattern, error), error
    assert "Traceback" not in error
    assert not list(tmp_path.glob("x.*")), "no artifact may be written"


def test_existing_output_exits_2_and_debug_shows_the_traceback(members_dir, tmp_path):
    target = tmp_path / "taken.onnx"
    target.write_bytes(b"keep")
    completed = run_cli("build", members_dir / "a.keras", "-o", target)
    assert completed.returncode == 2
    assert (
        "already exists; pass --force" in completed.stderr and "Traceback" not in completed.stderr
    )
    assert target.read_bytes() == b"keep"
    completed = run_cli(
        "build", members_dir / "missing.keras", "-o", tmp_path / "y.onnx", "--debug"
    )
    assert completed.returncode == 2 and "Traceback" in completed.stderr


def test_build_reports_progress_and_loading_time(members_dir, tmp_path):
    completed = run_cli(
        "build",
        members_dir / "a.keras",
        members_dir / "b.h5",
        "-o",
        tmp_path / "p.onnx",
        "--jobs",
        "2",
    )
    assert completed.returncode == 0, completed.stderr
    assert (
        "Loaded 2 members in" in completed.stderr and "sum of the single loads" in completed.stderr
    )
    assert "Wrote" in completed.stderr and "p.onnx" in completed.stderr


def test_keras_output_for_savedmodel_members_is_refused_before_anything_loads(
    members_dir, tmp_path, monkeypatch
):
    import fuser.members

    def must_not_load(*args, **kwargs):
        raise AssertionError("members were loaded before the output format was checked")

    monkeypatch.setattr(fuser.members, "load_members", must_not_load)
    monkeypatch.setattr("fuser.ensemble.load_members", must_not_load)
    argv = ["build", str(members_dir / "a.keras"), str(members_dir / "d_tfsave")]
    assert main([*argv, "-o", str(tmp_path / "x.keras"), "-q"]) == 2
