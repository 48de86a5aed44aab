"""Round trips: build -> save -> runtime.load -> compare with the members run one by one."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import N_CLASSES, member_mean, reference_outputs

import fuser
import runtime

MIXED = ["a.keras", "b.h5", "c_export", "d_tfsave"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def mixed_ensemble(members_dir):
    return fuser.build([members_dir / name for name in MIXED])


@pytest.mark.parametrize("artifact", ["ensemble.onnx", "ensemble_savedmodel"])
def test_mixed_formats_artifact_matches_members_mean(
    mixed_ensemble, members_dir, tmp_path, features, artifact
):
    path = mixed_ensemble.save(tmp_path / artifact)
    model = runtime.load(path)
    paths = [members_dir / name for name in MIXED]
    for rows in (features, features[:1], np.tile(features, (20, 1))):
        np.testing.assert_allclose(model.predict(rows), member_mean(paths, rows), atol=TOLERANCE)
    assert model.outputs[0].name == "prediction"
    assert model.outputs[0].shape == (None, N_CLASSES)


def test_keras_artifact_matches_members_mean(members_dir, tmp_path, features):
    paths = [members_dir / "a.keras", members_dir / "b.h5", members_dir / "e.keras"]
    path = fuser.build(paths).save(tmp_path / "ensemble.keras")
    model = runtime.load(path)
    np.testing.assert_allclose(
        model.predict(features), member_mean(paths, features), atol=TOLERANCE
    )
    np.testing.assert_allclose(
        model.predict(features[:3]), member_mean(paths, features[:3]), atol=TOLERANCE
    )


@pytest.mark.parametrize("member", ["a.keras", "b.h5", "c_export", "d_tfsave"])
def test_each_member_format_alone_round_trips_through_onnx(members_dir, tmp_path, features, member):
    path = fuser.build([members_dir / member]).save(tmp_path / "single.onnx")
    np.testing.assert_allclose(
        runtime.load(path).predict(features),
        member_mean([members_dir / member], features),
        atol=TOLERANCE,
    )


def test_ensemble_predict_matches_members_mean(mixed_ensemble, members_dir, features):
    expected = member_mean([members_dir / name for name in MIXED], features)
    np.testing.assert_allclose(mixed_ensemble.predict(features), expected, atol=TOLERANCE)


def test_xla_build_matches_members_mean(members_dir, tmp_path, features):
    paths = [members_dir / "a.keras", members_dir / "b.h5"]
    ensemble = fuser.build(paths, xla=True)
    assert ensemble.manifest["fusion"]["xla"] is True
    np.testing.assert_allclose(
        ensemble.predict(features), member_mean(paths, features), atol=TOLERANCE
    )
    model = runtime.load(ensemble.save(tmp_path / "xla_savedmodel"))
    np.testing.assert_allclose(
        model.predict(features), member_mean(paths, features), atol=TOLERANCE
    )


@pytest.mark.parametrize("artifact", ["multi.onnx", "multi_savedmodel", "multi.keras"])
def test_several_inputs_and_outputs_are_matched_by_name(members_dir, tmp_path, artifact):
    # multi_b declares its inputs in the other order (cat, num): matched by name, not position.
    names = ["multi_a.keras", "multi_b.keras"] + (
        [] if artifact.endswith(".keras") else ["multi_c_export"]
    )
    paths = [members_dir / name for name in names]
    rng = np.random.default_rng(3)
    batch = {
        "num": rng.normal(size=(6, 4)).astype("float32"),
        "cat": rng.normal(size=(6, 3)).astype("float32"),
    }

    model = runtime.load(fuser.build(paths).save(tmp_path / artifact))

    assert [spec.name for spec in model.inputs] == ["num", "cat"]
    assert [spec.name for spec in model.outputs] == ["score", "probs"]
    result = model.predict(batch)
    per_member = reference_outputs(paths, batch)
    # Keras members give [score, probs]; SavedModel members output_0, output_1 in the same order.
    for slot, name in enumerate(["score", "probs"]):
        expected = np.mean([outputs[slot] for outputs in per_member], axis=0)
        np.testing.assert_allclose(result[name], expected, atol=TOLERANCE)
    in_order = model.predict([batch["num"], batch["cat"]])
    np.testing.assert_array_equal(in_order["probs"], result["probs"])


def test_input_name_comes_from_first_member_or_option(members_dir, tmp_path):
    # d_tfsave names its input "inputs"; e.keras "other_name".
    first = fuser.build([members_dir / "d_tfsave", members_dir / "a.keras"])
    assert [spec.name for spec in first.inputs] == ["inputs"]
    renamed = fuser.build([members_dir / "e.keras", members_dir / "a.keras"], input_name="pixels")
    model = runtime.load(renamed.save(tmp_path / "renamed.onnx"))
    assert [spec.name for spec in model.inputs] == ["pixels"]


def test_in_memory_members_are_not_modified(features):
    from conftest import mlp

    first, second = mlp(21), mlp(22)
    names_before = (first.name, second.name)
    weights_before = [w.copy() for w in first.get_weights()]
    ensemble = fuser.build([("first", first), ("second", second)])
    assert (first.name, second.name) == names_before
    for before, after in zip(weights_before, first.get_weights()):
        np.testing.assert_array_equal(before, after)
    expected = (np.asarray(first(features)) + np.asarray(second(features))) / 2
    np.testing.assert_allclose(ensemble.predict(features), expected, atol=TOLERANCE)
    assert set(ensemble.named_members) == {"first", "second"}


def test_parallel_and_sequential_loading_give_the_same_ensemble(members_dir, features):
    paths = [members_dir / name for name in MIXED]
    sequential = fuser.build(paths, jobs=1)
    parallel = fuser.build(paths, jobs=4)
    np.testing.assert_allclose(sequential.predict(features), parallel.predict(features), atol=1e-7)
    assert [member.name for member in parallel.members] == ["a", "b", "c_export", "d_tfsave"]


def test_manifest_records_members_head_and_verification(mixed_ensemble, tmp_path):
    model = runtime.load(mixed_ensemble.save(tmp_path / "manifest.onnx"))
    manifest = model.manifest
    assert [member["name"] for member in manifest["members"]] == ["a", "b", "c_export", "d_tfsave"]
    assert [member["format"] for member in manifest["members"]] == [
        "keras",
        "h5",
        "savedmodel",
        "savedmodel",
    ]
    assert all(len(member["sha256"]) == 64 for member in manifest["members"])
    assert all(member["parameters"] > 0 for member in manifest["members"])
    assert manifest["head"] == {"name": "mean", "params": {}}
    assert manifest["artifact"]["format"] == "onnx"
    for stage in ("fused_model", "artifact"):
        record = manifest["verification"][stage]
        assert record["probe_batch"] == 8
        assert 0 <= record["max_abs_error"] < 1e-4
    assert manifest["versions"]["tensorflow"]
