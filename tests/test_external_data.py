"""ONNX artifacts over 2 GB: weights in an external data file, sealed, loaded, refused when missing.

CI cannot write 2 GB, so these tests lower the threshold: every build here lifts its
weights out as if they were over the limit. `fuser.formats.onnx.EXTERNAL_DATA_BYTES` is what
decides it (1.5 GB by default).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import member_mean

import fuser
import runtime
from fuser.formats import onnx as onnx_format
from fuser.formats import writer as write_lib
from fuser.packaging import export_triton
from runtime import IntegrityError

# Builds fused groups: CI runs these with oneDNN on and off.
pytestmark = pytest.mark.fusion

PATHS = ["a.keras", "b.h5", "c_export"]


@pytest.fixture
def external(monkeypatch):
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_BYTES", 0)


def _data_files(directory):
    return sorted(path.name for path in directory.glob(".*.data"))


def test_weights_go_to_one_sealed_data_file_and_load_transparently(
    external, members_dir, tmp_path, features
):
    members = [members_dir / name for name in PATHS]
    path = fuser.build(members).save(tmp_path / "big.onnx")
    import onnx

    (data,) = _data_files(tmp_path)
    assert data.startswith(".big.onnx.")
    initializers = onnx.load(str(path), load_external_data=False).graph.initializer
    outside = [t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
    assert outside and all(
        entry.value == data for t in outside for entry in t.external_data if entry.key == "location"
    )
    assert all(len(t.raw_data) < 1024 for t in initializers if t not in outside)
    model = runtime.load(path)
    assert model.manifest["artifact"]["external_data"] == [data]
    assert set(model.manifest["integrity"]["content"]) == {"model", data}
    np.testing.assert_allclose(model.predict(features), member_mean(members, features), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.onnx", data])


def test_fused_convolutions_with_external_weights_match_the_inline_artifact(
    monkeypatch, members_dir, tmp_path
):
    import keras

    def cnn(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((8, 8, 3), name="image")
        hidden = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
        hidden = keras.layers.BatchNormalization()(hidden)
        hidden = keras.layers.GlobalAveragePooling2D()(hidden)
        return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(hidden))

    members = [(f"m{seed}", cnn(seed)) for seed in range(3)]
    inline = runtime.load(fuser.build(members, fusion="on").save(tmp_path / "inline.onnx"))
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_BYTES", 0)
    path = fuser.build(members, fusion="on").save(tmp_path / "lifted.onnx")
    lifted = runtime.load(path)
    assert "external_data" in lifted.manifest["artifact"]
    # Kernels are stored in ONNX's layout: no Transpose of a weight at every request
    # (ONNX Runtime folds one at load only below 1 GB).
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(lifted.predict(x), inline.predict(x), atol=1e-6)


def test_a_missing_or_damaged_data_file_is_refused_naming_it(external, members_dir, tmp_path):
    path = fuser.build([members_dir / "a.keras", members_dir / "b.h5"]).save(tmp_path / "e.onnx")
    (data,) = _data_files(tmp_path)
    content = (tmp_path / data).read_bytes()
    (tmp_path / data).write_bytes(content[:100] + bytes([content[100] ^ 1]) + content[101:])
    with pytest.raises(
        IntegrityError, match=rf"e\.onnx failed its integrity check: '{data}' does not match"
    ):
        runtime.load(path)
    (tmp_path / data).unlink()
    with pytest.raises(IntegrityError, match=rf"'{data}' is missing"):
        runtime.load(path)


def test_replacing_an_artifact_removes_its_old_data_and_triton_gets_both_files(
    external, members_dir, tmp_path, features
):
    members = [members_dir / "a.keras", members_dir / "b.h5"]
    path = fuser.build(members).save(tmp_path / "e.onnx")
    (first,) = _data_files(tmp_path)
    fuser.build(members, head="median").save(path, force=True)
    (second,) = _data_files(tmp_path)
    assert first != second and runtime.load(path).manifest["head"]["name"] == "median"
    model_dir = export_triton(path, tmp_path / "repo", name="e")
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == sorted(["model.onnx", second])
    copied = runtime.load(model_dir / "1" / "model.onnx")
    np.testing.assert_allclose(copied.predict(features), runtime.load(path).predict(features))


@pytest.mark.parametrize("stage", ["verification", "seal"])
def test_a_failed_build_leaves_no_data_file(external, members_dir, tmp_path, monkeypatch, stage):
    def fail(*args, **kwargs):
        raise fuser.VerificationError("made to fail")

    ensemble = fuser.build([members_dir / "a.keras"])
    if stage == "verification":  # the artifact disagrees with the members
        monkeypatch.setattr(type(ensemble), "verify", fail)
    else:
        monkeypatch.setattr(write_lib, "_check_seal", fail)
    with pytest.raises(fuser.VerificationError):
        ensemble.save(tmp_path / "e.onnx")
    assert list(tmp_path.iterdir()) == []


def test_building_one_artifact_keeps_the_data_of_another_with_a_longer_name(
    external, members_dir, tmp_path
):
    members = [members_dir / "a.keras"]
    longer = fuser.build(members).save(tmp_path / "e.onnx.v2.onnx")
    fuser.build(members).save(tmp_path / "e.onnx")
    runtime.load(longer)  # its data file is still there
    assert len(_data_files(tmp_path)) == 2


def test_a_symbolic_link_to_the_model_loads_and_exports(external, members_dir, tmp_path, features):
    (tmp_path / "v3").mkdir()
    path = fuser.build([members_dir / "a.keras"]).save(tmp_path / "v3" / "e.onnx")
    link = tmp_path / "current.onnx"
    link.symlink_to(path)
    np.testing.assert_array_equal(
        runtime.load(link).predict(features), runtime.load(path).predict(features)
    )
    model_dir = export_triton(link, tmp_path / "repo", name="e")
    assert len(list((model_dir / "1").iterdir())) == 2


def test_a_model_replaced_while_it_loads_is_read_again(
    external, members_dir, tmp_path, monkeypatch, features
):
    members = [members_dir / "a.keras"]
    path = fuser.build(members).save(tmp_path / "e.onnx")
    replacement = fuser.build(members, head="median")
    from runtime import backends

    opened = backends.OnnxBackend._open
    calls = []

    def replace_then_open(self, data, *args):
        if self.path == path:  # the reader's (the writer checks its temporary too)
            calls.append(1)
            if len(calls) == 1:  # a rebuild lands after this reader read the old model
                replacement.save(path, force=True)
        return opened(self, data, *args)

    monkeypatch.setattr(backends.OnnxBackend, "_open", replace_then_open)
    model = runtime.load(path)
    assert len(calls) == 2 and model.manifest["head"]["name"] == "median"


def test_large_weights_convert_as_inputs_and_stay_in_one_file(
    monkeypatch, members_dir, tmp_path, features
):
    # Above WEIGHTS_AS_INPUTS_BYTES (and under EXTERNAL_DATA_BYTES) the weights skip the
    # frozen graph but are still stored inside the one .onnx file.
    monkeypatch.setattr(onnx_format, "WEIGHTS_AS_INPUTS_BYTES", 0)
    members = [members_dir / name for name in PATHS]
    path = fuser.build(members, fusion="on").save(tmp_path / "one.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["one.onnx"]
    model = runtime.load(path)
    assert "external_data" not in model.manifest["artifact"]
    assert [spec.name for spec in model.inputs] == ["features"]
    np.testing.assert_allclose(model.predict(features), member_mean(members, features), atol=1e-5)


def test_an_edited_list_of_data_files_is_refused_before_any_is_read(
    external, members_dir, tmp_path, monkeypatch
):
    path = fuser.build([members_dir / "a.keras"]).save(tmp_path / "e.onnx")
    (tmp_path / "secret").write_text("not a weight")
    from runtime import integrity, readers
    from runtime import manifest as manifest_lib

    manifest = readers.read_manifest("onnx", path)
    manifest["artifact"]["external_data"].append("secret")
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    (entry,) = [e for e in model.metadata_props if e.key == manifest_lib.ONNX_METADATA_KEY]
    entry.value = manifest_lib.dumps(manifest)
    onnx.save(model, str(path))
    hashed = []
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p.name) or "0")
    with pytest.raises(IntegrityError, match="its manifest does not match"):
        runtime.load(path)
    assert hashed == []
