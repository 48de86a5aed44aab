"""The architectures people train, small: each builds with the defaults to ONNX, SavedModel
and .keras, and every artifact answers like its members run one by one.

Recurrent layers (masked or not), exact GELU, attention, depthwise and grouped
convolutions, preprocessing layers and integer token inputs: each once failed to convert
(TensorList ops of lowered loops, Erfc, grouped convolutions with oneDNN off).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import reference_outputs

import fuser
import runtime
from fuser import FuseError
from fuser.conversion.convert import check_operations

pytestmark = pytest.mark.fusion

TOKENS, VOCABULARY, CLASSES = 12, 50, 3


def _text(kind: str, seed: int, *, mask: bool):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((TOKENS,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCABULARY, 8, mask_zero=mask)(inputs)
    layer = {
        "lstm": lambda: keras.layers.LSTM(6),
        "gru": lambda: keras.layers.GRU(6),
        "simple_rnn": lambda: keras.layers.SimpleRNN(6),
        "bidirectional": lambda: keras.layers.Bidirectional(keras.layers.LSTM(3)),
        "sequences": lambda: keras.Sequential(
            [keras.layers.LSTM(6, return_sequences=True), keras.layers.GlobalAveragePooling1D()]
        ),
    }[kind]()
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(layer(x)))


def _attention(seed: int):
    """A transformer block: multi-head attention, layer normalization, exact GELU."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((TOKENS,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCABULARY, 16)(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(x, x)
    x = keras.layers.LayerNormalization()(x + attended)
    hidden = keras.layers.Dense(32, activation="gelu")(x)  # exact: Erfc in TensorFlow
    x = keras.layers.LayerNormalization()(x + keras.layers.Dense(16)(hidden))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))


def _convnext_block(seed: int):
    """ConvNeXt's block: a depthwise convolution written as Conv2D(groups=channels), a
    DepthwiseConv2D, LayerNormalization, exact GELU; Rescaling in front."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 2, strides=2)(x)
    y = keras.layers.Conv2D(8, 3, padding="same", groups=8)(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(y)
    y = keras.layers.LayerNormalization(epsilon=1e-6)(y)
    y = keras.layers.Dense(16, activation="gelu")(y)
    x = x + keras.layers.Dense(8)(y)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))


def _lookup(seed: int):
    """Integer ids through an IntegerLookup table (a TensorFlow resource) and a
    Normalization of a second, numeric input."""
    import keras

    keras.utils.set_random_seed(seed)
    ids = keras.Input((4,), dtype="int64", name="ids")
    numbers = keras.Input((5,), name="numbers")
    looked_up = keras.layers.IntegerLookup(vocabulary=list(range(0, 40, 2)))(ids)
    x = keras.layers.Flatten()(keras.layers.Embedding(22, 4)(looked_up))
    scaled = keras.layers.Normalization(mean=np.arange(5.0), variance=np.full(5, 4.0))(numbers)
    x = keras.layers.Concatenate()([x, scaled])
    return keras.Model([ids, numbers], keras.layers.Dense(CLASSES, activation="softmax")(x))


CASES = {
    "lstm": lambda seed: _text("lstm", seed, mask=False),
    "lstm_masked": lambda seed: _text("lstm", seed, mask=True),
    "gru_masked": lambda seed: _text("gru", seed, mask=True),
    "simple_rnn": lambda seed: _text("simple_rnn", seed, mask=False),
    "bidirectional_masked": lambda seed: _text("bidirectional", seed, mask=True),
    "lstm_sequences": lambda seed: _text("sequences", seed, mask=False),
    "attention_gelu": _attention,
    "convnext_block": _convnext_block,
}


def _inputs(model, rows: int = 6):
    rng = np.random.default_rng(3)
    feeds = {}
    for tensor in model.inputs:
        name, shape = tensor.name, (rows, *tensor.shape[1:])
        if "int" in str(tensor.dtype):
            values = rng.integers(0, 40 if name == "ids" else VOCABULARY, shape)
            if name == "tokens":
                values[:, -4:] = 0  # padding, for the masked members
            feeds[name] = values.astype(str(tensor.dtype))
        else:
            feeds[name] = rng.uniform(0, 255, shape).astype("float32")
    return feeds if len(feeds) > 1 else next(iter(feeds.values()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_architectures_build_with_the_defaults_in_every_format(case, tmp_path):
    paths = []
    for seed in (1, 2):  # same architecture, different weights: --fusion auto considers them
        model = CASES[case](seed)
        paths.append(tmp_path / f"{case}_{seed}.keras")
        model.save(paths[-1])
    x = _inputs(model)
    expected = np.mean([outputs[0] for outputs in reference_outputs(paths, x)], axis=0)
    ensemble = fuser.build(paths)
    for name in ("e.onnx", "e_savedmodel", "e.keras"):
        answer = runtime.load(ensemble.save(tmp_path / name)).predict(x)
        np.testing.assert_allclose(answer, expected, atol=1e-5, err_msg=f"{case} {name}")


def test_a_lookup_table_is_refused_for_onnx_naming_the_member_and_kept_elsewhere(
    tmp_path, monkeypatch
):
    """tf2onnx converts only string<->int64 tables; an IntegerLookup is int64->int64. The
    SavedModel writer falls back to Keras' ExportArchive, which tracks the table."""
    from fuser.formats import savedmodel

    fallbacks = []
    original = savedmodel._write_savedmodel_with_keras
    monkeypatch.setattr(
        savedmodel,
        "_write_savedmodel_with_keras",
        lambda *arguments: fallbacks.append(1) or original(*arguments),
    )
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"lookup_{seed}.keras")
        _lookup(seed).save(paths[-1])
    x = _inputs(_lookup(1))
    expected = np.mean([outputs[0] for outputs in reference_outputs(paths, x)], axis=0)
    ensemble = fuser.build(paths)
    with pytest.raises(
        FuseError,
        match=r"^The TensorFlow operation LookupTableFindV2 \(in member \"lookup_[12]\"\) has "
        r"no ONNX equivalent that tf2onnx can convert; write a SavedModel",
    ):
        ensemble.save(tmp_path / "e.onnx")
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [
        "lookup_1.keras",
        "lookup_2.keras",
    ]
    for name in ("e_savedmodel", "e.keras"):
        answer = runtime.load(ensemble.save(tmp_path / name)).predict(x)
        np.testing.assert_allclose(answer, expected, atol=1e-5, err_msg=name)
    assert fallbacks == [1]


def test_recurrent_layers_become_onnx_recurrences_not_tensor_lists(tmp_path):
    import onnx

    for seed in (1, 2):
        _text("lstm", seed, mask=False).save(tmp_path / f"l{seed}.keras")
        _text("gru", seed, mask=True).save(tmp_path / f"g{seed}.keras")
    paths = sorted(tmp_path.glob("*.keras"))
    model = onnx.load(fuser.build(paths, fusion="off").save(tmp_path / "rnn.onnx"))
    operations = {node.op_type for node in model.graph.node}
    assert "LSTM" in operations and "Loop" in operations  # the masked GRU is a Loop
    assert not any(op.startswith("TensorList") for op in operations)


def test_exact_gelu_is_converted_at_every_supported_opset(tmp_path):
    for seed in (1, 2):
        _attention(seed).save(tmp_path / f"a{seed}.keras")
    paths = sorted(tmp_path.glob("*.keras"))
    ensemble = fuser.build(paths, fusion="off")
    x = _inputs(_attention(1))
    expected = ensemble.predict(x)
    for opset in (13, 17, 18):
        path = ensemble.save(tmp_path / f"gelu{opset}.onnx", opset=opset)
        np.testing.assert_allclose(runtime.load(path).predict(x), expected, atol=1e-5)


def test_an_operation_onnx_lacks_is_named_with_its_member():
    """tf2onnx leaves what it cannot convert in the graph; the build names it."""
    from onnx import helper

    node = helper.make_node(
        "TensorListReserve", ["x"], ["y"], name="fused_1/member_reviews_2_1/lstm/x"
    )
    other = helper.make_node("Bucketize", ["x"], ["z"], name="fused0_dense/Bucketize")
    graph = helper.make_graph([node, other], "g", [], [])
    with pytest.raises(FuseError) as raised:
        check_operations(helper.make_model(graph), ["reviews", "reviews_2"])
    problems = raised.value.problems
    assert problems == [
        "The TensorFlow operation Bucketize (in fused group fused0) has no ONNX equivalent "
        "that tf2onnx can convert; write a SavedModel or .keras artifact instead, or replace "
        "that layer in the member.",
        'The TensorFlow operation TensorListReserve (in member "reviews_2") has no ONNX '
        "equivalent that tf2onnx can convert; write a SavedModel or .keras artifact instead, "
        "or replace that layer in the member.",
    ]


def test_the_build_reports_its_peak_memory(tmp_path, capsys):
    from fuser.cli import main

    for seed in (1, 2):
        _text("lstm", seed, mask=False).save(tmp_path / f"l{seed}.keras")
    output = tmp_path / "e.onnx"
    assert main(["build", *map(str, sorted(tmp_path.glob("*.keras"))), "-o", str(output)]) == 0
    assert "peak memory of the build so far" in capsys.readouterr().err
    manifest = runtime.load(output).manifest
    assert manifest["build"]["peak_memory_mb"] > 100
    assert main(["inspect", str(output)]) == 0
    assert "peak memory" in capsys.readouterr().out
