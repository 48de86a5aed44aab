"""Shared fixtures: small members in every format, built once per session.

Members are tiny (a few thousand parameters) so the suite stays fast; they still
exercise what matters: a Normalization layer whose constants must be frozen into the
ONNX graph, Dropout (identity at inference), differing input names across formats.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Members converted to ONNX are cached (fuser.conversion.cache): the suite keeps its own cache,
# fresh each session, never the user's.
if "FUSER_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FUSER_CACHE_DIR"] = tempfile.mkdtemp(prefix="fuser-test-cache-")

import numpy as np
import pytest

N_FEATURES, N_CLASSES = 20, 5


def mlp(seed: int, *, input_name: str = "features", classes: int = N_CLASSES, width: int = 16):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((N_FEATURES,), name=input_name)
    x = keras.layers.Normalization(
        mean=np.linspace(-1, 1, N_FEATURES), variance=np.full(N_FEATURES, 2.0)
    )(inputs)
    x = keras.layers.Dense(width, activation="relu")(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def wide(seed: int, *, width: int = 32):
    """A member of another architecture than ``mlp``'s (and than each other's, by width):
    never fused with them."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((N_FEATURES,), name="features")
    x = keras.layers.Dense(width, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES, activation="softmax")(x))


def save_keras(directory: Path, named) -> list[Path]:
    """Save ``(name, model)`` pairs as ``directory/<name>.keras``; their paths, in order."""
    paths = []
    for name, model in named:
        paths.append(directory / f"{name}.keras")
        model.save(paths[-1])
    return paths


def overflowing(seed: int):
    """Gives inf and NaN without a Lambda layer: ``exp(1000 * sum(features))`` overflows
    float32 to inf on rows with a clearly positive feature sum (zeros on negative ones);
    output columns 0-2 copy it (inf), columns 3-4 multiply it by 0 (NaN where it is inf).

    Every non-finite value comes from one elementwise operation, never from a sum
    whose order could matter, so every backend places them alike.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((N_FEATURES,), name="features")
    hidden = keras.layers.Dense(1, activation="exponential")
    output = keras.layers.Dense(N_CLASSES, name="scores")
    model = keras.Model(inputs, output(hidden(inputs)))
    hidden.set_weights([np.full((N_FEATURES, 1), 1000.0, np.float32), np.zeros(1, np.float32)])
    output.set_weights([np.array([[1, 1, 1, 0, 0]], np.float32), np.zeros(N_CLASSES, np.float32)])
    return model


def two_in_two_out(seed: int, *, swap_inputs: bool = False):
    """Inputs ``num`` (4,) and ``cat`` (3,); outputs ``score`` (1,) and ``probs`` (3,)."""
    import keras

    keras.utils.set_random_seed(seed)
    num = keras.Input((4,), name="num")
    cat = keras.Input((3,), name="cat")
    hidden = keras.layers.Dense(8, activation="tanh")(keras.layers.Concatenate()([num, cat]))
    score = keras.layers.Dense(1, name="score")(hidden)
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(hidden)
    inputs = [cat, num] if swap_inputs else [num, cat]
    return keras.Model(inputs, [score, probs])


@pytest.fixture(scope="session")
def members_dir(tmp_path_factory) -> Path:
    """One directory holding every member the tests use, in every format."""
    import keras
    import tensorflow as tf

    root = tmp_path_factory.mktemp("members")
    mlp(1).save(root / "a.keras")
    mlp(2).save(root / "b.h5")
    mlp(3).export(str(root / "c_export"), verbose=False)
    tf.saved_model.save(mlp(4), str(root / "d_tfsave"))
    mlp(5, input_name="other_name").save(root / "e.keras")

    two_in_two_out(11).save(root / "multi_a.keras")
    two_in_two_out(12, swap_inputs=True).save(root / "multi_b.keras")
    two_in_two_out(13).export(str(root / "multi_c_export"), verbose=False)

    mlp(6, classes=3).save(root / "three_classes.keras")
    keras.utils.set_random_seed(7)
    image = keras.Input((8, 8, 1), name="image")
    conv = keras.layers.Conv2D(2, 3, activation="relu")(image)
    keras.Model(image, keras.layers.Dense(N_CLASSES)(keras.layers.Flatten()(conv))).save(
        root / "conv.keras"
    )
    ints = keras.Input((N_FEATURES,), dtype="int32", name="features")
    cast = keras.layers.Dense(N_CLASSES)(keras.ops.cast(ints, "float32"))
    keras.Model(ints, cast).save(root / "int_input.keras")
    two_in_two_out(14).save(root / "multi_other.keras")
    lam_in = keras.Input((N_FEATURES,), name="features")
    lam_out = keras.layers.Lambda(lambda t: t * 2.0)(keras.layers.Dense(N_CLASSES)(lam_in))
    keras.Model(lam_in, lam_out).save(root / "lambda.keras")
    mlp(8).save_weights(root / "weights_only.weights.h5")
    overflowing(9).save(root / "overflow.keras")
    keras.utils.set_random_seed(10)
    grid = keras.Input((4, 5), name="features")
    keras.Model(grid, keras.layers.Dense(N_CLASSES)(keras.layers.Flatten()(grid))).save(
        root / "rank3.keras"
    )

    tf.saved_model.save(tf.Module(), str(root / "no_signature"))
    text = tf.Module()
    text.serve = tf.function(
        lambda x: {"score": tf.strings.to_number(x)[:, None]},
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    tf.saved_model.save(
        text, str(root / "string_input"), signatures={"serving_default": text.serve}
    )
    ragged = tf.Module()
    ragged.serve = tf.function(
        lambda x: {"score": tf.reduce_sum(x, axis=1, keepdims=True)},
        input_signature=[tf.RaggedTensorSpec([None, None], tf.float32)],
    )
    tf.saved_model.save(
        ragged, str(root / "ragged_input"), signatures={"serving_default": ragged.serve}
    )
    _with_invalid_input_dtype(root / "d_tfsave", root / "invalid_dtype")

    (root / "empty.keras").write_bytes(b"")
    (root / "random.keras").write_bytes(np.random.default_rng(0).bytes(512))
    (root / "random.h5").write_bytes(np.random.default_rng(1).bytes(512))
    (root / "random.onnx").write_bytes(np.random.default_rng(2).bytes(512))
    (root / "random.tflite").write_bytes(np.random.default_rng(3).bytes(512))
    (root / "notes.txt").write_text("not a model\n")
    data = (root / "a.keras").read_bytes()
    (root / "truncated.keras").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(root / "a.keras") as archive:
        weights = archive.getinfo("model.weights.h5")
    middle = weights.header_offset + 200  # inside the weights entry's data
    (root / "corrupt.keras").write_bytes(
        data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]
    )
    (root / "empty_dir").mkdir()
    (root / "not_a_savedmodel").mkdir()
    (root / "not_a_savedmodel" / "readme.txt").write_text("hello")
    with zipfile.ZipFile(root / "a.keras") as archive:
        assert "config.json" in archive.namelist()
    return root


def _with_invalid_input_dtype(source: Path, target: Path) -> None:
    """A copy of a SavedModel whose serving_default input has dtype DT_INVALID, as a
    signature tensor that is no plain tensor reads."""
    import shutil

    from tensorflow.core.protobuf import saved_model_pb2

    shutil.copytree(source, target)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((target / "saved_model.pb").read_bytes())
    for meta_graph in proto.meta_graphs:
        for info in meta_graph.signature_def["serving_default"].inputs.values():
            info.dtype = 0
    (target / "saved_model.pb").write_bytes(proto.SerializeToString())


CUSTOM_LAYER_MODULE = "fuser_test_layers"
CUSTOM_LAYER_SOURCE = """
import keras


@keras.saving.register_keras_serializable(package="fuser_tests")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, inputs):
        return inputs * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
"""


@pytest.fixture(scope="session")
def custom_layer_member(tmp_path_factory) -> tuple[Path, Path]:
    """A .keras member using a registered custom layer, and the directory of the module
    defining it (``fuser_test_layers``, put it on ``sys.path`` to import it).

    The module is imported here to save the member, which registers the class in this
    process; tests unregister it (``unregistered_custom_layer``) to load as a process
    without the module would.
    """
    import importlib
    import sys

    import keras

    code = tmp_path_factory.mktemp("custom_code")
    (code / f"{CUSTOM_LAYER_MODULE}.py").write_text(CUSTOM_LAYER_SOURCE)
    sys.path.insert(0, str(code))
    try:
        layers = importlib.import_module(CUSTOM_LAYER_MODULE)
    finally:
        sys.path.remove(str(code))
    keras.utils.set_random_seed(15)
    inputs = keras.Input((N_FEATURES,), name="features")
    model = keras.Model(inputs, layers.Scale(3.0)(keras.layers.Dense(N_CLASSES)(inputs)))
    path = tmp_path_factory.mktemp("custom_member") / "custom_layer.keras"
    model.save(path)
    return path, code


@pytest.fixture
def unregistered_custom_layer(custom_layer_member, monkeypatch) -> tuple[Path, Path]:
    """``custom_layer_member`` with its class removed from Keras' registry for one test."""
    import keras

    monkeypatch.delitem(keras.saving.get_custom_objects(), "fuser_tests>Scale")
    return custom_layer_member


def reference_outputs(paths: list[Path], x) -> list:
    """Run each member on its own, the way a user would without fuser: a list of flat outputs."""
    import keras
    import tensorflow as tf

    results = []
    for path in paths:
        if path.is_dir():
            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
            (key, spec), *_rest = signature.structured_input_signature[1].items()
            if isinstance(x, dict):
                outputs = signature(
                    **{k: tf.constant(x[k]) for k in signature.structured_input_signature[1]}
                )
            else:
                outputs = signature(**{key: tf.constant(x, dtype=spec.dtype)})
            results.append([outputs[name].numpy() for name in sorted(outputs)])
        else:
            model = keras.models.load_model(path, compile=False)
            arguments = [x[tensor.name] for tensor in model.inputs] if isinstance(x, dict) else x
            out = model(arguments, training=False)
            results.append(
                [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
            )
    return results


def member_mean(paths: list[Path], x) -> np.ndarray:
    """The mean of one-output members, run one by one."""
    return np.mean([outputs[0] for outputs in reference_outputs(paths, x)], axis=0)


@pytest.fixture(scope="session")
def features() -> np.ndarray:
    return np.random.default_rng(42).normal(size=(13, N_FEATURES)).astype(np.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own (converted units, member records, SavedModel units)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FUSER_CACHE_DIR", str(folder))
    return folder
