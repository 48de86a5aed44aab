"""Triton and TF Serving repositories: parsed with Triton's own schema, checked against the artifact."""

from __future__ import annotations

import numpy as np
import pytest

import fuser
import runtime
from fuser import FuseError
from fuser.packaging import export_tfserving, export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def artifacts(members_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("packaging")
    single = fuser.build([members_dir / "a.keras", members_dir / "b.h5"])
    multi = fuser.build([members_dir / "multi_a.keras", members_dir / "multi_b.keras"])
    return {
        "onnx": single.save(directory / "digits.onnx"),
        "multi": multi.save(directory / "multi.onnx"),
        "savedmodel": single.save(directory / "digits_sm"),
    }


def _parse(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("kind", ["onnx", "multi"])
def test_triton_config_parses_with_tritons_schema_and_matches_the_artifact(
    artifacts, tmp_path, kind
):
    model_dir = export_triton(
        artifacts[kind], tmp_path / "repo", max_batch_size=32, max_queue_delay_us=500, instances=2
    )
    artifact = runtime.load(artifacts[kind])
    config = _parse(model_dir / "config.pbtxt")
    assert model_dir == tmp_path / "repo" / artifacts[kind].stem
    assert config.name == artifacts[kind].stem
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(group.count, group.kind) for group in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    for tensors, specs in ((config.input, artifact.inputs), (config.output, artifact.outputs)):
        assert [tensor.name for tensor in tensors] == [spec.name for spec in specs]
        for tensor, spec in zip(tensors, specs):
            assert model_config_pb2.DataType.Name(tensor.data_type) == "TYPE_FP32"
            assert list(tensor.dims) == [-1 if dim is None else dim for dim in spec.shape[1:]]
    assert (
        config.parameters["fuser_manifest_sha256"].string_value
        == (artifact.manifest["integrity"]["manifest"])
    )
    # The copy is the artifact byte for byte: it still loads verified and answers the same.
    copy = model_dir / "1" / "model.onnx"
    assert copy.read_bytes() == artifacts[kind].read_bytes()
    assert runtime.load(copy).manifest == artifact.manifest


def test_triton_export_refuses_bad_input_and_keeps_what_exists(artifacts, tmp_path):
    repo = tmp_path / "repo"
    export_triton(artifacts["onnx"], repo, name="digits")
    with pytest.raises(FuseError, match=r"digits already exists; pass --force"):
        export_triton(artifacts["onnx"], repo, name="digits")
    replaced = export_triton(artifacts["onnx"], repo, name="digits", max_batch_size=8, force=True)
    assert _parse(replaced / "config.pbtxt").max_batch_size == 8
    with pytest.raises(FuseError, match=r"is a SavedModel artifact; this export takes an \.onnx"):
        export_triton(artifacts["savedmodel"], repo)
    with pytest.raises(FuseError, match=r"--max-batch-size must be a positive integer"):
        export_triton(artifacts["onnx"], repo, name="other", max_batch_size=0)
    with pytest.raises(FuseError, match=r"model name 'a b' must be one folder name"):
        export_triton(artifacts["onnx"], repo, name="a b")
    damaged = tmp_path / "damaged.onnx"
    data = artifacts["onnx"].read_bytes()
    damaged.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(FuseError, match=r"damaged\.onnx"):
        export_triton(damaged, repo)
    assert sorted(path.name for path in repo.iterdir()) == ["digits"]


def test_tfserving_layout_holds_the_verified_savedmodel(artifacts, tmp_path, features):
    target = export_tfserving(
        artifacts["savedmodel"], tmp_path / "models", name="digits", version=3
    )
    assert target == tmp_path / "models" / "digits" / "3"
    assert (target / "saved_model.pb").is_file()
    served = runtime.load(target)
    np.testing.assert_allclose(
        served.predict(features), runtime.load(artifacts["onnx"]).predict(features), atol=1e-5
    )
    with pytest.raises(FuseError, match=r"3 already exists"):
        export_tfserving(artifacts["savedmodel"], tmp_path / "models", name="digits", version=3)
    with pytest.raises(FuseError, match=r"is an ONNX artifact; this export takes a SavedModel"):
        export_tfserving(artifacts["onnx"], tmp_path / "models")


def test_export_commands_write_the_repositories_and_refuse_bad_input(artifacts, tmp_path, capsys):
    from fuser.cli import main

    repo = tmp_path / "repo"
    assert main(["export", "triton", str(artifacts["onnx"]), str(repo), "--name", "d"]) == 0
    assert _parse(repo / "d" / "config.pbtxt").name == "d"
    assert main(["export", "triton", str(artifacts["onnx"]), str(repo), "--name", "d"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    models = tmp_path / "models"
    assert main(["export", "tfserving", str(artifacts["savedmodel"]), str(models)]) == 0
    assert (models / "digits_sm" / "1" / "saved_model.pb").is_file()
    assert main(["export", "tfserving", str(artifacts["onnx"]), str(models)]) == 2
    error = capsys.readouterr().err
    assert "this export takes a SavedModel directory" in error and "Traceback" not in error
