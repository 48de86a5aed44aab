"""Every bad input gets one clear sentence naming the member, before anything is built."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import CUSTOM_LAYER_MODULE

import fuser
import runtime
from fuser import FuseError
from runtime.describe import describe

# (members, options, pattern the FuseError must match)
BAD_BUILDS = [
    pytest.param([], {}, r"No members were given", id="no-members"),
    pytest.param(
        ["missing.keras"],
        {},
        r'Member "missing": .*missing\.keras does not exist',
        id="missing-path",
    ),
    pytest.param(
        ["empty.keras"], {}, r'Member "empty": .*empty\.keras is an empty file', id="empty-file"
    ),
    pytest.param(
        ["random.keras"],
        {},
        r'Member "random": .*random\.keras is not a zip archive',
        id="random-keras",
    ),
    pytest.param(
        ["random.h5"], {}, r'Member "random": .*random\.h5 is not a HDF5 file', id="random-h5"
    ),
    pytest.param(
        ["notes.txt"], {}, r'Member "notes.txt": .*notes\.txt is not a model file', id="text-file"
    ),
    pytest.param(
        ["truncated.keras"],
        {},
        r'Member "truncated": .*truncated\.keras is a damaged zip archive: truncated or corrupted',
        id="truncated-keras",
    ),
    pytest.param(
        ["corrupt.keras"],
        {},
        r"corrupt\.keras is a damaged zip archive \(entry 'model\.weights\.h5' fails its CRC check\)",
        id="corrupt-keras",
    ),
    pytest.param(
        ["empty_dir"], {}, r'Member "empty_dir": .*empty_dir is an empty directory', id="empty-dir"
    ),
    pytest.param(
        ["not_a_savedmodel"], {}, r"is a directory without saved_model\.pb", id="dir-not-savedmodel"
    ),
    pytest.param(
        ["weights_only.weights.h5"], {}, r"weights-only file \(\.weights\.h5\)", id="weights-only"
    ),
    pytest.param(
        ["lambda.keras"],
        {},
        r'Member "lambda" \(lambda\.keras\) .*Lambda layer.*--unsafe',
        id="lambda-safe-mode",
    ),
    pytest.param(
        ["a.keras", "a=b.h5"],
        {},
        r'Member "a" \(b\.h5\) has the same name as Member "a" \(a\.keras\)',
        id="duplicate-names",
    ),
    pytest.param(
        ["a.keras", "conv.keras"],
        {},
        r'Member "conv" \(conv\.keras\) expects input \'image\' of shape \(None, 8, 8, 1\), but member "a" \(a\.keras\) expects \(None, 20\)',
        id="input-shape",
    ),
    pytest.param(
        ["a.keras", "int_input.keras"],
        {},
        r'Member "int_input" \(int_input\.keras\) expects input .* of dtype int32, but member "a" \(a\.keras\) expects float32',
        id="input-dtype",
    ),
    pytest.param(
        ["a.keras", "multi_a.keras"],
        {},
        r'Member "multi_a" \(multi_a\.keras\) has 2 inputs \(num, cat\), but member "a" \(a\.keras\) has 1',
        id="input-count",
    ),
    pytest.param(
        ["multi_a.keras", "a.keras"],
        {},
        r'Member "a" \(a\.keras\) has 1 inputs .* members must have the same number of inputs',
        id="input-count-reversed",
    ),
    pytest.param(
        ["a.keras", "three_classes.keras"],
        {},
        r'Member "three_classes" \(three_classes\.keras\) produces output .* of shape \(None, 3\), but member "a" \(a\.keras\) produces \(None, 5\)',
        id="output-shape",
    ),
    pytest.param(
        ["a.keras"],
        {"head": "median-of-medians"},
        r"Unknown head 'median-of-medians'; choose one of: mean",
        id="unknown-head",
    ),
    pytest.param(
        ["a.keras"], {"jobs": 0}, r"jobs must be a positive integer, got 0", id="bad-jobs"
    ),
    pytest.param(
        ["multi_a.keras"],
        {"input_name": "x"},
        r"--input-name applies to members with one input",
        id="input-name-multi",
    ),
    pytest.param(
        ["a.keras"],
        {"input_name": "bad name!"},
        r"not a valid tensor name",
        id="input-name-invalid",
    ),
    pytest.param(
        ["bad name=a.keras"], {}, r"has an invalid name 'bad name'", id="member-name-invalid"
    ),
    pytest.param(
        ["no_signature"],
        {},
        r'Member "no_signature" \(no_signature\) is a SavedModel without a \'serving_default\' '
        r"signature \(signatures found: none\); export it with model\.export\(\)",
        id="savedmodel-without-signature",
    ),
    pytest.param(
        ["invalid_dtype"],
        {},
        r'Member "invalid_dtype" \(invalid_dtype\) has a signature tensor \'.+\' without a known '
        r"dtype \(it is not a plain tensor\); export the model with a signature of plain tensors",
        id="savedmodel-signature-without-dtype",
    ),
    pytest.param(
        ["string_input"],
        {},
        r'Member "string_input" \(string_input\) expects input \'x\' of dtype string, but fused '
        r"inputs must be numbers or booleans",
        id="savedmodel-string-input",
    ),
    pytest.param(
        ["ragged_input"],
        {},
        r'Member "ragged_input" \(ragged_input\) fails when run on the probe batch '
        r"\(InvalidArgumentError, --debug shows it\);.*ragged and sparse inputs are not supported",
        id="savedmodel-ragged-input",
    ),
    pytest.param(
        ["random.onnx"],
        {},
        r'Member "random\.onnx": .*random\.onnx is named as an ONNX model, and fuser does not '
        r"take those as members; give the Keras or TensorFlow model it came from \(a \.keras "
        r"file, a legacy \.h5 file or a SavedModel directory\)\.",
        id="onnx-member",
    ),
    pytest.param(
        ["random.tflite"],
        {},
        r"random\.tflite is named as a TensorFlow Lite model, and fuser does not take those",
        id="tflite-member",
    ),
    pytest.param(
        ["c_export/saved_model.pb"],
        {},
        r"saved_model\.pb is the graph file of a SavedModel; give its directory .*c_export\.",
        id="saved-model-pb-file",
    ),
    pytest.param(
        ["a.keras", "rank3.keras"],
        {},
        r'Member "rank3" \(rank3\.keras\) expects input \'features\' of shape \(None, 4, 5\), '
        r'but member "a" \(a\.keras\) expects \(None, 20\)',
        id="input-rank",
    ),
    pytest.param(
        ["a.keras", "overflow.keras"],
        {},
        r'Member "overflow" \(overflow\.keras\) gives non-finite values on the probe batch: '
        r"\d+ of 40 values of output 'scores' are NaN or inf \(\d+ NaN, \d+ inf\); fix the "
        r"member, or pass --allow-nonfinite \(allow_nonfinite=True\) to build anyway\.",
        id="nonfinite-member",
    ),
    pytest.param(
        ["a.keras"],
        {"allow_nonfinite": "yes"},
        r"allow_nonfinite must be True or False, got 'yes'",
        id="allow-nonfinite-not-bool",
    ),
]


@pytest.mark.parametrize(("members", "options", "pattern"), BAD_BUILDS)
def test_bad_build_is_refused_with_a_clear_sentence(members_dir, members, options, pattern):
    with pytest.raises(FuseError, match=pattern):
        fuser.build([_resolve(members_dir, member) for member in members], **options)


def test_several_inputs_with_different_names_say_which_names_each_member_has(members_dir, tmp_path):
    import keras

    left = keras.Input((4,), name="num")
    right = keras.Input((3,), name="category")
    model = keras.Model(
        [left, right], keras.layers.Dense(1)(keras.layers.Concatenate()([left, right]))
    )
    model.save(tmp_path / "renamed.keras")
    with pytest.raises(FuseError) as caught:
        fuser.build([members_dir / "multi_a.keras", tmp_path / "renamed.keras"])
    assert (
        "Member \"renamed\" (renamed.keras) has inputs named ['num', 'category'], but "
        "member \"multi_a\" (multi_a.keras) has ['num', 'cat']; members with several inputs "
        "are matched by input name."
    ) in str(caught.value)


def test_all_problems_are_reported_at_once(members_dir):
    with pytest.raises(FuseError) as caught:
        fuser.build(
            [members_dir / "missing.keras", members_dir / "empty.keras", members_dir / "random.h5"]
        )
    assert len(caught.value.problems) == 3
    assert [problem.split(":")[0] for problem in caught.value.problems] == [
        'Member "missing"',
        'Member "empty"',
        'Member "random"',
    ]


def test_incompatibilities_are_reported_together(members_dir):
    with pytest.raises(FuseError) as caught:
        fuser.build(
            [members_dir / name for name in ("a.keras", "conv.keras", "three_classes.keras")]
        )
    text = str(caught.value)
    assert 'Member "conv"' in text and 'Member "three_classes"' in text


def test_unsafe_mode_loads_a_lambda_member(members_dir, features):
    import keras

    ensemble = fuser.build([members_dir / "lambda.keras"], safe_mode=False)
    model = keras.models.load_model(members_dir / "lambda.keras", safe_mode=False)
    assert abs(ensemble.predict(features) - model(features).numpy()).max() < 1e-5


def test_nonfinite_member_is_refused_alone_before_fusing(members_dir, monkeypatch):
    def must_not_fuse(*args, **kwargs):
        raise AssertionError("the members were fused before the probe batch was checked")

    monkeypatch.setattr(sys.modules["fuser.builder"], "assemble", must_not_fuse)
    with pytest.raises(FuseError) as caught:
        fuser.build([members_dir / "a.keras", members_dir / "overflow.keras"])
    (problem,) = caught.value.problems
    assert problem.startswith('Member "overflow" (overflow.keras) gives non-finite values')


def test_allow_nonfinite_builds_verifies_and_records_the_counts(members_dir, tmp_path, features):
    import keras

    ensemble = fuser.build([members_dir / "overflow.keras"], allow_nonfinite=True)
    member = keras.models.load_model(members_dir / "overflow.keras")
    on_probe = np.asarray(member(ensemble.probe["features"]))
    nan, inf = int(np.isnan(on_probe).sum()), int(np.isinf(on_probe).sum())
    assert nan and inf, "the fixture must give both NaN and inf on the probe batch"

    model = runtime.load(ensemble.save(tmp_path / "nonfinite.onnx"))
    verification = model.manifest["verification"]
    assert verification["nonfinite_allowed"] is True
    assert verification["nonfinite_values"] == {
        "overflow": {"prediction": {"nan": nan, "inf": inf, "values": on_probe.size}}
    }
    assert verification["artifact"]["max_abs_error"] < 1e-4
    for batch in (ensemble.probe["features"], features):
        got, want = model.predict(batch), np.asarray(member(batch))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], atol=1e-6)


def test_allow_nonfinite_with_fit_data_records_non_finite_scores_as_null(
    members_dir, tmp_path, features
):
    fit_data = {"x": features, "y": np.zeros((len(features), 5), np.float32)}
    ensemble = fuser.build(
        [members_dir / "overflow.keras"], allow_nonfinite=True, fit_data=fit_data
    )
    model = runtime.load(ensemble.save(tmp_path / "nonfinite_scored.onnx"))
    record = model.manifest["validation"]["outputs"]["prediction"]
    assert record["members"] == {"overflow": None} and record["ensemble"] is None
    assert "ensemble non-finite; members overflow non-finite" in describe(
        model.manifest, "nonfinite_scored.onnx"
    )


def test_build_without_nonfinite_values_records_none(members_dir):
    assert (
        "nonfinite_allowed" not in fuser.build([members_dir / "a.keras"]).manifest["verification"]
    )


def test_unregistered_custom_layer_is_refused_naming_custom_objects(unregistered_custom_layer):
    path, _ = unregistered_custom_layer
    with pytest.raises(
        FuseError,
        match=r'^Member "custom_layer" \(custom_layer\.keras\) could not be loaded: it uses the '
        r"custom Keras class 'fuser_tests>Scale' \(module 'fuser_test_layers'\), not "
        r"registered in this process; import the module that defines it, or pass "
        r"--custom-objects fuser_test_layers:Scale \(custom_objects=\) for classes you trust\.$",
    ):
        fuser.build([path])


def test_custom_objects_by_class_name_load_a_class_saved_under_a_package(
    unregistered_custom_layer, features
):
    import keras

    path, _ = unregistered_custom_layer
    # The same class where it is loaded, but not registered: the file names it
    # "fuser_tests>Scale", the user names it "Scale".
    scale = type("Scale", (sys.modules[CUSTOM_LAYER_MODULE].Scale,), {})
    ensemble = fuser.build([path], custom_objects={"Scale": scale})
    member = keras.models.load_model(path, custom_objects={"fuser_tests>Scale": scale})
    np.testing.assert_allclose(ensemble.predict(features), member(features), atol=1e-5)


def _resolve(members_dir, member: str) -> str:
    name, _, path = member.rpartition("=")
    return f"{name}={members_dir / path}" if name else str(members_dir / path)
