"""Custom Keras classes: named from the file when missing, loadable after the build.

A registered class (``@keras.saving.register_keras_serializable(package="fuser_tests")``,
``conftest.CUSTOM_LAYER_SOURCE``) is saved as ``fuser_tests>Scale``. A process that has
not imported its module is told which class is missing, where it is defined and what to
pass; ``runtime.load(custom_objects=)``, ``fuser predict --custom-objects`` and
``fuser serve --custom-objects`` then load the fused ``.keras`` artifact.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error

import numpy as np
import pytest
from conftest import CUSTOM_LAYER_MODULE, N_CLASSES, N_FEATURES
from test_cli import run_cli

import fuser
import runtime
from fuser.cli import main
from fuser.errors import FuseError
from runtime import custom_objects as custom_lib

REGISTERED = "fuser_tests>Scale"
OPTION = f"{CUSTOM_LAYER_MODULE}:Scale"
MISSING = (
    "it uses the custom Keras class 'fuser_tests>Scale' (module 'fuser_test_layers'), not "
    "registered in this process; import the module that defines it, or pass "
    "--custom-objects fuser_test_layers:Scale (custom_objects=) for classes you trust."
)


def _scale_class():
    return sys.modules[CUSTOM_LAYER_MODULE].Scale


@pytest.fixture(scope="module")
def custom_h5_member(custom_layer_member, tmp_path_factory):
    """The custom layer in a legacy .h5 member (whose config records no module)."""
    import keras

    keras.utils.set_random_seed(16)
    inputs = keras.Input((N_FEATURES,), name="features")
    outputs = _scale_class()(2.0)(keras.layers.Dense(N_CLASSES)(inputs))
    path = tmp_path_factory.mktemp("custom_h5") / "custom_h5.h5"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def custom_artifact(custom_layer_member, tmp_path_factory):
    """A fused .keras artifact holding the custom layer, and the module's folder."""
    path, code = custom_layer_member
    artifact = tmp_path_factory.mktemp("custom_artifact") / "custom.keras"
    fuser.build([path], task="regression").save(artifact)
    return artifact, code


def _member_output(custom_layer_member, x):
    import keras

    path, _ = custom_layer_member
    model = keras.models.load_model(path, custom_objects={REGISTERED: _scale_class()})
    return np.asarray(model(x))


def _environment(code) -> dict[str, str]:
    """This environment, with the custom layer's module importable."""
    paths = [str(code), os.environ.get("PYTHONPATH")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, paths)),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


def test_registered_classes_and_their_modules_are_read_from_the_file(
    custom_layer_member, custom_h5_member, tmp_path
):
    path, _ = custom_layer_member
    assert custom_lib.registered_classes(path) == {REGISTERED: CUSTOM_LAYER_MODULE}
    assert custom_lib.registered_classes(custom_h5_member) == {REGISTERED: None}
    (tmp_path / "notes.txt").write_text("not a model")
    assert custom_lib.registered_classes(tmp_path / "notes.txt") == {}
    assert custom_lib.registered_classes(tmp_path) == {}  # a directory (SavedModel)


def test_missing_classes_are_those_neither_registered_nor_given(unregistered_custom_layer):
    path, _ = unregistered_custom_layer
    assert custom_lib.missing_classes(path) == {REGISTERED: CUSTOM_LAYER_MODULE}
    assert custom_lib.missing_classes(path, {"Scale": _scale_class()}) == {}
    assert custom_lib.missing_classes(path, {REGISTERED: _scale_class()}) == {}
    assert custom_lib.missing_classes(path, {"Other": _scale_class()}) == {
        REGISTERED: CUSTOM_LAYER_MODULE
    }


def test_several_missing_classes_are_named_together():
    text = custom_lib.describe_missing({"a>One": "pkg.one", "b>Two": None})
    assert text == (
        "it uses the custom Keras classes 'a>One' (module 'pkg.one'), 'b>Two', not registered "
        "in this process; import the modules that define them, or pass --custom-objects "
        "pkg.one:One --custom-objects MODULE:Two (custom_objects=) for classes you trust."
    )


@pytest.mark.parametrize(
    "message, expected",
    [
        (
            "Unknown layer: 'rw>Scale'. Please ensure you are using a "
            "`keras.utils.custom_object_scope`",
            {"rw>Scale": None},
        ),
        (
            "<class 'Functional'> could not be deserialized properly. Exception encountered: "
            "Could not locate class 'Scale'. Make sure custom classes ... Full object config: "
            "{'module': 'rw', 'class_name': 'Scale', 'config': {'dtype': {'registered_name': "
            "None}}, 'registered_name': 'rw>Scale'}",
            {"rw>Scale": "rw"},
        ),
    ],
    ids=["h5", "keras"],
)
def test_keras_messages_name_the_class_when_the_file_cannot_be_read(message, expected, tmp_path):
    unreadable = tmp_path / "gone.keras"
    reason = custom_lib.explain_load_error(unreadable, ValueError(message))
    assert reason == custom_lib.describe_missing(expected)
    assert custom_lib.explain_load_error(unreadable, ValueError("disk full")) is None


def test_an_h5_member_with_an_unregistered_class_is_refused_naming_it(
    custom_h5_member, monkeypatch
):
    import keras

    monkeypatch.delitem(keras.saving.get_custom_objects(), REGISTERED)
    with pytest.raises(
        FuseError,
        match=r'^Member "custom_h5" \(custom_h5\.h5\) could not be loaded: it uses the custom '
        r"Keras class 'fuser_tests>Scale', not registered in this process; import the module "
        r"that defines it, or pass --custom-objects MODULE:Scale \(custom_objects=\) for "
        r"classes you trust\.$",
    ):
        fuser.build([custom_h5_member])
    ensemble = fuser.build([custom_h5_member], custom_objects={"Scale": _scale_class()})
    assert ensemble.members[0].format == "h5"


def test_a_custom_layer_artifact_loads_in_a_fresh_process_with_custom_objects(
    custom_artifact, custom_layer_member, tmp_path, features
):
    """Without the class the load fails naming it; with ``custom_objects`` (the class
    unregistered, as one defined but not registered where it is loaded) it answers."""
    artifact, code = custom_artifact
    np.save(tmp_path / "x.npy", features)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import runtime

        try:
            runtime.load({str(artifact)!r})
        except runtime.ArtifactError as error:
            print("ERROR", error)
        assert "{CUSTOM_LAYER_MODULE}" not in sys.modules
        import keras
        import {CUSTOM_LAYER_MODULE} as layers

        keras.saving.get_custom_objects().pop({REGISTERED!r})
        model = runtime.load({str(artifact)!r}, custom_objects={{"Scale": layers.Scale}})
        np.save({str(tmp_path / "y.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r})))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=_environment(code),
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[0] == (
        f"ERROR Artifact {artifact} could not be loaded by Keras: {MISSING}"
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), _member_output(custom_layer_member, features), atol=1e-5
    )


def test_fuser_predict_takes_custom_objects_for_a_keras_artifact(
    custom_artifact, custom_layer_member, tmp_path, features
):
    artifact, code = custom_artifact
    np.save(tmp_path / "x.npy", features)
    completed = run_cli(
        "predict",
        artifact,
        "--input",
        tmp_path / "x.npy",
        "--output",
        tmp_path / "y.npy",
        "--custom-objects",
        OPTION,
        env=_environment(code),
    )
    assert completed.returncode == 0, completed.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), _member_output(custom_layer_member, features), atol=1e-5
    )


def test_fuser_predict_without_the_class_exits_2_naming_it(
    custom_artifact, unregistered_custom_layer, tmp_path, features, capsys
):
    artifact, _ = custom_artifact
    np.save(tmp_path / "x.npy", features)
    argv = ["predict", str(artifact), "--input", str(tmp_path / "x.npy")]
    assert main([*argv, "--output", str(tmp_path / "y.npy")]) == 2
    error = capsys.readouterr().err
    assert error == (f"fuser: error: Artifact {artifact} could not be loaded by Keras: {MISSING}\n")
    assert main([*argv, "--output", str(tmp_path / "y.npy"), "--custom-objects", "Scale"]) == 2
    assert "--custom-objects expects MODULE:NAME, received 'Scale'." in capsys.readouterr().err
    assert not (tmp_path / "y.npy").exists()


def test_custom_objects_are_accepted_and_ignored_for_onnx_artifacts(
    custom_layer_member, tmp_path, features
):
    path, _ = custom_layer_member
    artifact = fuser.build([path], task="regression").save(tmp_path / "custom.onnx")
    model = runtime.load(artifact, custom_objects={"Scale": _scale_class()})
    np.testing.assert_allclose(
        model.predict(features), _member_output(custom_layer_member, features), atol=1e-5
    )
    with pytest.raises(TypeError, match=r"^custom_objects must be a dict of class names"):
        runtime.load(artifact, custom_objects=[_scale_class()])


def test_fuser_serve_takes_custom_objects_and_answers(
    custom_artifact, custom_layer_member, features
):
    pytest.importorskip("uvicorn")
    from test_serve import call

    artifact, code = custom_artifact
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["serve", str(artifact), "--name", "m", "--port", str(port)]
    process = subprocess.Popen(
        [sys.executable, "-m", "fuser", *command, "--custom-objects", OPTION],
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(code),
    )
    try:
        lines = []
        for line in process.stderr:  # TensorFlow's start-up lines come first
            lines.append(line)
            if line.startswith(("Serving ", "fuser: error")):
                break
        banner = f"Serving {artifact} as 'm' on http://127.0.0.1:{port}/v1/models/m"
        assert lines and banner in lines[-1], "".join(lines)
        url = f"http://127.0.0.1:{port}/v1/models/m:predict"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = call(url, {"instances": features.tolist()})
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "fuser serve did not answer"
                time.sleep(0.1)
        assert status == 200
        np.testing.assert_allclose(
            np.array(body["predictions"]), _member_output(custom_layer_member, features), atol=1e-5
        )
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        process.stderr.close()
