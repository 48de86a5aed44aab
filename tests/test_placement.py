"""Nothing a user owns is deleted or replaced: outputs, model repositories, predictions.

fuser replaces only what it wrote itself (an artifact of the same kind, with --force),
places every write with one rename that never replaces what appeared meanwhile, finds an
unwritable output before the build, and leaves nothing behind when a write fails.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli

import fuser
import runtime
from fuser import FuseError
from fuser.cli import main
from fuser.formats import placement
from fuser.packaging import export_tfserving, export_triton

FUSER = (sys.executable, "-m", "fuser")


@pytest.fixture(scope="module")
def ensemble(members_dir):
    return fuser.build([members_dir / "a.keras", members_dir / "b.h5"])


@pytest.fixture(scope="module")
def artifacts(ensemble, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("placement_artifacts")
    return {
        "onnx": ensemble.save(directory / "e.onnx"),
        "savedmodel": ensemble.save(directory / "e_savedmodel"),
    }


def _thesis(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.txt").write_text("years of work")
    return folder


def _untouched(folder: Path) -> bool:
    return [entry.name for entry in folder.iterdir()] == ["thesis.txt"] and (
        folder / "thesis.txt"
    ).read_text() == "years of work"


@pytest.mark.parametrize("output", ["mydata", "mydata.onnx", "mydata.keras"])
def test_force_never_replaces_a_users_folder(members_dir, tmp_path, capsys, output):
    folder = _thesis(tmp_path / output)
    status = main(["build", str(members_dir / "a.keras"), "-o", str(folder), "--force", "-q"])
    error = capsys.readouterr().err
    assert status == 2
    assert f"The output {folder} exists and is not a fuser" in error
    assert "remove or move it yourself" in error and "Traceback" not in error
    assert _untouched(folder)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [output]


def test_force_never_replaces_a_file_that_is_not_an_artifact(ensemble, tmp_path):
    notes = tmp_path / "notes.onnx"
    notes.write_bytes(b"an ONNX file someone else made")
    with pytest.raises(FuseError, match=r"notes\.onnx exists and is not a fuser ONNX artifact"):
        ensemble.save(notes, force=True)
    assert notes.read_bytes() == b"an ONNX file someone else made"


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "../outside", "", "x" * 256])
def test_model_names_stay_one_folder_inside_the_repository(artifacts, tmp_path, name):
    repository = _thesis(tmp_path / "repo")
    for export, artifact in (
        (export_triton, artifacts["onnx"]),
        (export_tfserving, artifacts["savedmodel"]),
    ):
        with pytest.raises(FuseError, match=r"must be one folder name inside the repository"):
            export(artifact, repository, name=name, force=True)
    assert _untouched(repository)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["repo"]


def test_triton_export_with_a_bad_name_loses_nothing_and_next_build_removes_nothing(
    members_dir, artifacts, tmp_path, capsys
):
    """The reported loss: --name . moved the repository aside, and a later build beside
    it removed that as a stale temporary."""
    repository = _thesis(tmp_path / "repo")
    status = main(["export", "triton", str(artifacts["onnx"]), str(repository), "--name", "."])
    assert status == 2 and "must be one folder name" in capsys.readouterr().err
    status = main(["build", str(members_dir / "a.keras"), "-o", str(tmp_path / "x.onnx"), "-q"])
    assert status == 0
    assert _untouched(repository)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["repo", "x.onnx"]


def test_force_replaces_a_previous_export_but_not_a_users_folder(artifacts, tmp_path):
    repository = tmp_path / "repo"
    target = export_triton(artifacts["onnx"], repository, name="digits")
    with pytest.raises(FuseError, match=r"already exists; pass --force"):
        export_triton(artifacts["onnx"], repository, name="digits")
    assert export_triton(artifacts["onnx"], repository, name="digits", force=True) == target
    assert runtime.load(target / "1" / "model.onnx").manifest
    users = _thesis(repository / "users_model")
    with pytest.raises(FuseError, match=r"users_model exists and is not a Triton model"):
        export_triton(artifacts["onnx"], repository, name="users_model", force=True)
    assert _untouched(users)

    version = export_tfserving(artifacts["savedmodel"], repository, name="sm", version=3)
    assert export_tfserving(artifacts["savedmodel"], repository, name="sm", version=3, force=True)
    _thesis(repository / "sm" / "4")
    with pytest.raises(FuseError, match=r"4 exists and is not a TF Serving model version"):
        export_tfserving(artifacts["savedmodel"], repository, name="sm", version=4, force=True)
    assert _untouched(repository / "sm" / "4")
    assert runtime.load(version).manifest


@pytest.mark.parametrize("version", [0, -1, 2**63, 10**30])
def test_tfserving_versions_are_positive_int64(artifacts, tmp_path, version):
    with pytest.raises(
        FuseError, match=r"--version must be an integer from 1 to 9223372036854775807"
    ):
        export_tfserving(artifacts["savedmodel"], tmp_path / "repo", name="m", version=version)
    assert not (tmp_path / "repo").exists()
    completed = run_cli(
        "export", "tfserving", artifacts["savedmodel"], tmp_path / "repo", "--version", version
    )
    assert completed.returncode == 2 and "--version must be an integer" in completed.stderr


def test_a_destination_that_appears_during_the_build_is_never_replaced(
    ensemble, tmp_path, monkeypatch
):
    """Two builds to one output without --force: the one that places second says why."""
    from fuser.formats import writer as write_lib

    target = tmp_path / "same.onnx"
    check_seal = write_lib._check_seal

    def another_build_finishes_first(kind, temporary, path):
        check_seal(kind, temporary, path)
        path.write_bytes(b"the other build's artifact")

    monkeypatch.setattr(write_lib, "_check_seal", another_build_finishes_first)
    with pytest.raises(
        placement.DestinationTaken,
        match=r"same\.onnx appeared while this build was writing it .* left as it is",
    ):
        ensemble.save(target)
    assert target.read_bytes() == b"the other build's artifact"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["same.onnx"]


@pytest.mark.slow
def test_two_builds_started_together_never_both_win(members_dir, tmp_path):
    target = tmp_path / "same.onnx"
    processes = [
        subprocess.Popen(
            [*FUSER, "build", members_dir / "a.keras", "-o", target, "--head", head, "-q"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for head in ("mean", "median")
    ]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    for process in processes:
        process.stderr.close()
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 2], results
    loser = next(error for status, error in results if status == 2)
    assert "appeared while this build was writing it" in loser
    winner = ("mean", "median")[[status for status, _ in results].index(0)]
    assert runtime.load(target).manifest["head"]["name"] == winner
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["same.onnx"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda root: root / "missing" / "x.onnx",
            r"The folder .*missing of output .* does not exist",
        ),
        (
            lambda root: (root / "file").write_text("") or root / "file" / "x.onnx",
            r"The folder .*file of output .* is not a folder",
        ),
    ],
    ids=["missing-parent", "parent-is-a-file"],
)
def test_an_unwritable_output_is_refused_before_any_member_loads(
    members_dir, tmp_path, monkeypatch, capsys, make, message
):
    import fuser.members
    import fuser.recall

    def never(*arguments, **options):
        raise AssertionError("members were loaded before the output was checked")

    monkeypatch.setattr(fuser.members, "load_members", never)
    monkeypatch.setattr(fuser.recall, "load_members", never)
    output = make(tmp_path)
    assert main(["build", str(members_dir / "a.keras"), "-o", str(output)]) == 2
    error = capsys.readouterr().err
    assert __import__("re").search(message, error), error
    assert not output.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_the_build(members_dir, tmp_path, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["build", str(members_dir / "a.keras"), "-o", str(folder / "x.onnx")]) == 2
    finally:
        folder.chmod(0o755)
    assert "is not writable by this user" in capsys.readouterr().err


def _limited_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_predict_onto_a_full_disk_leaves_nothing_behind(artifacts, tmp_path):
    x = np.random.default_rng(0).normal(size=(4000, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)  # 320 kB: over the limit below, as its answers are
    out = tmp_path / "out"
    out.mkdir()
    completed = subprocess.run(
        [
            *FUSER,
            "predict",
            artifacts["onnx"],
            "--input",
            tmp_path / "x.npy",
            "--output",
            out / "y.npy",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limited_file_size(20_000),
    )
    assert completed.returncode == 1, completed.stderr
    assert "fuser: error: Could not write" in completed.stderr
    assert "y.npy" in completed.stderr and "Traceback" not in completed.stderr
    assert list(out.iterdir()) == []


def test_predict_replaces_an_output_only_with_force(artifacts, tmp_path, capsys, features):
    np.save(tmp_path / "x.npy", features)
    output = tmp_path / "y.npy"
    output.write_bytes(b"yesterday's answers")
    arguments = ["predict", str(artifacts["onnx"]), "--input", str(tmp_path / "x.npy")]
    assert main([*arguments, "--output", str(output)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert output.read_bytes() == b"yesterday's answers"
    assert main([*arguments, "--output", str(output), "--force"]) == 0
    expected = runtime.load(artifacts["onnx"]).predict(features)
    np.testing.assert_array_equal(np.load(output), expected)
    folder = _thesis(tmp_path / "folder.npy")
    assert main([*arguments, "--output", str(folder), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err and _untouched(folder)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["folder.npy", "x.npy", "y.npy"]
