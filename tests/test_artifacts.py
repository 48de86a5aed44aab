"""The artifact contract: what ONNX Runtime, TF Serving and Keras see, and atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import member_mean

import fuser
import runtime
from fuser import FuseError, VerificationError
from fuser.formats.placement import TEMPORARY_PREFIX


@pytest.fixture(scope="module")
def ensemble(members_dir):
    return fuser.build([members_dir / "a.keras", members_dir / "b.h5", members_dir / "c_export"])


def test_onnx_graph_inputs_are_only_the_named_ensemble_inputs(ensemble, tmp_path):
    import onnx

    path = ensemble.save(tmp_path / "contract.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    # The Normalization layers' mean and variance are frozen in, not leaked as inputs.
    assert [value.name for value in model.graph.input] == ["features"]
    assert [value.name for value in model.graph.output] == ["prediction"]
    for value in [*model.graph.input, *model.graph.output]:
        batch = value.type.tensor_type.shape.dim[0]
        assert batch.dim_param == "batch" and not batch.HasField("dim_value")
    manifest = json.loads(
        {entry.key: entry.value for entry in model.metadata_props}["fuser.manifest"]
    )
    assert manifest["artifact"] == {"format": "onnx", "opset": 17}
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 17


def test_onnx_opset_option_is_honoured(ensemble, tmp_path):
    import onnx

    path = ensemble.save(tmp_path / "opset15.onnx", opset=15)
    assert {entry.domain: entry.version for entry in onnx.load(str(path)).opset_import}[""] == 15
    with pytest.raises(FuseError, match=r"ONNX opset 99 is not supported; choose 13 to 18"):
        ensemble.save(tmp_path / "opset99.onnx", opset=99)


def test_savedmodel_has_named_serving_signature(ensemble, tmp_path, features, members_dir):
    import tensorflow as tf

    path = ensemble.save(tmp_path / "served")
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == ["features"]
    assert list(signature.structured_outputs) == ["prediction"]
    outputs = signature(features=tf.constant(features))
    paths = [members_dir / name for name in ("a.keras", "b.h5", "c_export")]
    np.testing.assert_allclose(
        outputs["prediction"].numpy(), member_mean(paths, features), atol=1e-5
    )
    assert (
        json.loads((path / "assets" / "fuser.json").read_text())["artifact"]["format"]
        == "savedmodel"
    )


@pytest.mark.slow
def test_saved_model_cli_runs_the_savedmodel_as_is(ensemble, tmp_path, features, members_dir):
    path = ensemble.save(tmp_path / "cli_served")
    np.save(tmp_path / "x.npy", features)
    cli = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable))
    assert cli is not None
    completed = subprocess.run(
        [
            cli,
            "run",
            "--dir",
            str(path),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"features={tmp_path / 'x.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    paths = [members_dir / name for name in ("a.keras", "b.h5", "c_export")]
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "prediction.npy"), member_mean(paths, features), atol=1e-5
    )


def test_keras_artifact_embeds_manifest_beside_config(members_dir, tmp_path):
    path = fuser.build([members_dir / "a.keras", members_dir / "b.h5"]).save(tmp_path / "e.keras")
    with zipfile.ZipFile(path) as archive:
        assert {"config.json", "fuser.json"} <= set(archive.namelist())


def test_keras_artifact_refuses_savedmodel_members_and_names_the_formats_that_can(
    ensemble, tmp_path
):
    with pytest.raises(
        FuseError,
        match=r'Member "c_export" \(c_export\) is a SavedModel, which a \.keras artifact cannot hold whole.*write an \.onnx file or a SavedModel directory',
    ):
        ensemble.save(tmp_path / "nope.keras")
    assert not (tmp_path / "nope.keras").exists()


def test_artifacts_do_not_refer_back_to_member_files(members_dir, tmp_path, features):
    copies = tmp_path / "members"
    shutil.copytree(members_dir, copies)
    built = fuser.build([copies / "a.keras", copies / "c_export"])
    paths = [built.save(tmp_path / "self.onnx"), built.save(tmp_path / "self_sm")]
    expected = member_mean([members_dir / "a.keras", members_dir / "c_export"], features)
    shutil.rmtree(copies)
    for path in paths:
        np.testing.assert_allclose(runtime.load(path).predict(features), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["exists.onnx", "exists.keras", "exists_dir"])
def test_force_replaces_only_an_artifact_of_the_same_kind(members_dir, tmp_path, name):
    """Without --force nothing is replaced; with it only a fuser artifact of the same kind.
    A user's file or folder at the path is refused either way, and kept as it was."""
    ensemble = fuser.build([members_dir / "a.keras", members_dir / "b.h5"])
    target = tmp_path / name
    if target.suffix:
        target.write_bytes(b"precious")
    else:
        target.mkdir()
        (target / "precious.txt").write_text("keep me")

    def intact() -> bool:
        if target.is_file():
            return target.read_bytes() == b"precious"
        return [entry.name for entry in target.iterdir()] == ["precious.txt"]

    with pytest.raises(
        FuseError, match=r"already exists; pass --force \(force=True\) to replace it"
    ):
        ensemble.save(target)
    assert intact()
    with pytest.raises(
        FuseError,
        match=rf"The output .*{name} exists and is not a fuser .* artifact; --force replaces "
        "only those, never other files or folders",
    ):
        ensemble.save(target, force=True)
    assert intact()

    other = tmp_path / f"artifact_{name}"
    ensemble.save(other)
    first = runtime.load(other).manifest["created"]
    fuser.build([members_dir / "b.h5"]).save(other, force=True)  # an artifact: replaced
    replaced = runtime.load(other)
    assert [member["name"] for member in replaced.manifest["members"]] == ["b"]
    assert first
    assert not list(tmp_path.glob(f"{TEMPORARY_PREFIX}*"))


def test_failed_verification_writes_nothing(members_dir, tmp_path, monkeypatch):
    from runtime.backends import OnnxBackend

    ensemble = fuser.build([members_dir / "a.keras"])
    original = OnnxBackend.run
    monkeypatch.setattr(
        OnnxBackend,
        "run",
        lambda self, feeds: {k: v + 0.5 for k, v in original(self, feeds).items()},
    )
    with pytest.raises(
        VerificationError,
        match=r"The onnx artifact .*bad\.onnx differs from its members by up to 0\.5",
    ):
        ensemble.save(tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_builds_are_removed(members_dir, tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale_file = tmp_path / f"{TEMPORARY_PREFIX}{dead_pid}-abcdef12-x.onnx"
    stale_dir = tmp_path / f"{TEMPORARY_PREFIX}{dead_pid}-0123abcd-y"
    live = tmp_path / f"{TEMPORARY_PREFIX}{os.getpid()}-abcdef12-z.onnx"
    # Names fuser never gives its temporaries: someone else's, kept whatever they hold.
    others = [
        tmp_path / f"{TEMPORARY_PREFIX}{dead_pid}-old-repo",
        tmp_path / f"{TEMPORARY_PREFIX}{dead_pid}-notes",
        tmp_path / f"{TEMPORARY_PREFIX}{dead_pid}-abcd-x.onnx",
    ]
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    live.write_bytes(b"in progress")
    for other in others:
        other.mkdir()
        (other / "thesis.txt").write_text("years of work")
    fuser.build([members_dir / "a.keras"]).save(tmp_path / "fresh.onnx")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists()  # a build still running is left alone
    for other in others:
        assert (other / "thesis.txt").read_text() == "years of work"


def test_verification_tolerance_option_is_checked(members_dir):
    with pytest.raises(FuseError, match=r"tolerance must be a positive number, got -1"):
        fuser.build([members_dir / "a.keras"], tolerance=-1)
