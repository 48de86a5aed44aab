"""The SavedModel by units: each member's graph traced once, cached, joined under the head.

Whatever the units, the joined SavedModel must answer like the members run one by one,
through the runtime, through ``tf.saved_model.load`` and through a TensorFlow session as
TensorFlow Serving runs it; a rebuild after one member changed must trace only that
member and load no other; anything the join cannot carry is saved whole, as before.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import member_mean, mlp, save_keras, wide

import fuser
import runtime
from fuser.conversion import graph_units


def _conversion(path) -> dict:
    return runtime.load(path).manifest["build"]["savedmodel_conversion"]


def _traced(path) -> dict[str, str]:
    return {",".join(unit["members"]): unit["traced"] for unit in _conversion(path)["units"]}


def _graph(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    return proto.meta_graphs[0]


def _three(tmp_path):
    return save_keras(tmp_path, [("a", wide(1, width=8)), ("b", wide(2, width=12)), ("c", mlp(3))])


def test_the_joined_savedmodel_answers_like_the_members_everywhere(tmp_path, cache, features):
    import tensorflow as tf

    paths = _three(tmp_path)
    ensemble = fuser.build(paths, uncertainty=True)
    name = ensemble.outputs[0].name
    path = ensemble.save(tmp_path / "e_savedmodel")
    assert _conversion(path)["by"] == "units"
    assert set(_traced(path).values()) == {"this process"}
    meta = _graph(path)
    assert not meta.HasField("object_graph_def") and meta.saver_def.restore_op_name
    expected = member_mean(paths, features)
    loaded = runtime.load(path)
    answers = loaded.predict(features, as_dict=True)
    np.testing.assert_allclose(answers[name], expected, atol=1e-5)
    assert set(answers) == {spec.name for spec in ensemble.outputs} and len(answers) == 4
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    answer = signature(features=tf.constant(features))[name].numpy()
    np.testing.assert_allclose(answer, expected, atol=1e-5)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path))
        answer = session.run(f"outputs/{name}:0", {"features:0": features})
    np.testing.assert_allclose(answer, expected, atol=1e-5)


def test_a_rebuild_traces_only_the_changed_member_and_loads_no_other(tmp_path, cache, features):
    paths = _three(tmp_path)
    fuser.build(paths).save(tmp_path / "first_savedmodel")
    wide(7, width=12).save(paths[1])  # b retrained
    again = fuser.build(paths)
    path = again.save(tmp_path / "e_savedmodel")
    assert _traced(path) == {"a": "cache", "b": "this process", "c": "cache"}
    assert [member.name for member in again.members if member.model is None] == ["a", "c"]
    assert not again.assembled  # no fused Keras model was needed
    assert "fused_model" not in runtime.load(path).manifest["verification"]
    np.testing.assert_allclose(
        runtime.load(path).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_a_recorded_member_without_its_unit_is_loaded_and_traced(tmp_path, cache, features, capsys):
    paths = _three(tmp_path)
    fuser.build(paths).save(tmp_path / "e.onnx")  # records and ONNX units, no graph units
    again = fuser.build(paths, progress=True)
    path = again.save(tmp_path / "e_savedmodel")
    assert "their SavedModel units are not in the cache" in capsys.readouterr().err
    assert set(_traced(path).values()) == {"this process"}
    assert not again.assembled
    np.testing.assert_allclose(
        runtime.load(path).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_a_damaged_unit_is_traced_again(tmp_path, cache, features):
    paths = _three(tmp_path)
    fuser.build(paths).save(tmp_path / "first_savedmodel")
    for unit in (cache / "savedmodel-units").glob("*.npz"):
        unit.write_bytes(unit.read_bytes()[:100])
    path = fuser.build(paths).save(tmp_path / "e_savedmodel")
    assert set(_traced(path).values()) == {"this process"}
    np.testing.assert_allclose(
        runtime.load(path).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_fused_groups_out_of_member_order_are_stacked_in_member_order(tmp_path, cache, features):
    paths = save_keras(tmp_path, [("a", mlp(1)), ("w", wide(2)), ("b", mlp(3))])
    ensemble = fuser.build(paths, fusion="on")
    assert [[m.name for m in group.members] for group in ensemble.fusion.groups] == [["a", "b"]]
    path = ensemble.save(tmp_path / "e_savedmodel")
    assert _traced(path) == {"a,b": "this process", "w": "this process"}
    np.testing.assert_allclose(
        runtime.load(path).predict(features), member_mean(paths, features), atol=1e-5
    )
    meta = _graph(path)
    assert any(node.op == "GatherV2" for node in meta.graph_def.node)


def test_what_the_join_cannot_carry_is_saved_whole(tmp_path, cache, features):
    paths = _three(tmp_path)
    path = fuser.build(paths, xla=True).save(tmp_path / "e_savedmodel")
    assert _conversion(path) == {"by": "whole", "why": "--xla compiles the fused function"}
    assert _graph(path).HasField("object_graph_def")
    np.testing.assert_allclose(
        runtime.load(path).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_a_captured_resource_other_than_a_variable_is_not_joined():
    import keras
    import tensorflow as tf

    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant([1, 2], tf.int64), tf.constant([0.5, 2.0], tf.float32)
        ),
        default_value=0.0,
    )

    class Looked(keras.layers.Layer):
        def call(self, ids):
            return table.lookup(ids)

    ids = keras.Input((3,), dtype="int64", name="ids")
    model = keras.Model(ids, {"out_0": Looked()(ids)})
    spec = tf.TensorSpec((None, 3), tf.int64)
    with pytest.raises(graph_units.NotByUnits, match="resource that is not a variable"):
        graph_units.trace(model, ["ids"], [spec])


def test_with_other_artifacts_the_savedmodel_is_verified_in_another_process(
    tmp_path, cache, features, capsys
):
    paths = _three(tmp_path)
    ensemble = fuser.build(paths, progress=True)
    written = ensemble.save_all([tmp_path / "e.onnx", tmp_path / "e_savedmodel"])
    assert written == [tmp_path / "e.onnx", tmp_path / "e_savedmodel"]
    err = capsys.readouterr().err
    assert f"Verifying {tmp_path / 'e_savedmodel'} in another process" in err
    assert err.index("Writing " + str(tmp_path / "e_savedmodel")) < err.index(
        "Writing " + str(tmp_path / "e.onnx")
    )
    for path in written:
        loaded = runtime.load(path)
        assert loaded.manifest["verification"]["artifact"]["max_abs_error"] < 1e-5
        np.testing.assert_allclose(
            loaded.predict(features), member_mean(paths, features), atol=1e-5
        )
    assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(
        ["a.keras", "b.keras", "c.keras", "cache", "e.onnx", "e_savedmodel"]
    )


def test_a_savedmodel_failing_in_the_other_process_is_refused_and_removed(
    tmp_path, cache, monkeypatch
):
    from fuser.errors import StageError

    paths = _three(tmp_path)
    original = graph_units.write

    def broken(ensemble, path):
        details = original(ensemble, path)
        (path / "saved_model.pb").write_bytes(b"not a graph")
        return details

    monkeypatch.setattr(graph_units, "write", broken)
    ensemble = fuser.build(paths)
    with pytest.raises(
        StageError, match=r"^Verifying the savedmodel artifact .*e_savedmodel failed"
    ):
        ensemble.save_all([tmp_path / "e_savedmodel", tmp_path / "e.onnx"])
    assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(
        ["a.keras", "b.keras", "c.keras", "cache", "e.onnx"]
    )


def test_inspect_says_how_the_savedmodel_was_made(tmp_path, cache):
    from runtime.describe import describe

    paths = _three(tmp_path)
    fuser.build(paths).save(tmp_path / "first_savedmodel")
    mlp(8).save(paths[2])  # c retrained
    path = fuser.build(paths).save(tmp_path / "e_savedmodel")
    text = describe(runtime.load(path).manifest, str(path))
    assert "SavedModel joined from units (2 from the cache, 1 traced here)" in text
    whole = fuser.build(paths, xla=True).save(tmp_path / "xla_savedmodel")
    text = describe(runtime.load(whole).manifest, str(whole))
    assert "SavedModel saved whole (--xla compiles the fused function)" in text
