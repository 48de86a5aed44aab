"""The thin runtime: ONNX without TensorFlow, input checking, batching, threads, bad artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import N_CLASSES, N_FEATURES, member_mean

import fuser
import runtime
from runtime import ArtifactError, ManifestError
from runtime import manifest as manifest_lib

PATHS = ["a.keras", "b.h5", "c_export"]


@pytest.fixture(scope="module")
def onnx_path(members_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime") / "ensemble.onnx"
    return fuser.build([members_dir / name for name in PATHS]).save(path)


@pytest.fixture(scope="module")
def model(onnx_path):
    return runtime.load(onnx_path)


@pytest.fixture(scope="module")
def multi_model(members_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("runtime_multi") / "multi.onnx"
    return runtime.load(
        fuser.build([members_dir / "multi_a.keras", members_dir / "multi_b.keras"]).save(path)
    )


def test_onnx_artifact_is_served_with_tensorflow_unimportable(
    onnx_path, members_dir, features, tmp_path
):
    np.save(tmp_path / "x.npy", features)
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        BLOCKED = {{"tensorflow", "keras", "fuser", "tf2onnx", "onnx"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        import runtime
        model = runtime.load({str(onnx_path)!r})
        np.save({str(tmp_path / "y.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r})))
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED)))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout) == []
    expected = member_mean([members_dir / name for name in PATHS], features)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)


def test_import_runtime_pulls_in_nothing_heavy():
    code = "import sys, runtime; print(sorted(m for m in ('tensorflow', 'keras', 'fuser', 'onnx') if m in sys.modules))"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert completed.stdout.strip() == "[]", completed.stderr


def test_signature_is_described(model):
    assert model.inputs == (runtime.TensorSpec("features", (None, N_FEATURES), "float32"),)
    assert model.outputs == (runtime.TensorSpec("prediction", (None, N_CLASSES), "float32"),)
    assert model.format == "onnx"
    assert "members=3" in repr(model)


def test_lists_float64_ints_and_non_contiguous_arrays_are_accepted(model, features):
    expected = model.predict(features)
    np.testing.assert_allclose(model.predict(features.tolist()), expected, atol=1e-6)
    np.testing.assert_allclose(model.predict(features.astype(np.float64)), expected, atol=1e-6)
    fortran = np.asfortranarray(features)
    np.testing.assert_allclose(model.predict(fortran), expected, atol=1e-6)
    strided = np.repeat(features, 2, axis=0)[::2]
    assert not strided.flags["C_CONTIGUOUS"] or strided.base is not None
    np.testing.assert_allclose(model.predict(strided), expected, atol=1e-6)
    ints = np.arange(2 * N_FEATURES).reshape(2, N_FEATURES) % 3
    np.testing.assert_allclose(
        model.predict(ints), model.predict(ints.astype(np.float32)), atol=1e-6
    )
    np.testing.assert_allclose(model.predict({"features": features}), expected, atol=1e-6)


def test_empty_batch_gives_empty_output(model):
    result = model.predict(np.zeros((0, N_FEATURES), np.float32))
    assert result.shape == (0, N_CLASSES) and result.dtype == np.float32


def test_batch_size_splits_without_changing_the_answer(model):
    batch = np.random.default_rng(0).normal(size=(1001, N_FEATURES)).astype(np.float32)
    whole = model.predict(batch)
    np.testing.assert_allclose(model.predict(batch, batch_size=64), whole, atol=1e-6)
    np.testing.assert_allclose(model.predict(batch, batch_size=1), whole, atol=1e-6)


def test_threads_sets_the_session_and_keeps_the_answer(onnx_path, model):
    single = runtime.load(onnx_path, threads=1)
    assert single._backend.session.get_session_options().intra_op_num_threads == 1
    batch = np.random.default_rng(1).normal(size=(300, N_FEATURES)).astype(np.float32)
    np.testing.assert_array_equal(single.predict(batch), model.predict(batch))


@pytest.mark.parametrize("threads", [0, -2, 1.0, True, "2"])
def test_bad_threads_are_refused(onnx_path, threads):
    with pytest.raises(ValueError, match=r"threads must be a positive integer or None"):
        runtime.load(onnx_path, threads=threads)


BAD_INPUTS = [
    pytest.param(
        np.zeros((2, 7), np.float32),
        ValueError,
        r"Input 'features' expects shape \(None, 20\), received \(2, 7\)",
        id="features",
    ),
    pytest.param(
        np.zeros(20, np.float32),
        ValueError,
        r"expects shape \(None, 20\), received \(20,\)",
        id="rank-1",
    ),
    pytest.param(
        np.zeros((2, 20, 1), np.float32), ValueError, r"received \(2, 20, 1\)", id="rank-3"
    ),
    pytest.param(
        np.array([["a"] * 20]),
        TypeError,
        r"expects numbers \(float32\), received an array of dtype <U1",
        id="strings",
    ),
    pytest.param(
        np.array([[object()] * 20]), TypeError, r"received an array of dtype object", id="objects"
    ),
    pytest.param([[1.0, 2.0], [3.0]], ValueError, r"could not be read as an array", id="ragged"),
    pytest.param(
        {"wrong": np.zeros((1, 20))},
        ValueError,
        r"Expected the one input \['features'\], received keys \['wrong'\]",
        id="wrong-key",
    ),
]


@pytest.mark.parametrize(("x", "error", "pattern"), BAD_INPUTS)
def test_bad_inputs_say_what_was_expected_and_received(model, x, error, pattern):
    with pytest.raises(error, match=pattern):
        model.predict(x)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size_is_refused(model, features, batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer or None"):
        model.predict(features, batch_size=batch_size)


def test_several_inputs_by_name_or_order_and_their_errors(multi_model):
    num, cat = np.ones((3, 4), np.float32), np.zeros((3, 3), np.float32)
    by_name = multi_model.predict({"cat": cat, "num": num})
    assert set(by_name) == {"score", "probs"} and by_name["probs"].shape == (3, 3)
    np.testing.assert_array_equal(multi_model.predict((num, cat))["score"], by_name["score"])
    with pytest.raises(
        ValueError, match=r"Expected inputs \['num', 'cat'\]; missing \['cat'\], unknown \[\]"
    ):
        multi_model.predict({"num": num})
    with pytest.raises(
        ValueError,
        match=r"All inputs must have the same batch size, received \{'num': 3, 'cat': 2\}",
    ):
        multi_model.predict({"num": num, "cat": cat[:2]})
    with pytest.raises(ValueError, match=r"This model has 2 inputs \['num', 'cat'\]"):
        multi_model.predict(num)


def test_threads_sharing_one_model_get_the_serial_answers(model):
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(1 + i % 5, N_FEATURES)).astype(np.float32) for i in range(64)]
    serial = [model.predict(batch) for batch in batches]
    results: dict[int, list] = {}

    def work(worker: int) -> None:
        results[worker] = [model.predict(batch) for batch in batches[worker::8]]

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in range(8):
        for got, want in zip(results[worker], serial[worker::8]):
            np.testing.assert_array_equal(got, want)


def test_savedmodel_and_keras_artifacts_load_lazily_with_tensorflow(
    members_dir, tmp_path, features
):
    ensemble = fuser.build([members_dir / "a.keras", members_dir / "b.h5"])
    for name in ("lazy_sm", "lazy.keras"):
        loaded = runtime.load(ensemble.save(tmp_path / name))
        np.testing.assert_allclose(loaded.predict(features), ensemble.predict(features), atol=1e-5)
        assert loaded.predict(features[:0]).shape == (0, N_CLASSES)
        with pytest.raises(ValueError, match=r"threads applies to ONNX artifacts; .* served by"):
            runtime.load(tmp_path / name, threads=1)


def test_missing_and_foreign_artifacts_are_refused_naming_the_file(tmp_path, onnx_path):
    import onnx

    with pytest.raises(ArtifactError, match=r"Artifact .*nothing\.onnx does not exist"):
        runtime.load(tmp_path / "nothing.onnx")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ArtifactError, match=r"plain_dir is a directory without saved_model\.pb"):
        runtime.load(tmp_path / "plain_dir")
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ArtifactError, match=r"noise\.onnx could not be opened by ONNX Runtime"):
        runtime.load(tmp_path / "noise.onnx")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(
        ArtifactError, match=r"neither an \.onnx file, a \.keras file nor a SavedModel"
    ):
        runtime.load(tmp_path / "model.bin")
    plain = onnx.load(str(onnx_path))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(
        ArtifactError, match=r"plain\.onnx is an ONNX model without a fuser manifest"
    ):
        runtime.load(tmp_path / "plain.onnx")


def _valid_manifest() -> dict:
    return {
        "format": manifest_lib.FORMAT,
        "format_version": manifest_lib.FORMAT_VERSION,
        "members": [],
        "head": {"name": "mean"},
        "inputs": [{"name": "x", "shape": [None, 3], "dtype": "float32"}],
        "outputs": [{"name": "prediction", "shape": [None, 1], "dtype": "float32"}],
        "artifact": {"format": "onnx"},
    }


BAD_MANIFESTS = [
    (lambda m: "not json", r"is not valid JSON"),
    (lambda m: [], r"must be a JSON object, found list"),
    (lambda m: {k: v for k, v in m.items() if k != "inputs"}, r"lacks the keys inputs"),
    (lambda m: {**m, "format": "other"}, r"has format 'other', expected 'fuser.manifest'"),
    (
        lambda m: {**m, "format_version": 99},
        r"format version 99; this runtime reads versions up to 2",
    ),
    (
        lambda m: {**m, "inputs": []},
        r"manifest field inputs must be a non-empty list, found list \[\]",
    ),
    (
        lambda m: {**m, "inputs": [{"name": "x", "shape": [-1], "dtype": "float32"}]},
        r"manifest field inputs\[0\]\.shape\[0\] must be a positive integer \(a 64-bit size\) or null, found -1",
    ),
    (lambda m: {**m, "outputs": [m["outputs"][0], m["outputs"][0]]}, r"repeats names in 'outputs'"),
    (
        lambda m: {**m, "artifact": {"format": "pickle"}},
        r'manifest field artifact\.format must be one of onnx, savedmodel, keras, found "pickle"',
    ),
]


@pytest.mark.parametrize(("mutate", "pattern"), BAD_MANIFESTS)
def test_malformed_manifests_are_refused(mutate, pattern):
    mutated = mutate(_valid_manifest())
    text = mutated if isinstance(mutated, str) else json.dumps(mutated)
    with pytest.raises(ManifestError, match=pattern):
        manifest_lib.loads(text, "artifact.onnx")


def test_valid_manifest_round_trips():
    manifest = _valid_manifest()
    assert manifest_lib.loads(manifest_lib.dumps(manifest), "x") == manifest
