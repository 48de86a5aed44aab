"""Horizontal fusion: fused groups compute what the plain branches compute.

The property test draws member architectures from the supported layers and keras.ops
calls, builds the same ensemble fused and plain, and compares every member's output
(through ``expose_members``) in the Keras model and the ONNX artifact; fixed cases cover the
SavedModel and ``.keras`` artifacts, the modes, mixed ensembles and the reasons given
for members left plain.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run_cli

import runtime
from fuser.errors import FuseError

# Builds fused groups: CI runs these with oneDNN on and off.
pytestmark = pytest.mark.fusion

TOLERANCE = 1e-5


def _randomize_statistics(model, rng: np.random.Generator) -> None:
    """Give normalization layers member-specific statistics, as training would."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            weights = layer.get_weights()
            size = weights[0].shape[0]
            new = [rng.uniform(0.5, 1.5, size), rng.normal(0, 0.3, size)][: len(weights) - 2]
            new += [rng.normal(0, 0.5, size), rng.uniform(0.5, 2.0, size)]
            layer.set_weights([w.astype("float32") for w in new])
        if isinstance(layer, keras.layers.LayerNormalization):
            layer.set_weights(
                [rng.normal(1, 0.3, w.shape).astype("float32") for w in layer.get_weights()]
            )


def _dense_block(x, choice: int, width: int, layers):
    from keras import ops

    if choice == 6:  # keras.ops: constants on either side, along the last axis
        scale = np.linspace(0.5, 1.5, x.shape[-1]).astype("float32")
        return ops.relu6(1.0 - ops.hard_sigmoid(x * scale) * 2.0 + 3.0) / 6.0
    if choice == 7:  # keras.ops: softmax over each half, a reshape there and back
        halves = ops.softmax(ops.reshape(x, (-1, 2, x.shape[-1] // 2)))
        return ops.reshape(halves, (-1, x.shape[-1]))
    if choice == 0:
        return layers.Dense(width, activation="relu")(x)
    if choice == 1:
        x = layers.Dense(width)(x)
        return layers.Activation("tanh")(layers.BatchNormalization()(x))
    if choice == 2:
        x = layers.Dense(width, activation="swish")(x)
        return layers.Dropout(0.4)(layers.LayerNormalization()(x))
    if choice == 3:  # residual
        y = layers.Dense(x.shape[-1], activation="relu")(x)
        return layers.Add()([x, y])
    if choice == 4:  # two branches joined
        a = layers.Dense(width // 2, activation="sigmoid")(x)
        b = layers.Dense(width // 2, use_bias=False)(x)
        return layers.Concatenate()([a, b])
    y = layers.Dense(x.shape[-1], activation="sigmoid")(x)  # gating
    return layers.Multiply()([x, y])


def _conv_block(x, choice: int, filters: int, layers):
    from keras import ops

    if choice == 6:  # squeeze and excitation with keras.ops, the gate first
        squeezed = layers.GlobalAveragePooling2D(keepdims=True)(x)
        return ops.hard_sigmoid(layers.Conv2D(x.shape[-1], 1)(squeezed)) * x
    if choice == 7:  # a one-channel gate (last axes differ), hard swish as ops
        x = x * ops.sigmoid(layers.Conv2D(1, 1)(x))
        return x * ops.relu6(x + 3.0) * (1.0 / 6.0)
    if choice == 0:
        x = layers.Conv2D(filters, 3, padding="same")(x)
        return layers.ReLU()(layers.BatchNormalization()(x))
    if choice == 1:
        return layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="elu")(x)
    if choice == 2:  # residual
        y = layers.Conv2D(x.shape[-1], 1, activation="relu")(x)
        return layers.Add()([x, y])
    if choice == 3 and x.shape[1] >= 4:
        return layers.MaxPooling2D()(x)
    if choice == 4 and x.shape[1] >= 4:
        return layers.AveragePooling2D(2)(x)
    return layers.Conv2D(filters, 3, padding="valid" if x.shape[1] > 3 else "same")(x)


architectures = st.fixed_dictionaries(
    {
        "image": st.booleans(),
        "conv": st.lists(st.integers(0, 7), min_size=1, max_size=3),
        "dense": st.lists(st.integers(0, 7), min_size=0, max_size=3),
        "width": st.sampled_from([4, 8, 12]),
        "pool": st.sampled_from(["flatten", "global", "reshape"]),
        "output": st.sampled_from(["softmax", "linear"]),
        "members": st.integers(2, 3),
        "normalize": st.booleans(),
        "operations": st.booleans(),  # a first block of keras.ops calls
    }
)


def build_members(spec: dict, seed: int = 0) -> list:
    import keras
    from keras import layers

    def one(index: int):
        keras.utils.set_random_seed(seed * 100 + index)
        rng = np.random.default_rng(seed * 100 + index)
        if spec["image"]:
            inputs = keras.Input((6, 6, 2), name="image")
            x = layers.Conv2D(spec["width"], 3, padding="same", activation="relu")(inputs)
            if spec.get("operations"):
                x = _conv_block(x, 7, spec["width"], layers)
            for choice in spec["conv"]:
                x = _conv_block(x, choice, spec["width"], layers)
            if spec["pool"] == "global":
                x = layers.GlobalAveragePooling2D()(x)
            elif spec["pool"] == "reshape":
                x = layers.Reshape((-1,))(x)
            else:
                x = layers.Flatten()(x)
        else:
            inputs = keras.Input((7,), name="features")
            x = inputs
            if spec["normalize"]:
                x = layers.Normalization(
                    mean=rng.normal(size=7), variance=rng.uniform(0.5, 2, size=7)
                )(x)
            x = layers.Dense(spec["width"], activation="relu")(x)
            if spec.get("operations"):
                x = _dense_block(x, 6, spec["width"], layers)
        for choice in spec["dense"]:
            x = _dense_block(x, choice, spec["width"], layers)
        outputs = layers.Dense(3, activation=spec["output"], name="out")(x)
        model = keras.Model(inputs, outputs)
        _randomize_statistics(model, rng)
        return model

    return [(f"m{index}", one(index)) for index in range(spec["members"])]


def _inputs(ensemble, rows: int = 5) -> np.ndarray:
    spec = ensemble.inputs[0]
    rng = np.random.default_rng(7)
    return rng.standard_normal((rows, *spec.shape[1:])).astype("float32")


def _pair(members, **options):
    import fuser

    plain = fuser.build(members, fusion="off", expose_members=True, **options)
    stacked = fuser.build(members, fusion="on", expose_members=True, **options)
    return plain, stacked


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=architectures)
def test_fused_equals_plain_for_random_architectures(spec, tmp_path_factory):
    members = build_members(spec)
    plain, stacked = _pair(members)
    assert [len(group.members) for group in stacked.fusion.groups] == [spec["members"]], (
        stacked.fusion.plain
    )
    x = _inputs(plain)
    want = plain.predict(x, as_dict=True)
    got = stacked.predict(x, as_dict=True)
    assert set(got) == {"prediction", "members"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=TOLERANCE, atol=TOLERANCE)
    path = stacked.save(tmp_path_factory.mktemp("stack") / "stacked.onnx")
    served = runtime.load(path).predict(x)
    for name in want:
        np.testing.assert_allclose(served[name], want[name], rtol=TOLERANCE, atol=TOLERANCE)


CNN = {
    "image": True,
    "conv": [0, 1, 3, 2],
    "dense": [1],
    "width": 8,
    "pool": "global",
    "output": "softmax",
    "members": 3,
    "normalize": False,
}
MLP = {**CNN, "image": False, "dense": [1, 2, 3, 4, 5], "normalize": True}


@pytest.mark.parametrize("spec", [MLP, CNN], ids=["mlp", "cnn"])
def test_every_artifact_of_a_stacked_ensemble_matches_the_plain_one(spec, tmp_path):
    members = build_members(spec, seed=3)
    plain, stacked = _pair(members)
    x = _inputs(plain, rows=9)
    want = plain.predict(x, as_dict=True)
    for name in ("stacked.onnx", "stacked_savedmodel", "stacked.keras"):
        path = stacked.save(tmp_path / name)
        model = runtime.load(path)
        got = model.predict(x)
        for output in want:
            np.testing.assert_allclose(got[output], want[output], rtol=TOLERANCE, atol=TOLERANCE)
        fusion = model.manifest["fusion"]
        assert fusion["mode"] == "on"
        (group,) = fusion["groups"]
        assert group["members"] == ["m0", "m1", "m2"]
        assert all({"layer", "type", "lowering", "why"} <= set(layer) for layer in group["layers"])
        assert len(group["layers"]) == len(members[0][1].layers) - 1  # all but the input


def test_grouped_convolutions_reach_onnx_as_one_grouped_conv(tmp_path):
    import onnx

    _, stacked = _pair(build_members({**CNN, "conv": [0, 0]}, seed=1))
    path = stacked.save(tmp_path / "cnn.onnx")
    convs = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"]
    groups = [
        next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
        for node in convs
    ]
    # The first convolution reads the shared input (one conv, concatenated filters);
    # the next two convolutions and both Dense layers are grouped over the members.
    assert groups == [1, 3, 3, 3, 3]


def test_savedmodel_of_stacked_convolutions_needs_no_xla(tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    _, stacked = _pair(build_members(CNN, seed=2))
    path = stacked.save(tmp_path / "cnn_savedmodel")
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    convolutions = [node for node in graph.node if node.op == "Conv2D"]
    assert convolutions  # joined from units: the graph holds the member's operations
    assert not any(node.op.startswith("Xla") or "_XlaCompile" in node.attr for node in graph.node)
    for function in graph.library.function:
        assert not function.attr["_XlaMustCompile"].b, function.signature.name
        assert not any(node.op.startswith("Xla") for node in function.node_def)


def _timed(monkeypatch, plain_ms, stacked_ms, switch_ms=None):
    """Make --fusion auto's measurement return these figures (batches 1, 256, 4096), and
    the switch's, if it comes to one, ``switch_ms`` against the same ``plain_ms``."""
    from fuser.fusion import costs

    measured = costs.Measurement([1, 256, 4096], plain_ms, stacked_ms)
    monkeypatch.setattr(costs, "measure", lambda group: measured)

    def measure_switch(group, timed):
        assert switch_ms is not None, "the switch was timed"
        return costs.SwitchTiming(timed.fused_limit, plain_ms, switch_ms)

    monkeypatch.setattr(costs, "measure_switch", measure_switch)
    return measured


def test_modes_choose_what_is_fused(monkeypatch):
    import fuser

    members = build_members(MLP, seed=4)
    _timed(monkeypatch, [0.05, 0.2, 10.0], [0.03, 0.1, 9.9])
    auto = fuser.build(members)
    assert [m.name for m in auto.fusion.groups[0].members] == ["m0", "m1", "m2"]
    assert auto.manifest["fusion"]["groups"][0]["measured"] == {
        "engine": "onnxruntime",
        "batches": [1, 256, 4096],
        "plain_ms": [0.05, 0.2, 10.0],
        "stacked_ms": [0.03, 0.1, 9.9],
    }
    assert "Measured, fused vs plain: batch 1: 0.03 vs 0.05 ms" in auto.fusion.notes()[0]
    from runtime.describe import describe

    shown = describe({**auto.manifest, "artifact": {"format": "onnx"}}, "fused.onnx")
    assert "timed, fused vs plain: batch 1: 0.03 vs 0.05 ms, batch 256: 0.1 vs 0.2 ms" in shown
    off = fuser.build(members, fusion="off")
    assert off.fusion.groups == [] and set(off.fusion.plain) == {"m0", "m1", "m2"}
    cnn = build_members(CNN, seed=4)
    _timed(monkeypatch, [0.05, 0.2, 10.0], [0.049, 0.25, 10.6])  # no clear win anywhere
    auto = fuser.build(cnn, fusion="auto")
    assert auto.fusion.groups == []
    assert auto.fusion.plain["m0"].startswith(
        "--fusion auto measured the fused form slower than plain branches at batch 256, 4096 "
        "(ONNX Runtime on this machine, fused vs plain: batch 1: 0.049 vs 0.05 ms, "
        "batch 256: 0.25 vs 0.2 ms, batch 4096: 10.6 vs 10 ms)"
    )
    assert len(fuser.build(cnn, fusion="on").fusion.groups) == 1
    # "stack", the option's first name, still means "on" (the head "stack" is another thing).
    alias = fuser.build(cnn, fusion="stack")
    assert len(alias.fusion.groups) == 1 and alias.manifest["fusion"]["mode"] == "on"
    with pytest.raises(FuseError, match="fusion must be one of auto, on, off, got 'fast'"):
        fuser.build(members, fusion="fast")


@pytest.mark.parametrize("spec", [MLP, CNN], ids=["mlp", "cnn"])
def test_auto_times_both_forms_with_onnx_runtime(spec):
    import fuser
    from fuser.fusion import costs
    from fuser.fusion.forms import forms as group_forms

    (group,) = fuser.build(build_members(spec, seed=4), fusion="on").fusion.groups
    measured = costs.measure(group)
    assert measured.batches == [1, 8, 64, 256, 4096]  # 3 members x 6x6x2 images: 0.9 M values
    assert all(value > 0 for value in [*measured.plain_ms, *measured.fused_ms])
    assert measured.fused_wins == (measured.losing_batches == [])
    # Both timed forms compute the members' outputs.
    x = np.random.default_rng(0).normal(size=(5, *group.members[0].inputs[0].shape[1:]))
    forms = {
        form: model.predict(x, verbose=0) for form, model in group_forms(group, "timed").items()
    }
    np.testing.assert_allclose(forms["fused"], forms["plain"], atol=1e-5)
    assert costs.batches_for(20, members=32) == [1, 8, 64, 256, 4096]
    assert costs.batches_for(32 * 32 * 3, members=8) == [1, 8, 64, 128]
    assert costs.batches_for(224 * 224 * 3, members=16) == [1]
    near = costs.Measurement([1, 4096], [1.0, 10.0], [0.5, 10.4])  # within the margin
    assert near.fused_wins and not costs.Measurement([1], [1.0], [1.1]).fused_wins


def test_fused_only_at_small_batches_becomes_a_switch_on_the_batch_size(monkeypatch, tmp_path):
    import onnx

    import fuser
    from fuser.formats import onnx as onnx_format
    from runtime.describe import describe

    members = build_members(CNN, seed=4)
    # Faster fused up to batch 256, slower at 4096: both forms, switched at 256.
    _timed(monkeypatch, [0.05, 0.2, 10.0], [0.03, 0.19, 12.0], switch_ms=[0.034, 0.2, 10.2])
    auto = fuser.build(members, expose_members=True)
    (group,) = auto.fusion.groups
    assert group.max_fused_batch == 256
    record = auto.manifest["fusion"]["groups"][0]
    assert record["max_stacked_batch"] == 256
    assert record["measured"]["switch"] == {
        "max_stacked_batch": 256,
        "plain_ms": [0.05, 0.2, 10.0],
        "switch_ms": [0.034, 0.2, 10.2],
    }
    assert auto.fusion.notes()[0].startswith(
        "Fused 3 same-architecture members up to batch 256, plain branches above"
    )
    shown = describe({**auto.manifest, "artifact": {"format": "onnx"}}, "fused.onnx")
    assert "fused up to batch 256, plain branches above" in shown
    assert "; fused up to batch 256, plain above, vs plain: batch 1: 0.034 vs 0.05 ms" in shown
    plain = fuser.build(members, fusion="off", expose_members=True)
    batches = {rows: _inputs(plain, rows=rows) for rows in (1, 256, 257)}
    want = {rows: plain.predict(x, as_dict=True) for rows, x in batches.items()}

    def check(predict):
        for rows, x in batches.items():
            got = predict(x)
            for name in want[rows]:
                np.testing.assert_allclose(got[name], want[rows][name], rtol=1e-5, atol=1e-5)

    check(lambda x: auto.predict(x, as_dict=True))
    # The build verifies both forms: the probe batch (8 rows, stacked) and 257 rows.
    seen = []

    def recorded(feeds, wrong_above=None):
        rows = len(next(iter(feeds.values())))
        seen.append(rows)
        results = auto.predict(feeds, as_dict=True)
        if wrong_above is not None and rows > wrong_above:
            results = {name: value + 1.0 for name, value in results.items()}
        return results

    auto.verify(recorded, "The fused model")
    assert seen == [8, 257]
    with pytest.raises(fuser.VerificationError, match="The plain side differs from its members"):
        auto.verify(lambda feeds: recorded(feeds, wrong_above=256), "The plain side")
    for name in ("switch.onnx", "switch_savedmodel", "switch.keras"):
        loaded = runtime.load(auto.save(tmp_path / name))
        assert loaded.manifest["fusion"]["groups"][0]["max_stacked_batch"] == 256
        check(loaded.predict)
    # One If: its branches are the fused group (a grouped convolution) and the members.
    graph = onnx.load(str(tmp_path / "switch.onnx")).graph
    (switch,) = [node for node in graph.node if node.op_type == "If"]
    branches = {attribute.name: attribute.g for attribute in switch.attribute}

    def groups(branch):
        return {
            attribute.i
            for node in branch.node
            if node.op_type == "Conv"
            for attribute in node.attribute
            if attribute.name == "group"
        }

    assert 3 in groups(branches["then_branch"]) and 3 not in groups(branches["else_branch"])
    # Weights converted as inputs and stored outside (the large-ensemble path): the
    # branches read them from the outer graph, kernels already in ONNX's layout.
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_BYTES", 0)
    path = auto.save(tmp_path / "external.onnx")
    check(runtime.load(path).predict)
    model = onnx.load(str(path), load_external_data=False)
    weights = {tensor.name for tensor in model.graph.initializer}
    subgraphs = [attribute.g for node in model.graph.node for attribute in node.attribute]
    transposed = [
        node.name
        for graph in [model.graph, *subgraphs]
        for node in graph.node
        if node.op_type == "Transpose" and node.input[0] in weights
    ]
    assert subgraphs and not transposed


def test_two_switched_groups_switch_together_in_onnx(monkeypatch, tmp_path):
    import fuser
    from fuser.fusion import costs

    first = build_members({**MLP, "members": 2}, seed=5)
    second = build_members({**MLP, "dense": [0], "members": 2}, seed=6)
    members = [("a0", first[0][1]), ("a1", first[1][1]), ("b0", second[0][1]), ("b1", second[1][1])]
    batches = [1, 8, 64]
    stacked = {"a0": [0.5, 0.9, 2.0], "b0": [0.5, 2.0, 2.0]}  # faster up to batch 8, up to 1

    def measure(group):
        return costs.Measurement(batches, [1.0, 1.0, 1.0], stacked[group.members[0].name])

    def measure_switch(group, measured):
        return costs.SwitchTiming(measured.fused_limit, [1.0, 1.0, 1.0], [0.6, 1.0, 1.0])

    monkeypatch.setattr(costs, "measure", measure)
    monkeypatch.setattr(costs, "measure_switch", measure_switch)
    ensemble = fuser.build(members)
    assert [group.max_fused_batch for group in ensemble.fusion.groups] == [8, 1]
    assert ensemble.switch_batch == 1
    path = ensemble.save(tmp_path / "two.onnx")
    loaded = runtime.load(path)
    assert loaded.manifest["artifact"]["switch_batch"] == 1
    shown = run_cli("inspect", str(path)).stdout
    assert (
        "fused up to batch 8, plain branches above (this ONNX artifact: up to batch 1, "
        "the smallest limit of its switched groups)"
    ) in shown
    plain = fuser.build(members, fusion="off")
    for rows in (1, 2, 9):
        x = _inputs(plain, rows=rows)
        np.testing.assert_allclose(loaded.predict(x), plain.predict(x), rtol=1e-5, atol=1e-5)


def test_the_switch_is_timed_against_plain_with_onnx_runtime():
    import fuser
    from fuser.fusion import costs

    (group,) = fuser.build(build_members(MLP, seed=4), fusion="on").fusion.groups
    measured = costs.Measurement([1, 8, 64], [1.0, 1.0, 1.0], [0.5, 0.9, 2.0])
    timed = costs.measure_switch(group, measured)
    assert timed.max_fused_batch == 8
    assert len(timed.plain_ms) == len(timed.switch_ms) == 3
    assert all(value > 0 for value in [*timed.plain_ms, *timed.switch_ms])


def test_a_switch_slower_than_plain_somewhere_keeps_the_group_plain(monkeypatch):
    import fuser

    members = build_members(MLP, seed=4)
    _timed(monkeypatch, [0.05, 0.2, 10.0], [0.03, 0.19, 12.0], switch_ms=[0.03, 0.2, 11.0])
    auto = fuser.build(members)
    assert auto.fusion.groups == []
    assert (
        "and a switch to plain above batch 256 was slower than plain at batch 4096"
        in (auto.fusion.plain["m0"])
    )


def test_where_a_switch_would_use_the_stacked_form():
    from fuser.fusion import costs

    def limit(stacked, plain=(1.0, 1.0, 1.0, 1.0)):
        return costs.Measurement([1, 8, 64, 4096], list(plain), list(stacked)).fused_limit

    assert limit([0.5, 0.9, 1.2, 1.5]) == 8  # up to the last batch before the first loss
    assert limit([0.5, 1.04, 0.9, 1.2]) == 64  # within the margin is not a loss
    assert limit([0.5, 1.2, 0.9, 0.9]) == 1  # a loss in between ends it
    assert limit([0.97, 0.9, 1.2, 1.5]) is None  # no clear win at the smallest batch
    assert limit([0.5, 0.5, 0.5, 0.5]) is None  # stacked everywhere: no switch needed


def test_the_batch_switch_routes_by_batch_size_in_every_engine(tmp_path):
    """Two deliberately different models behind a switch: which one answered shows."""
    import keras

    import runtime.switch as switch_lib
    from runtime.manifest import TensorSpec

    def scaled(factor, name):
        inputs = keras.Input((3,), name=f"{name}_in")
        return keras.Model([inputs], [keras.ops.multiply(inputs, factor)], name=name)

    inputs = keras.Input((3,), name="x")
    (output,) = switch_lib.BatchSwitch(scaled(1.0, "small"), scaled(2.0, "large"), 4)([inputs])
    model = keras.Model([inputs], output)
    small, large = np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)
    assert model([small]).numpy().max() == 1.0 and model([large]).numpy().max() == 2.0
    path = tmp_path / "switch.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.predict([small], verbose=0).max() == 1.0  # predict traces a tf.function
    assert loaded.predict([large], verbose=0).max() == 2.0
    with switch_lib.forced("large"):
        assert model([small]).numpy().max() == 2.0
    # ONNX: converted once per form, joined under one If, as the ONNX writer does.
    import onnxruntime

    from fuser.conversion import switch as onnx_switch
    from fuser.conversion.convert import DEFAULT_OPSET, keras_to_onnx

    specs = [TensorSpec("x", (None, 3), "float32")]
    forms = {}
    for form in switch_lib.FORMS:
        with switch_lib.forced(form):
            forms[form] = keras_to_onnx(model, ["x"], specs, DEFAULT_OPSET)
    stitched = onnx_switch.stitch(
        forms["small"][0],
        forms["large"][0],
        data_inputs=["x"],
        small_outputs=forms["small"][1],
        large_outputs=forms["large"][1],
        limit=4,
    )
    session = onnxruntime.InferenceSession(
        stitched.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert session.run(None, {"x": small})[0].max() == 1.0
    assert session.run(None, {"x": large})[0].max() == 2.0


def test_above_the_measured_size_a_fixed_rule_decides(monkeypatch):
    import fuser
    from fuser.fusion import costs

    monkeypatch.setattr(costs, "measure", lambda group: pytest.fail("measured"))
    monkeypatch.setattr(costs, "MEASURE_MAX_BYTES", 0)
    (group,) = fuser.build(build_members(MLP, seed=4)).fusion.groups
    assert group.measured is None
    cnn = fuser.build(build_members(CNN, seed=4))
    assert cnn.fusion.groups == []
    assert "with Conv2D layers plain: fused, they were measured slower" in cnn.fusion.plain["m0"]


def test_auto_keeps_groups_with_large_weights_plain(monkeypatch):
    import fuser
    from fuser.fusion import policy

    members = build_members(MLP, seed=4)
    _timed(monkeypatch, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    size = sum(member.count_params() for _, member in members) * 4
    monkeypatch.setattr(policy, "AUTO_MAX_BYTES", size - 1)
    auto = fuser.build(members)
    assert auto.fusion.groups == []
    assert f"(this one: {size / 1e6:,.0f} MB)" in auto.fusion.plain["m1"]
    assert len(fuser.build(members, fusion="on").fusion.groups) == 1
    monkeypatch.setattr(policy, "AUTO_MAX_BYTES", size)
    assert len(fuser.build(members).fusion.groups) == 1


def test_mixed_ensemble_keeps_member_order_and_weights():
    """Two architectures interleaved, plus a lone one: outputs stay in member order."""

    mlp = build_members({**MLP, "members": 3}, seed=5)
    other = build_members({**MLP, "dense": [0], "members": 2}, seed=6)
    lone = build_members({**MLP, "dense": [], "members": 1}, seed=7)
    members = [
        ("a", mlp[0][1]),
        ("x", other[0][1]),
        ("b", mlp[1][1]),
        ("solo", lone[0][1]),
        ("y", other[1][1]),
        ("c", mlp[2][1]),
    ]
    weights = [1, 2, 3, 4, 5, 6]
    plain, stacked = _pair(members, head="weighted", weights=weights)
    assert sorted(len(group.members) for group in stacked.fusion.groups) == [2, 3]
    assert stacked.fusion.plain == {"solo": "no other member has the same architecture."}
    x = _inputs(plain, rows=6)
    want, got = plain.predict(x, as_dict=True), stacked.predict(x, as_dict=True)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=TOLERANCE, atol=TOLERANCE)


def test_a_layer_outside_the_set_leaves_its_group_plain_and_says_which():
    import keras

    import fuser

    def member(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((7,), name="features")
        x = keras.layers.Dense(8)(inputs)
        x = keras.layers.PReLU(name="learned_slope")(x)
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))

    ensemble = fuser.build([("p", member(1)), ("q", member(2))], fusion="on")
    assert ensemble.fusion.groups == []
    assert ensemble.fusion.plain["p"] == (
        "layer 'learned_slope' (PReLU) of member \"p\" (in memory) has no fused lowering."
    )


def test_savedmodel_members_stay_plain_with_the_reason(members_dir):
    import fuser

    ensemble = fuser.build([members_dir / "a.keras", members_dir / "c_export"])
    assert "is a SavedModel; its layers are not visible" in ensemble.fusion.plain["c_export"]


def test_cli_fusion_option_and_inspect(tmp_path):
    members = []
    for name, model in build_members(MLP, seed=8):
        path = tmp_path / f"{name}.keras"
        model.save(path)
        members.append(str(path))
    out = tmp_path / "fused.onnx"
    result = run_cli("build", *members, "-o", str(out), "--fusion", "on")
    assert result.returncode == 0, result.stderr
    assert "Fused 3 same-architecture members: m0, m1, m2." in result.stderr
    shown = run_cli("inspect", str(out))
    assert "fused      3 members (m0, m1, m2), fusion on" in shown.stdout
    assert "grouped 1x1 convolution (groups=3)" in shown.stdout
    manifest = json.loads(run_cli("inspect", "--json", str(out)).stdout)
    assert manifest["fusion"]["groups"][0]["members"] == ["m0", "m1", "m2"]
    bad = run_cli("build", *members, "-o", str(tmp_path / "x.onnx"), "--fusion", "fast")
    assert bad.returncode == 2
    assert "invalid choice: 'fast'" in bad.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_layer_names_that_collide_after_lowering_and_integer_inputs():
    import keras

    import fuser

    def named(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((6,), name="features")
        hidden = keras.layers.Dense(4, activation="relu", name="d")(inputs)
        hidden = keras.layers.Dense(4, name="d_activation")(hidden)
        return keras.Model(inputs, keras.layers.Activation("relu")(hidden))

    members = [(f"m{seed}", named(seed)) for seed in range(2)]
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    stacked = fuser.build(members, fusion="on")
    assert len(stacked.fusion.groups) == 1
    np.testing.assert_allclose(
        stacked.predict(x), fuser.build(members, fusion="off").predict(x), atol=1e-6
    )

    def counts(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((6,), dtype="int32", name="counts")
        hidden = keras.layers.Dense(3)(keras.ops.cast(inputs, "float32"))
        return keras.Model(inputs, hidden)

    integer = fuser.build([(f"c{seed}", counts(seed)) for seed in range(2)], fusion="on")
    assert integer.fusion.groups == []
    assert "dtype int32; fusion supports float32 inputs" in integer.fusion.plain["c0"]
