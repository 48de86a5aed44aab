"""Every bad input gets one clear sentence naming the member, before anything is built."""

from __future__ import annotations

import pytest

import fuser
from fuser import FuseError

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
        r'Member "truncated" \(truncated\.keras\) could not be loaded',
        id="truncated-keras",
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


def _resolve(members_dir, member: str) -> str:
    name, _, path = member.rpartition("=")
    return f"{name}={members_dir / path}" if name else str(members_dir / path)
