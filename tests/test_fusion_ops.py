"""Horizontal fusion of members whose graphs hold keras.ops calls (``x + 1.0``, ``ops.relu6``).

Such calls are operations, not layers: the planner reads their constants from the graph,
groups only members that share them, stacks the supported ones and names the others.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_fusion import MLP, TOLERANCE, _inputs, _pair, build_members

import runtime

pytestmark = pytest.mark.fusion


def dense_with_ops(seed: int):
    """Scalar constants on either side, a constant along the last axis, hard sigmoid and
    relu6 as ops, a reshape and a softmax over the last axis, a no-op cast."""
    import keras
    from keras import ops

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((7,), name="features")
    x = keras.layers.Dense(8, activation="relu")(inputs)
    x = 1.0 - ops.hard_sigmoid(x + 1.0) * 2.0
    ramp = np.linspace(-1, 1, 8).astype("float32")
    x = ops.subtract(ramp, x * np.linspace(0.5, 1.5, 8).astype("float32"))  # constant first
    x = ops.relu6(x * 3.0) / 6.0
    x = ops.maximum(ops.power(x, 2.0), 0.01)
    x = ops.softmax(ops.reshape(x, (-1, 2, 4)))
    x = ops.cast(ops.reshape(ops.leaky_relu(x, 0.3), (-1, 8)), "float32")
    x = keras.layers.Dense(8)(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x + 0.5))


def conv_with_ops(seed: int):
    """Squeeze-and-excitation gates broadcast over the image (ops and a Multiply layer,
    the gate first), tensors whose last axes differ (an op and an Add layer), hard swish
    as MobileNetV3 writes it, a constant along the channels."""
    import keras
    from keras import layers, ops

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2), name="image")
    x = layers.Conv2D(4, 3, padding="same")(inputs)
    squeezed = layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = ops.hard_sigmoid(layers.Conv2D(4, 1)(squeezed)) * x
    x = x * ops.sigmoid(layers.Conv2D(1, 1)(x))
    x = layers.Multiply()([layers.Conv2D(4, 1, activation="sigmoid")(squeezed), x])
    x = layers.Add()([x, layers.Conv2D(1, 1)(x)])  # a layer broadcasting the last axis
    x = x * (ops.relu6(x + 3.0) * (1.0 / 6.0))
    x = x + np.array([[[0.1, -0.2, 0.3, -0.4]]], "float32")
    x = layers.DepthwiseConv2D(3)(x)
    x = ops.reshape(ops.log_softmax(x), (-1, 64))
    return keras.Model(inputs, layers.Dense(3)(x))


def shared_ops(seed: int):
    """Operations on the shared input before any weights, once for every member."""
    import keras
    from keras import ops

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,), name="features")
    x = ops.tanh(inputs * 0.5 - np.arange(8, dtype="float32"))
    x = ops.reshape(ops.softmax(ops.reshape(x, (-1, 2, 4))), (-1, 2, 2, 2))
    x = keras.layers.Conv2D(3, 1)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))


@pytest.mark.parametrize(
    "architecture", [dense_with_ops, conv_with_ops, shared_ops], ids=["dense", "conv", "shared"]
)
def test_fused_members_with_operations_equal_plain_in_keras_and_onnx(architecture, tmp_path):
    members = [(f"m{seed}", architecture(seed)) for seed in range(3)]
    plain, stacked = _pair(members)
    (group,) = stacked.fusion.groups
    assert [member.name for member in group.members] == ["m0", "m1", "m2"]
    recorded = {record["type"] for record in group.layers}
    assert any(kind.startswith("keras.ops.") for kind in recorded), recorded
    assert len(group.layers) == len(members[0][1].operations) - 1  # every call but the input's
    x = _inputs(plain, rows=6)
    want = plain.predict(x, as_dict=True)
    got = stacked.predict(x, as_dict=True)
    served = runtime.load(stacked.save(tmp_path / "stacked.onnx")).predict(x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=TOLERANCE, atol=TOLERANCE)
        np.testing.assert_allclose(served[name], want[name], rtol=TOLERANCE, atol=TOLERANCE)


def test_a_keras_artifact_of_stacked_operations_loads_in_safe_mode(tmp_path):
    members = [(f"m{seed}", conv_with_ops(seed)) for seed in range(2)]
    plain, stacked = _pair(members)
    x = _inputs(plain, rows=3)
    loaded = runtime.load(stacked.save(tmp_path / "stacked.keras"))
    want = plain.predict(x, as_dict=True)
    got = loaded.predict(x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=TOLERANCE, atol=TOLERANCE)


def _with_constant(seed: int, constant, *, reversed_order: bool = False):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="features")
    x = keras.layers.Dense(4)(inputs)
    x = constant - x if reversed_order else x - constant
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def test_members_with_different_constants_are_never_stacked_together():
    import fuser

    ramp = np.arange(4, dtype="float32")
    members = [
        ("one_a", _with_constant(1, 1.0)),
        ("two_a", _with_constant(2, 2.0)),
        ("one_b", _with_constant(3, 1.0)),
        ("two_b", _with_constant(4, 2.0)),
        ("flipped_a", _with_constant(5, 1.0, reversed_order=True)),
        ("flipped_b", _with_constant(6, 1.0, reversed_order=True)),
        ("ramp_a", _with_constant(7, ramp)),
        ("ramp_b", _with_constant(8, ramp)),
        ("ramp_other", _with_constant(9, ramp[::-1].copy())),
    ]
    ensemble = fuser.build(members, fusion="on", expose_members=True)
    groups = sorted(
        sorted(member.name for member in group.members) for group in ensemble.fusion.groups
    )
    assert groups == [
        ["flipped_a", "flipped_b"],
        ["one_a", "one_b"],
        ["ramp_a", "ramp_b"],
        ["two_a", "two_b"],
    ]
    assert ensemble.fusion.plain == {"ramp_other": "no other member has the same architecture."}
    plain = fuser.build(members, fusion="off", expose_members=True)
    x = _inputs(plain, rows=4)
    np.testing.assert_allclose(
        ensemble.predict(x, as_dict=True)["members"],
        plain.predict(x, as_dict=True)["members"],
        rtol=TOLERANCE,
        atol=TOLERANCE,
    )


def _refused(operation, *, shape=(4, 8), classes=2):
    """A member computing ``operation`` on a ``(batch, *shape[:-1], 8)`` tensor."""

    def member(seed: int):
        import keras

        keras.utils.set_random_seed(seed)
        inputs = keras.Input(shape, name="features")
        x = keras.layers.Flatten()(operation(keras.layers.Dense(8)(inputs)))
        return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))

    return member


def _ops():
    from keras import ops

    return ops


def _centered(x):
    return x - _ops().mean(x, axis=-1, keepdims=True)


# The operation, its class, and the reason given ({name}: the operation's name in the
# saved member, which Keras numbers: 'mean', 'mean_1'...).
REFUSED = [
    (
        _centered,
        "Mean",
        'operation {name} (keras.ops.mean) of member "c1" (c1.keras) is a tensor operation '
        "(not a layer) without a fused lowering.",
    ),
    (
        lambda x: _ops().transpose(x, (0, 2, 1)),
        "Transpose",
        'operation {name} (keras.ops.transpose) of member "c1" (c1.keras) is a tensor '
        "operation (not a layer) without a fused lowering.",
    ),
    (
        lambda x: x + np.ones((4, 8), "float32"),
        "Add",
        'operation {name} (keras.ops.add) of member "c1" (c1.keras) takes a constant of shape '
        "(4, 8); fusion supports scalars and constants along the last axis.",
    ),
    (
        lambda x: _ops().softmax(x, axis=1),
        "Softmax",
        'operation {name} (keras.ops.softmax) of member "c1" (c1.keras) acts on axis 1, '
        "not on the last one.",
    ),
    (
        lambda x: _ops().reshape(x, (-1, 16)),
        "Reshape",
        'operation {name} (keras.ops.reshape) of member "c1" (c1.keras) reshapes to '
        "(-1, 16), moving values across the batch axis; fusion supports reshapes that keep "
        "the batch first.",
    ),
    (
        lambda x: _ops().cast(_ops().cast(x, "float16"), "float32"),
        "Cast",
        'operation {name} (keras.ops.cast) of member "c1" (c1.keras) computes in float16; '
        "fusion supports float32.",
    ),
]


def _operation_name(model, kind: str) -> str:
    return next(op.name for op in model.operations if type(op).__name__ == kind)


@pytest.mark.parametrize(
    "operation, kind, reason",
    REFUSED,
    ids=["mean", "transpose", "full_constant", "softmax_axis", "reshape_batch", "float16"],
)
def test_an_operation_without_a_lowering_keeps_its_members_plain_naming_it(
    operation, kind, reason, tmp_path
):
    import fuser

    paths = []
    for seed in (1, 2):
        path = tmp_path / f"c{seed}.keras"
        _refused(operation)(seed).save(path)
        paths.append(path)
    ensemble = fuser.build(paths, fusion="on")
    assert ensemble.fusion.groups == []
    name = _operation_name(ensemble.named_members["c1"].model, kind)
    assert ensemble.fusion.plain["c1"] == reason.format(name=repr(name))


def test_auto_builds_a_mixed_ensemble_of_operations_and_other_architectures(tmp_path):
    """The default mode over members with operations (stackable or not) and a different
    architecture: every member is planned, none fails to be read, the build verifies."""
    import fuser

    centered = _refused(_centered, shape=(7,), classes=3)(4)
    members = [
        ("ops_a", dense_with_ops(1)),
        ("mlp", build_members({**MLP, "members": 1}, seed=2)[0][1]),
        ("ops_b", dense_with_ops(3)),
        ("centered", centered),
    ]
    ensemble = fuser.build(members, expose_members=True)
    stacked = [[member.name for member in group.members] for group in ensemble.fusion.groups]
    assert stacked in ([["ops_a", "ops_b"]], []), ensemble.fusion.plain
    if not stacked:  # timed slower on this machine: the reason says so
        assert ensemble.fusion.plain["ops_a"].startswith("--fusion auto measured")
    assert ensemble.fusion.plain["mlp"] == "no other member has the same architecture."
    assert ensemble.fusion.plain["centered"] == (
        f"operation {_operation_name(centered, 'Mean')!r} (keras.ops.mean) of member "
        '"centered" (in memory) is a tensor operation (not a layer) without a fused lowering.'
    )
    assert ensemble.verification["max_abs_error"] <= 1e-4
    plain = fuser.build(members, fusion="off", expose_members=True)
    x = _inputs(plain, rows=5)
    np.testing.assert_allclose(
        runtime.load(ensemble.save(tmp_path / "auto.onnx")).predict(x)["members"],
        plain.predict(x, as_dict=True)["members"],
        rtol=TOLERANCE,
        atol=TOLERANCE,
    )


def _perturbed(model, seed: int):
    """Random weights moved off their initial values: with ``weights=None`` MobileNetV3
    answers the same for every input, which would hide a wrong lowering."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = weight.numpy()
        if "variance" in weight.path:
            value = value * rng.uniform(0.5, 1.5, value.shape)
        else:
            value = value + rng.normal(0, 0.05, value.shape)
        weight.assign(value.astype(value.dtype))
    return model


def test_two_mobilenet_v3_small_members_stack_entirely(tmp_path):
    """Hard sigmoid as ``x + 3.0`` and ``* (1 / 6)``, SE blocks: every layer and op lowered."""
    import keras

    import fuser

    members = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        model = keras.applications.MobileNetV3Small(
            input_shape=(32, 32, 3), weights=None, classes=5, include_preprocessing=True
        )
        members.append((f"mobilenet{seed}", _perturbed(model, seed)))
    ensemble = fuser.build(members, fusion="on", expose_members=True)
    (group,) = ensemble.fusion.groups
    kinds = {record["type"] for record in group.layers}
    assert {"keras.ops.add", "keras.ops.multiply", "Multiply", "Conv2D"} <= kinds
    assert len(group.layers) == len(members[0][1].operations) - 1  # all but the input
    x = np.random.default_rng(1).normal(0, 50, (4, 32, 32, 3)).astype("float32")
    want = np.stack([np.asarray(model(x, training=False)) for _, model in members], axis=1)
    assert np.abs(want[:, 0] - want[:, 1]).max() > 1e-3  # the two members differ
    served = runtime.load(ensemble.save(tmp_path / "mobilenets.onnx")).predict(x)
    for got in (ensemble.predict(x, as_dict=True)["members"], served["members"]):
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)


def test_every_supported_operation_names_a_keras_operation():
    import importlib

    from keras.src.ops.operation import Operation

    from fuser.fusion import lowerings

    known = {
        name
        for module in ("numpy", "nn", "math", "core")
        for name, value in vars(importlib.import_module(f"keras.src.ops.{module}")).items()
        if isinstance(value, type) and issubclass(value, Operation)
    }
    assert not set(lowerings.OPERATIONS) - known, sorted(set(lowerings.OPERATIONS) - known)
