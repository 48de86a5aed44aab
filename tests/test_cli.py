"""The fuser command: build, inspect, predict, exit statuses, errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import CUSTOM_LAYER_MODULE, member_mean

import runtime
from fuser.cli import main


def run_cli(*arguments, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fuser", *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
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


def test_inspect_loads_no_build_code(members_dir, tmp_path):
    """``fuser inspect`` reads the manifest with the runtime alone: none of the build's
    modules, no TensorFlow, Keras or ONNX are imported."""
    artifact = tmp_path / "e.onnx"
    assert main(["build", str(members_dir / "a.keras"), "-o", str(artifact), "-q"]) == 0
    code = (
        "import sys\nfrom fuser.cli import main\n"
        f"assert main(['inspect', {str(artifact)!r}]) == 0\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fuser', 'tensorflow', 'keras', 'onnx', 'onnxruntime', 'tf2onnx')))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    loaded = completed.stdout.split("LOADED ", 1)[1].strip()
    expected = ["fuser", "fuser.cli", "fuser.cli.inspect", "fuser.cli.parser", "fuser.cli.status"]
    assert loaded == str([*expected, "fuser.errors", "fuser.sizes"])


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
        ["build", "{m}/a.keras", "-o", "{t}/x.onnx", "--custom-objects", "no_such_module:Thing"],
        r"--custom-objects 'no_such_module:Thing' could not be imported",
        id="custom-objects-not-importable",
    ),
    pytest.param(
        ["build", "{m}/overflow.keras", "-o", "{t}/x.onnx"],
        r'Member "overflow" \(overflow\.keras\) gives non-finite values on the probe batch: .* '
        r"pass --allow-nonfinite",
        id="nonfinite-member",
    ),
    pytest.param(
        ["build", "{m}/random.onnx", "-o", "{t}/x.onnx"],
        r"is named as an ONNX model, and fuser does not take those as members",
        id="onnx-member",
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
        "--no-cache",  # members loaded, not taken from records of earlier tests' builds
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
    import fuser.recall

    monkeypatch.setattr(fuser.recall, "load_members", must_not_load)
    argv = ["build", str(members_dir / "a.keras"), str(members_dir / "d_tfsave")]
    assert main([*argv, "-o", str(tmp_path / "x.keras"), "-q"]) == 2


def test_allow_nonfinite_builds_and_inspect_reports_it(members_dir, tmp_path, capsys):
    artifact = tmp_path / "nonfinite.onnx"
    argv = ["build", str(members_dir / "overflow.keras"), "-o", str(artifact)]
    assert main([*argv, "--allow-nonfinite"]) == 0
    assert re.search(
        r'Member "overflow" \(overflow\.keras\) gives \d+ NaN or inf values on the probe batch; '
        r"built anyway \(--allow-nonfinite\)\.",
        capsys.readouterr().err,
    )
    assert main(["inspect", str(artifact)]) == 0
    assert re.search(
        r"nonfinite  allowed \(--allow-nonfinite\); NaN or inf on the probe batch: overflow \d+",
        capsys.readouterr().out,
    )
    prediction = runtime.load(artifact).predict(np.zeros((2, 20), np.float32))
    np.testing.assert_array_equal(prediction, [[1, 1, 1, 0, 0]] * 2)  # exp(0) * [1, 1, 1, 0, 0]


def test_unregistered_custom_layer_exits_2_then_loads_with_custom_objects(
    unregistered_custom_layer, tmp_path, features, capsys, monkeypatch
):
    import keras

    path, code = unregistered_custom_layer
    artifact = tmp_path / "custom.onnx"
    assert main(["build", str(path), "-o", str(artifact), "-q"]) == 2
    error = capsys.readouterr().err
    assert (
        "it uses the custom Keras class 'fuser_tests>Scale' (module 'fuser_test_layers'), not "
        "registered in this process; import the module that defines it, or pass "
        "--custom-objects fuser_test_layers:Scale (custom_objects=) for classes you trust."
    ) in error
    assert "Traceback" not in error and not list(tmp_path.iterdir())

    monkeypatch.syspath_prepend(str(code))
    objects = f"{CUSTOM_LAYER_MODULE}:Scale"
    assert main(["build", str(path), "-o", str(artifact), "-q", "--custom-objects", objects]) == 0
    scale = sys.modules[CUSTOM_LAYER_MODULE].Scale
    member = keras.models.load_model(path, custom_objects={"fuser_tests>Scale": scale})
    np.testing.assert_allclose(
        runtime.load(artifact).predict(features), member(features), atol=1e-5
    )


def test_custom_objects_register_the_class_in_a_fresh_process(custom_layer_member, tmp_path):
    path, code = custom_layer_member
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])),
    }
    completed = run_cli(
        "build",
        path,
        "-o",
        tmp_path / "custom.keras",
        "-q",
        "--custom-objects",
        f"{CUSTOM_LAYER_MODULE}:Scale",
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "custom.keras").is_file()
