"""Every CPU: stacked and grouped convolutions run in TensorFlow with oneDNN on or off, and
a failure inside TensorFlow, tf2onnx or ONNX Runtime reaches the user as one sentence.

TensorFlow turns oneDNN off by default on CPUs without AVX-512 VNNI; its graph optimizer
then fuses a grouped ``Conv2D`` with its ``BiasAdd`` into a kernel that refuses groups.
The artifacts must run wherever they are served, so the tests that matter here run the
artifacts in fresh processes with ``TF_ENABLE_ONEDNN_OPTS=0`` and ``=1`` explicitly,
whatever the CPU of the machine running the suite.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import N_CLASSES, member_mean, mlp

import fuser
import runtime
from fuser.cli import main
from fuser.errors import StageError
from fuser.fusion import lowerings, policy
from fuser.fusion.layouts import Value

pytestmark = pytest.mark.fusion

IMAGE = (12, 12, 3)


def cnn(seed: int, *, grouped: bool = False):
    """A small CNN; ``grouped``: with a convolution of groups=channels inside (ConvNeXt's
    depthwise form), which TensorFlow traces as a grouped ``Conv2D``."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(IMAGE, name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    if grouped:
        x = keras.layers.Conv2D(8, 3, groups=8, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES, activation="softmax")(x))


@pytest.fixture(scope="module")
def portable_members(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("portable_members")
    paths: dict[str, list[Path]] = {"mlp": [], "cnn": [], "grouped": []}
    for seed in range(3):
        paths["mlp"].append(root / f"mlp{seed}.keras")
        mlp(seed).save(paths["mlp"][-1])
        paths["cnn"].append(root / f"cnn{seed}.keras")
        cnn(seed).save(paths["cnn"][-1])
        paths["grouped"].append(root / f"grouped{seed}.keras")
        cnn(seed + 10, grouped=True).save(paths["grouped"][-1])
    return paths


def _inputs(kind: str, rows: int = 5) -> np.ndarray:
    shape = (20,) if kind == "mlp" else IMAGE
    return np.random.default_rng(1).normal(size=(rows, *shape)).astype(np.float32)


def _run_savedmodel(directory: Path, name: str, x: np.ndarray, onednn: str, tmp: Path) -> Path:
    """``saved_model_cli run`` on the artifact in a fresh process with oneDNN as given;
    returns the folder the outputs were written to (one ``.npy`` per output key)."""
    np.save(tmp / "x.npy", x)
    outdir = tmp / f"out_{onednn}"
    script = Path(sys.executable).with_name("saved_model_cli")
    completed = subprocess.run(
        [
            str(script),
            "run",
            "--dir",
            str(directory),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"{name}={tmp / 'x.npy'}",
            "--outdir",
            str(outdir),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return outdir


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fused_savedmodel_answers_in_saved_model_cli_with_onednn_on_and_off(
    kind, portable_members, tmp_path
):
    paths = portable_members[kind]
    ensemble = fuser.build(paths, fusion="on")
    assert len(ensemble.fusion.groups) == 1
    saved = ensemble.save(tmp_path / "stacked_savedmodel")
    x = _inputs(kind)
    expected = member_mean(paths, x)
    for onednn in ("0", "1"):
        outdir = _run_savedmodel(saved, ensemble.inputs[0].name, x, onednn, tmp_path)
        np.testing.assert_allclose(np.load(outdir / "prediction.npy"), expected, atol=1e-5)


def _answer_in_fresh_process(artifact: Path, x: np.ndarray, onednn: str, tmp: Path) -> np.ndarray:
    np.save(tmp / "x.npy", x)
    output = tmp / f"y_{artifact.parent.name}_{artifact.name}_{onednn}.npy"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuser",
            "predict",
            artifact,
            "--input",
            tmp / "x.npy",
            "--output",
            output,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return np.load(output)


def test_members_with_grouped_convolutions_build_and_serve_with_onednn_on_and_off(
    portable_members, tmp_path
):
    """ConvNeXt's form: a Conv2D with groups inside each member, stacked and not."""
    paths = portable_members["grouped"]
    x = _inputs("grouped")
    expected = member_mean(paths, x)
    for fusion in ("off", "stack"):
        ensemble = fuser.build(paths, fusion=fusion)
        (tmp_path / fusion).mkdir()
        for name in ("e.onnx", "e_savedmodel", "e.keras"):
            artifact = ensemble.save(tmp_path / fusion / name)
            for onednn in ("0", "1"):
                answer = _answer_in_fresh_process(artifact, x, onednn, tmp_path)
                np.testing.assert_allclose(answer, expected, atol=1e-5, err_msg=f"{name} {onednn}")


def test_tensorflow_graphs_keep_grouped_convolutions_apart_from_their_bias(
    portable_members, tmp_path
):
    """In TensorFlow every grouped Conv2D feeds a Snapshot (its bias cannot be fused into
    the kernel that lacks groups); the ONNX graph keeps the bare grouped Conv."""
    import onnx

    ensemble = fuser.build(portable_members["cnn"], fusion="on")
    graph = ensemble.serving_function().get_concrete_function().graph
    grouped = [
        operation
        for operation in graph.get_operations()
        if operation.type == "Conv2D"
        and operation.inputs[0].shape[-1] != operation.inputs[1].shape[-2]
    ]
    assert grouped
    readers = {reader.type for op in grouped for reader in op.outputs[0].consumers()}
    assert readers == {"Snapshot"}

    model = onnx.load(ensemble.save(tmp_path / "e.onnx"))
    groups = [
        attribute.i
        for node in model.graph.node
        if node.op_type == "Conv"
        for attribute in node.attribute
        if attribute.name == "group"
    ]
    assert max(groups) == 3
    assert not any(node.op_type == "Identity" for node in model.graph.node)


@pytest.fixture
def stacked_form_broken(monkeypatch):
    """Fused Dense layers compute twice their kernel: the stacked form disagrees with
    the members wherever it runs; --fusion auto is made to stack without timing."""
    dense = lowerings.LAYERS["Dense"]

    def doubled(context, layers, arguments):
        value = dense.lower(context, layers, arguments)
        return Value(value.tensor * 2.0, value.layout, value.shape)

    monkeypatch.setitem(lowerings.LAYERS, "Dense", dataclasses.replace(dense, lower=doubled))
    monkeypatch.setattr(policy, "keeps_plain", lambda group: None)


@pytest.fixture
def stacked_form_fails_in_tensorflow(monkeypatch):
    """The stacked form raises inside TensorFlow when run (CheckNumerics on inf), as a
    kernel missing on some CPU would."""
    import keras
    import tensorflow as tf

    class Fails(keras.layers.Layer):
        def call(self, inputs):
            return tf.debugging.check_numerics(inputs * np.inf, "no kernel here")

    dense = lowerings.LAYERS["Dense"]

    def failing(context, layers, arguments):
        value = dense.lower(context, layers, arguments)
        return Value(Fails()(value.tensor), value.layout, value.shape)

    monkeypatch.setitem(lowerings.LAYERS, "Dense", dataclasses.replace(dense, lower=failing))
    monkeypatch.setattr(policy, "keeps_plain", lambda group: None)


@pytest.mark.parametrize("broken", ["stacked_form_broken", "stacked_form_fails_in_tensorflow"])
def test_auto_keeps_a_group_plain_when_its_stacked_form_fails_in_tensorflow(
    broken, request, portable_members, features, tmp_path
):
    request.getfixturevalue(broken)
    paths = portable_members["mlp"]
    ensemble = fuser.build(paths)  # --fusion auto
    assert ensemble.fusion.groups == []
    reason = ensemble.fusion.plain["mlp0"]
    assert "its fused form" in reason and "so it stays plain" in reason
    expected = "differs from the members" if broken == "stacked_form_broken" else "fails in"
    assert expected in reason
    model = runtime.load(ensemble.save(tmp_path / "e.onnx"))
    np.testing.assert_allclose(model.predict(features), member_mean(paths, features), atol=1e-5)
    assert model.manifest["fusion"]["plain"]["mlp0"] == reason


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("stacked_form_broken", r"The fused form of the group mlp0, mlp1, mlp2 differs"),
        (
            "stacked_form_fails_in_tensorflow",
            r"The fused form of the group mlp0, mlp1, mlp2 fails in TensorFlow "
            r"\(no kernel here",
        ),
    ],
)
def test_fusion_stack_fails_in_one_sentence_naming_the_group(
    broken, message, request, portable_members
):
    request.getfixturevalue(broken)
    with pytest.raises(fuser.VerificationError, match=message) as raised:
        fuser.build(portable_members["mlp"], fusion="on")
    assert "--fusion off" in str(raised.value)
    assert raised.value.__cause__ is not None


def test_a_failure_inside_a_library_is_one_sentence_naming_the_stage(
    monkeypatch, portable_members, tmp_path, capsys
):
    import tensorflow as tf

    from fuser.conversion import convert

    def converter_fails(*arguments, **options):
        tf.debugging.check_numerics(tf.constant([np.inf]), "the converter broke")

    # tf2onnx's step, whether the model is converted whole or by units
    monkeypatch.setattr(convert, "_convert", converter_fails)
    ensemble = fuser.build(portable_members["mlp"], fusion="off")
    with pytest.raises(
        fuser.FuseError,
        match=r"^Converting the onnx artifact .*e\.onnx failed in "
        r"TensorFlow: the converter broke",
    ) as raised:
        ensemble.save(tmp_path / "e.onnx")
    assert isinstance(raised.value, StageError) and raised.value.stage == "converting"
    assert isinstance(raised.value.__cause__, tf.errors.InvalidArgumentError)
    assert not (tmp_path / "e.onnx").exists()
    assert not list(tmp_path.iterdir())  # no temporary left behind

    arguments = ["build", *map(str, portable_members["mlp"]), "-o", str(tmp_path / "c.onnx")]
    for debug_flags, status in (([], 1), (["--debug"], 1)):
        capsys.readouterr()
        assert main(debug_flags + arguments + ["-q", "--fusion", "off"]) == status
        error = capsys.readouterr().err
        assert "fuser: error: Converting the onnx artifact" in error
        assert ("Traceback" in error) == bool(debug_flags)
        if not debug_flags:
            assert error.count("\n") == 2  # the sentence, and how to see the traceback


def test_debug_is_read_before_and_after_the_subcommand(tmp_path, capsys):
    missing = str(tmp_path / "missing.onnx")
    for argv in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        assert main(argv) == 2
        assert "Traceback" in capsys.readouterr().err
    assert main(["inspect", missing]) == 2
    assert "Traceback" not in capsys.readouterr().err
