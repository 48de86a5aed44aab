"""Rebuilds from member records: unchanged members are neither loaded nor run again.

A build keeps a record of every member file it loaded (``fuser.members.records``); the next
build takes unchanged members from their records and loads them only when something needs
them. Every artifact must still answer like the members run one by one, and a record must
never let a member past a check it would fail when loaded (safe mode), nor stand for a
member whose file changed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import N_FEATURES, member_mean, mlp, save_keras, wide

import fuser
import runtime
from fuser.conversion import workers
from fuser.errors import FuseError
from fuser.members import sha256_of
from runtime.describe import describe


def _recorded(ensemble) -> list[str]:
    return [member.name for member in ensemble.members if member.model is None]


def _three(tmp_path):
    return save_keras(tmp_path, [("a", wide(1, width=8)), ("b", wide(2, width=12)), ("c", mlp(3))])


def test_a_rebuild_loads_only_the_changed_member_and_answers_like_the_members(
    tmp_path, cache, features
):
    paths = _three(tmp_path)
    first = fuser.build(paths)
    assert _recorded(first) == [] and first.assembled
    first.save(tmp_path / "first.onnx")  # its units are cached
    wide(7, width=12).save(paths[1])  # b retrained
    again = fuser.build(paths)
    assert _recorded(again) == ["a", "c"]
    assert not again.assembled  # nothing has needed the Keras model yet
    artifact = again.save(tmp_path / "e.onnx")
    conversion = runtime.load(artifact).manifest["build"]["onnx_conversion"]
    converted = {unit["members"][0]: unit["converted"] for unit in conversion["units"]}
    assert converted["a"] == converted["c"] == "cache"
    assert converted["b"] != "cache"
    np.testing.assert_allclose(
        runtime.load(artifact).predict(features), member_mean(paths, features), atol=1e-5
    )
    manifest = runtime.load(artifact).manifest
    assert manifest["build"]["members_from_records"] == ["a", "c"]
    assert "2 from their records (a, c)" in describe(manifest, str(artifact))
    assert "fused_model" not in manifest["verification"]  # only the artifact was checked
    assert manifest["verification"]["artifact"]["max_abs_error"] < 1e-4
    assert [member["sha256"] for member in manifest["members"]] == [
        sha256_of(path) for path in paths
    ]


def test_the_one_changed_member_is_converted_here_not_in_a_worker(
    tmp_path, cache, features, monkeypatch
):
    # Every member "large": the first build converts them in workers; the rebuild holds
    # only the changed member, and converts it in its own process (no second load).
    monkeypatch.setattr(workers, "WORKER_MIN_BYTES", 0)
    paths = _three(tmp_path)
    first = fuser.build(paths).save(tmp_path / "first.onnx")
    units = runtime.load(first).manifest["build"]["onnx_conversion"]["units"]
    assert {unit["converted"] for unit in units} == {"worker"}
    wide(7, width=12).save(paths[1])
    again = fuser.build(paths)
    artifact = again.save(tmp_path / "e.onnx")
    units = runtime.load(artifact).manifest["build"]["onnx_conversion"]["units"]
    converted = {unit["members"][0]: unit["converted"] for unit in units}
    assert converted == {"a": "cache", "b": "this process", "c": "cache"}
    np.testing.assert_allclose(
        runtime.load(artifact).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_a_recorded_member_whose_unit_is_not_cached_is_converted_in_a_worker(
    tmp_path, cache, features
):
    paths = _three(tmp_path)
    fuser.build(paths)  # records kept, nothing converted
    again = fuser.build(paths)
    assert _recorded(again) == ["a", "b", "c"]
    artifact = again.save(tmp_path / "e.onnx")
    conversion = runtime.load(artifact).manifest["build"]["onnx_conversion"]
    assert {unit["converted"] for unit in conversion["units"]} == {"worker"}
    assert not again.assembled
    np.testing.assert_allclose(
        runtime.load(artifact).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_a_keras_file_or_predict_assembles_the_fused_model_on_first_use(tmp_path, cache, features):
    paths = _three(tmp_path)
    fuser.build(paths)
    again = fuser.build(paths)
    assert _recorded(again) == ["a", "b", "c"]
    np.testing.assert_allclose(again.predict(features), member_mean(paths, features), atol=1e-5)
    assert again.assembled and _recorded(again) == []
    assert again.verification["max_abs_error"] < 1e-4
    lazy = fuser.build(paths)
    folder = lazy.save(tmp_path / "e.keras")
    assert lazy.assembled
    loaded = runtime.load(folder)
    assert "fused_model" in loaded.manifest["verification"]
    np.testing.assert_allclose(loaded.predict(features), member_mean(paths, features), atol=1e-5)


def test_records_of_another_probe_batch_are_not_used(tmp_path, cache, capsys):
    paths = _three(tmp_path)
    fuser.build(paths, probe_batch=8)
    again = fuser.build(paths, probe_batch=16, progress=True)
    assert _recorded(again) == []
    assert "their records hold another probe batch" in capsys.readouterr().err


def test_members_of_one_architecture_are_loaded_and_fused(tmp_path, cache, features):
    paths = save_keras(tmp_path, [("a", mlp(1)), ("b", mlp(2)), ("w", wide(3))])
    fuser.build(paths, fusion="on")
    mlp(9).save(paths[1])  # b retrained: a may be fused with it, so a is loaded too
    again = fuser.build(paths, fusion="on")
    assert _recorded(again) == []
    assert [[m.name for m in group.members] for group in again.fusion.groups] == [["a", "b"]]
    artifact = again.save(tmp_path / "e.onnx")
    np.testing.assert_allclose(
        runtime.load(artifact).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_without_fusion_a_member_of_the_same_architecture_stays_recorded(tmp_path, cache):
    paths = save_keras(tmp_path, [("a", mlp(1)), ("b", mlp(2))])
    fuser.build(paths, fusion="off")
    mlp(9).save(paths[1])
    again = fuser.build(paths, fusion="off")
    assert _recorded(again) == ["a"]


def test_a_record_does_not_let_an_unsafe_member_past_safe_mode(tmp_path, cache):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((N_FEATURES,), name="features")
    scaled = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    outputs = keras.layers.Dense(5, activation="softmax")(scaled)
    unsafe = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(unsafe)
    (other,) = save_keras(tmp_path, [("w", wide(1))])
    fuser.build([unsafe, other], safe_mode=False)
    with pytest.raises(FuseError, match="lambda"):
        fuser.build([unsafe, other])  # safe mode: loaded, and refused as before


def test_a_damaged_record_is_no_record(tmp_path, cache, features):
    paths = _three(tmp_path)
    fuser.build(paths)
    records = sorted((cache / "members").glob("*.json"))
    assert len(records) == 3
    records[0].write_text("{not json")
    for array in (cache / "members").glob("*.npz"):
        array.write_bytes(b"damaged")
    again = fuser.build(paths)
    assert _recorded(again) == []
    artifact = again.save(tmp_path / "e.onnx")
    np.testing.assert_allclose(
        runtime.load(artifact).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_no_cache_neither_reads_nor_writes_records(tmp_path, cache):
    paths = _three(tmp_path)
    fuser.build(paths, cache=False)
    assert not (cache / "members").exists()
    fuser.build(paths)
    assert _recorded(fuser.build(paths, cache=False)) == []


def test_validation_data_loads_every_member(tmp_path, cache):
    paths = _three(tmp_path)
    fuser.build(paths)
    rng = np.random.default_rng(0)
    fit = {
        "x": rng.normal(size=(64, N_FEATURES)).astype(np.float32),
        "y": rng.integers(0, 5, 64),
    }
    again = fuser.build(paths, head="stack", fit_data=fit)
    assert _recorded(again) == []


@pytest.mark.parametrize("extra", [{}, {"uncertainty": True, "expose_members": True}])
def test_the_task_and_outputs_come_from_the_record_as_from_the_member(tmp_path, cache, extra):
    paths = _three(tmp_path)
    first = fuser.build(paths, **extra)
    again = fuser.build(paths, **extra)
    assert _recorded(again) == ["a", "b", "c"]
    assert {name: task.to_manifest() for name, task in again.tasks.items()} == {
        name: task.to_manifest() for name, task in first.tasks.items()
    }
    assert again.outputs == first.outputs


def test_the_architecture_digest_is_the_same_in_another_process(tmp_path):
    # Members are matched by this digest across builds: were it to differ between
    # processes, members of one architecture would silently stop being fused.
    (path,) = save_keras(tmp_path, [("a", mlp(1))])
    script = (
        "import json, sys\n"
        "from fuser.members import load_members, parse_specs\n"
        "from fuser.fusion.planner import architecture\n"
        "(member,), _ = load_members(parse_specs([sys.argv[1]]))\n"
        "print(json.dumps(architecture(member)))\n"
    )
    digests = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", script, str(path)],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(2)
    ]
    assert digests[0] == digests[1]
    assert digests[0][0] is not None  # an MLP's architecture can be written down


def test_a_member_with_a_custom_class_is_loaded_every_time(custom_layer_member, tmp_path, cache):
    # Registered here (its module was imported): it builds, but keeps no record, so that a
    # build where the class is missing fails as it would without the cache.
    import keras

    path, _ = custom_layer_member
    (other,) = save_keras(tmp_path, [("w", wide(1))])
    fuser.build([path, other], task="regression")
    again = fuser.build([path, other], task="regression")
    assert _recorded(again) == ["w"]
    registry = keras.saving.get_custom_objects()
    scale = registry.pop("fuser_tests>Scale")
    try:
        with pytest.raises(FuseError, match="custom Keras class 'fuser_tests>Scale'"):
            fuser.build([path, other], task="regression")
    finally:
        registry["fuser_tests>Scale"] = scale
