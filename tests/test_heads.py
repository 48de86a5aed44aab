"""Heads, uncertainty outputs and selection: every output equals a NumPy reference computed
here, independently, from the members run one by one, in the ONNX and SavedModel artifacts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import N_CLASSES, N_FEATURES, reference_outputs
from scipy.special import softmax

import fuser
import runtime
from fuser import FuseError
from fuser.cli import main

# Builds fused groups: CI runs these with oneDNN on and off.
pytestmark = pytest.mark.fusion

CLASSIFIERS = ["a.keras", "b.h5", "c_export", "d_tfsave"]


# -- members of every task -------------------------------------------------------------


def _mlp(seed, outputs, activation, *, compile_logits=False):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((N_FEATURES,), name="features")
    hidden = keras.layers.Dense(12, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(outputs, activation=activation)(hidden))
    if compile_logits:
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def task_members(tmp_path_factory, members_dir):
    """Three members per task: regressors (2 values), logits classifiers, binary sigmoids."""
    root = tmp_path_factory.mktemp("task_members")
    families = {"classifier": [members_dir / name for name in CLASSIFIERS]}
    for family, (outputs, activation, logits) in {
        "regressor": (2, None, False),
        "logits": (N_CLASSES, None, True),
        "binary": (1, "sigmoid", False),
    }.items():
        paths = []
        for seed in range(3):
            path = root / f"{family}_{seed}.keras"
            _mlp(100 + seed, outputs, activation, compile_logits=logits).save(path)
            paths.append(path)
        families[family] = paths
    return families


def _member_stack(paths, x):
    """(members, rows, ...) float64: each member run on its own, the way a user would."""
    return np.stack([outputs[0] for outputs in reference_outputs(paths, x)]).astype(np.float64)


# -- independent NumPy references ------------------------------------------------------


def _probabilities(values, task):
    if task == "logits":
        return softmax(values, axis=-1)
    if values.shape[-1] == 1:
        return np.concatenate([1 - values, values], axis=-1)
    return values


def _layout(probabilities, columns):
    return probabilities[..., 1:] if columns == 1 else probabilities


def _expected(head, values, task, weights=None):
    columns = values.shape[-1]
    if task == "regression":
        if head == "mean":
            return values.mean(axis=0)
        if head == "weighted":
            return np.einsum("m,m...->...", np.asarray(weights) / np.sum(weights), values)
        if head == "median":
            return np.median(values, axis=0)
    probabilities = _probabilities(values, task)
    if head == "mean":
        combined = probabilities.mean(axis=0)
    elif head == "weighted":
        combined = np.einsum("m,m...->...", np.asarray(weights) / np.sum(weights), probabilities)
    elif head == "median":
        combined = np.median(probabilities, axis=0)
        combined = combined / combined.sum(axis=-1, keepdims=True)
    elif head == "geometric":
        combined = softmax(np.log(np.clip(probabilities, 1e-12, None)).mean(axis=0), axis=-1)
    elif head == "vote":
        labels = probabilities.argmax(axis=-1)  # (members, rows)
        classes = probabilities.shape[-1]
        combined = np.stack([(labels == k).mean(axis=0) for k in range(classes)], axis=-1)
    return _layout(combined, columns)


def _entropy(p):
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)


def _expected_extras(values, prediction, task):
    columns = values.shape[-1]
    extras = {"members": np.moveaxis(values, 0, 1)}
    if task == "regression":
        extras["std"] = values.std(axis=0)
        return extras
    probabilities = _probabilities(values, task)
    extras["std"] = _layout(probabilities, columns).std(axis=0)
    extras["entropy"] = _entropy(_probabilities(prediction, "probabilities"))
    extras["mutual_info"] = _entropy(probabilities.mean(axis=0)) - _entropy(probabilities).mean(
        axis=0
    )
    return extras


CASES = [
    ("classifier", "mean", "probabilities"),
    ("classifier", "weighted", "probabilities"),
    ("classifier", "median", "probabilities"),
    ("classifier", "geometric", "probabilities"),
    ("classifier", "vote", "probabilities"),
    ("regressor", "mean", "regression"),
    ("regressor", "weighted", "regression"),
    ("regressor", "median", "regression"),
    ("logits", "geometric", "logits"),
    ("logits", "vote", "logits"),
    ("logits", "mean", "logits"),
    ("binary", "median", "probabilities"),
    ("binary", "vote", "probabilities"),
]


@pytest.mark.parametrize(("family", "head", "task"), CASES, ids=lambda v: str(v))
def test_every_head_and_extra_output_equals_numpy_in_onnx_and_savedmodel(
    task_members, tmp_path, family, head, task
):
    paths = task_members[family]
    weights = [3.0, 1.0, 2.0, 0.5][: len(paths)] if head == "weighted" else None
    ensemble = fuser.build(
        paths, head, weights=weights, uncertainty=True, expose_members=True, probe_batch=5
    )
    assert ensemble.tasks["prediction"].kind == task
    x = np.random.default_rng(7).normal(size=(17, N_FEATURES)).astype(np.float32)
    values = _member_stack(paths, x)
    prediction = _expected(head, values, task, weights)
    expected = {"prediction": prediction, **_expected_extras(values, prediction, task)}
    artifacts = [tmp_path / "fused.onnx", tmp_path / "fused_savedmodel"]
    if all(path.suffix in (".keras", ".h5") for path in paths):
        artifacts.append(tmp_path / "fused.keras")  # keras.ops heads load in safe mode
    for artifact in artifacts:
        ensemble.save(artifact)
        results = runtime.load(artifact).predict(x)
        assert set(results) == set(expected)
        for name, want in expected.items():
            np.testing.assert_allclose(results[name], want, atol=2e-5, err_msg=f"{artifact} {name}")


def test_stack_head_is_fitted_on_validation_data_and_written_as_plain_layers(members_dir, tmp_path):
    paths = [members_dir / name for name in CLASSIFIERS]
    rng = np.random.default_rng(3)
    x_val = rng.normal(size=(120, N_FEATURES)).astype(np.float32)
    # Labels that the members only partly agree with: mostly member b's argmax.
    y_val = _member_stack(paths[1:2], x_val)[0].argmax(axis=-1)
    flip = rng.random(len(y_val)) < 0.2
    y_val[flip] = rng.integers(0, N_CLASSES, flip.sum())
    np.savez(tmp_path / "val.npz", x=x_val, y=y_val)
    ensemble = fuser.build(paths, "stack", fit_data=tmp_path / "val.npz")
    fitted = ensemble.manifest["head"]["params"]["prediction"]
    weights, bias = np.array(fitted["member_weights"]), np.array(fitted["class_bias"])
    assert np.all(weights >= 0) and weights.argmax() == 1, "member b explains the labels best"

    x = rng.normal(size=(9, N_FEATURES)).astype(np.float32)
    values = _member_stack(paths, x)
    logits = np.einsum("m,mrc->rc", weights, np.log(np.clip(values, 1e-12, None))) + bias
    ensemble.save(tmp_path / "stack.onnx")
    ensemble.save(tmp_path / "stack_savedmodel")
    for artifact in ("stack.onnx", "stack_savedmodel"):
        got = runtime.load(tmp_path / artifact).predict(x)
        np.testing.assert_allclose(got, softmax(logits, axis=-1), atol=1e-4)
    validation = ensemble.manifest["validation"]["outputs"]["prediction"]
    assert validation["metric"] == "log_loss" and validation["ensemble_is_in_sample"]
    assert validation["ensemble"] < min(validation["members"].values())


def test_stack_head_fits_ridge_regression_for_regressors(task_members, tmp_path):
    paths = task_members["regressor"]
    rng = np.random.default_rng(5)
    x_val = rng.normal(size=(200, N_FEATURES)).astype(np.float32)
    values = _member_stack(paths, x_val)
    y_val = 0.7 * values[0] + 0.3 * values[2] + 0.1
    ensemble = fuser.build(paths, "stack", fit_data={"x": x_val, "y": y_val})
    assert ensemble.manifest["head"]["params"]["prediction"]["model"] == "ridge regression"
    x = rng.normal(size=(11, N_FEATURES)).astype(np.float32)
    ensemble.save(tmp_path / "ridge.onnx")
    got = runtime.load(tmp_path / "ridge.onnx").predict(x)
    want = 0.7 * _member_stack(paths, x)[0] + 0.3 * _member_stack(paths, x)[2] + 0.1
    np.testing.assert_allclose(got, want, atol=0.05)


def test_vote_agrees_with_scikit_learn_hard_voting_on_every_row_ties_included(
    members_dir, tmp_path
):
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.ensemble import VotingClassifier

    class Fixed(ClassifierMixin, BaseEstimator):
        """Predicts fixed labels per row index (column 0 of X): a member, for scikit-learn."""

        def __init__(self, labels=None):
            self.labels = labels

        def fit(self, X, y):
            self.classes_ = np.unique(y)
            return self

        def predict(self, X):
            return self.labels[np.asarray(X)[:, 0].astype(int)]

    paths = [members_dir / name for name in CLASSIFIERS]  # four voters: ties happen
    x = np.random.default_rng(11).normal(size=(400, N_FEATURES)).astype(np.float32)
    labels = _member_stack(paths, x).argmax(axis=-1)
    rows = np.arange(len(x))[:, None]
    voting = VotingClassifier(
        [(f"m{i}", Fixed(member_labels)) for i, member_labels in enumerate(labels)], voting="hard"
    )
    voting.fit(rows, np.arange(len(x)) % N_CLASSES)
    ensemble = fuser.build(paths, "vote")
    ensemble.save(tmp_path / "vote.onnx")
    shares = runtime.load(tmp_path / "vote.onnx").predict(x)
    ties = sum(np.sum(row == row.max()) > 1 for row in shares)
    assert ties > 10, "the test needs rows where the vote is tied"
    np.testing.assert_array_equal(shares.argmax(axis=1), voting.predict(rows))


def test_task_is_inferred_from_activation_loss_and_values(task_members, members_dir):
    cases = {
        "regressor": ("regression", "linear output"),
        "logits": ("logits", "from_logits=True"),
        "binary": ("probabilities", "positive class"),
    }
    for family, (kind, reason) in cases.items():
        ensemble = fuser.build(task_members[family][:2])
        assert ensemble.tasks["prediction"].kind == kind
        assert reason in ensemble.manifest["tasks"]["prediction"]["reason"]
    saved_models = fuser.build([members_dir / "c_export", members_dir / "d_tfsave"])
    assert saved_models.tasks["prediction"].kind == "probabilities"
    assert "distributions" in saved_models.tasks["prediction"].reason
    forced = fuser.build(task_members["regressor"][:2], task="logits")
    assert forced.tasks["prediction"].to_manifest() == {
        "task": "logits",
        "reason": "given with --task",
    }


def test_members_that_disagree_on_the_task_are_refused_naming_each(task_members, members_dir):
    with pytest.raises(FuseError, match=r"disagree on what output 'prediction' is") as caught:
        fuser.build([members_dir / "a.keras", task_members["logits"][0]])
    assert 'member "a": probabilities' in str(caught.value)
    assert 'member "logits_0": logits' in str(caught.value)


def _validation_npz(tmp_path, paths, rows=150, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, N_FEATURES)).astype(np.float32)
    y = _member_stack(paths[:1], x)[0].argmax(axis=-1)  # member 0 is right by construction
    noisy = rng.random(rows) < 0.3
    y[noisy] = rng.integers(0, N_CLASSES, noisy.sum())
    np.savez(tmp_path / "val.npz", x=x, y=y)
    return tmp_path / "val.npz", x, y


def test_top_k_selection_keeps_the_best_members_and_leaves_the_rest_out_of_the_graph(
    members_dir, tmp_path
):
    paths = [members_dir / name for name in CLASSIFIERS]
    val, _, _ = _validation_npz(tmp_path, paths)
    ensemble = fuser.build(paths, fit_data=val, select="top:2", fusion="off")
    record = ensemble.manifest["validation"]
    scores = record["outputs"]["prediction"]["members"]
    best_two = sorted(scores, key=scores.get)[:2]
    assert sorted(record["selection"]["kept"]) == sorted(best_two)
    assert "a" in best_two
    assert [member["name"] for member in ensemble.manifest["members"]] == [
        name for name in ("a", "b", "c_export", "d_tfsave") if name in best_two
    ]
    branches = [layer.name for layer in ensemble.model.layers if layer.name.startswith("member_")]
    assert len(branches) == 2


def test_greedy_selection_turns_pick_counts_into_weights(members_dir, tmp_path):
    paths = [members_dir / name for name in CLASSIFIERS]
    val, _x_val, _y_val = _validation_npz(tmp_path, paths)
    ensemble = fuser.build(paths, fit_data=val, select="greedy:6")
    selection = ensemble.manifest["validation"]["selection"]
    picks = selection["picks"]
    assert sum(picks.values()) == 6 and picks["a"] >= 1
    kept = [name for name in ("a", "b", "c_export", "d_tfsave") if picks[name]]
    assert selection["kept"] == kept
    assert ensemble.head.name == "weighted"
    np.testing.assert_allclose(
        ensemble.manifest["head"]["params"]["weights"], [picks[name] / 6 for name in kept]
    )
    # The greedy ensemble scores at least as well as the best single member on validation.
    outputs = ensemble.manifest["validation"]["outputs"]["prediction"]
    assert outputs["ensemble"] <= min(outputs["members"].values()) + 1e-9


@pytest.fixture(scope="module")
def regressor_val(task_members, tmp_path_factory):
    path = tmp_path_factory.mktemp("val") / "regressor_val.npz"
    x = np.random.default_rng(2).normal(size=(40, N_FEATURES)).astype(np.float32)
    np.savez(path, x=x, y=np.zeros((40, 2), np.float32))
    return path


BAD_OPTIONS = [
    (["--head", "weighted", "--weights", "1,2"], r"--weights gives 2 weights for 4 members"),
    (["--head", "weighted", "--weights", "1,-2,1,1"], r"non-negative.*got 1, -2, 1, 1"),
    (["--head", "weighted", "--weights", "1,x,1,1"], r"--weights expects numbers"),
    (["--head", "weighted", "--weights", "0,0,0,0"], r"must not all be zero"),
    (["--head", "weighted"], r"'weighted' head needs weights"),
    (["--head", "mean", "--weights", "1,1,1,1"], r"--weights applies to the 'weighted' head"),
    (["--head", "stack"], r"'stack' head needs validation data: pass --fit-data"),
    (["--select", "top:2"], r"--select top:2 needs validation data"),
    (["--select", "best:2", "--fit-data", "{val}"], r"--select expects top:K or greedy:K"),
    (["--select", "top:9", "--fit-data", "{val}"], r"keeps more members than the 4 given"),
    (["--head", "vote", "--select", "greedy:3", "--fit-data", "{val}"], r"cannot feed the 'vote'"),
    (["--head", "stack", "--fit-data", "{missing}"], r"missing\.npz does not exist"),
    (["--head", "stack", "--fit-data", "{wide}"], r"inputs of wide\.npz do not fit.*\(None, 20\)"),
    (["--head", "stack", "--fit-data", "{no_y}"], r"no_y\.npz has arrays 'x'; expected 'y'"),
    (["--head", "stack", "--fit-data", "{bad_labels}"], r"class indices 0 to 4; got values"),
    (["--head", "stack", "--fit-data", "{short_y}"], r"same number of rows; got features: 30"),
    (["--select", "top:2", "--metric", "auc", "--fit-data", "{val}"], r"Unknown metric 'auc'"),
    (["--head", "bagging"], r"Unknown head 'bagging'; choose one of: mean, weighted"),
    (["--task", "ranking"], r"Unknown task 'ranking'"),
    (["--task", "scores=logits"], r"--task names output 'scores'"),
]


@pytest.mark.parametrize(("options", "pattern"), BAD_OPTIONS, ids=[p for _, p in BAD_OPTIONS])
def test_bad_head_options_exit_2_with_one_sentence(members_dir, tmp_path, capsys, options, pattern):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, N_FEATURES)).astype(np.float32)
    files = {
        "val": ("val.npz", {"x": x, "y": np.arange(30) % N_CLASSES}),
        "wide": ("wide.npz", {"x": rng.normal(size=(30, 7)), "y": np.arange(30) % N_CLASSES}),
        "no_y": ("no_y.npz", {"x": x}),
        "bad_labels": ("bad_labels.npz", {"x": x, "y": np.arange(30) + 3}),
        "short_y": ("short_y.npz", {"x": x, "y": np.arange(12) % N_CLASSES}),
    }
    names = {"missing": str(tmp_path / "missing.npz")}
    for key, (name, arrays) in files.items():
        np.savez(tmp_path / name, **arrays)
        names[key] = str(tmp_path / name)
    argv = ["build", *(str(members_dir / name) for name in CLASSIFIERS)]
    argv += ["-o", str(tmp_path / "x.onnx"), "-q"]
    argv += [option.format(**names) for option in options]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert re.search(pattern, error), error
    assert "Traceback" not in error
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    ("head", "pattern"),
    [
        ("vote", r"The 'vote' head combines logits or probabilities outputs, but output "),
        ("geometric", r"The 'geometric' head combines .* output 'prediction' is a regression"),
    ],
)
def test_classification_heads_on_a_regressor_are_refused(task_members, head, pattern, capsys):
    argv = ["build", *(str(path) for path in task_members["regressor"]), "-o", "x.onnx"]
    assert main([*argv, "--head", head, "-q"]) == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_accuracy_metric_on_a_regressor_is_refused(task_members, regressor_val):
    with pytest.raises(FuseError, match=r"The metric 'accuracy' scores classifiers"):
        fuser.build(
            task_members["regressor"], fit_data=regressor_val, select="top:1", metric="accuracy"
        )


def test_inspect_shows_tasks_validation_and_selection(members_dir, tmp_path, capsys):
    paths = [members_dir / name for name in CLASSIFIERS]
    val, _, _ = _validation_npz(tmp_path, paths)
    target = tmp_path / "selected.onnx"
    argv = ["build", *(str(path) for path in paths), "-o", str(target), "-q"]
    assert main([*argv, "--select", "top:3", "--fit-data", str(val), "--uncertainty"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(target)]) == 0
    text = capsys.readouterr().out
    assert "task       prediction: probabilities (softmax output)" in text
    assert "selection  top:3 by log_loss" in text
    assert "validation prediction log_loss" in text
    assert main(["inspect", str(target), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert [spec["name"] for spec in manifest["outputs"]] == [
        "prediction",
        "std",
        "entropy",
        "mutual_info",
    ]


def test_several_outputs_get_their_own_task_stacker_and_prefixed_extras(members_dir, tmp_path):
    paths = [members_dir / "multi_a.keras", members_dir / "multi_b.keras"]
    rng = np.random.default_rng(9)
    x = {"num": rng.normal(size=(60, 4)), "cat": rng.normal(size=(60, 3))}
    x = {name: value.astype(np.float32) for name, value in x.items()}
    members = reference_outputs(paths, x)  # per member: [score, probs]
    score_values = np.stack([outputs[0] for outputs in members]).astype(np.float64)
    probs_values = np.stack([outputs[1] for outputs in members]).astype(np.float64)
    fit = {
        "x_num": x["num"],
        "x_cat": x["cat"],
        "y_score": 0.5 * score_values[0] + 0.5 * score_values[1],
        "y_probs": probs_values[1].argmax(axis=-1),
    }
    ensemble = fuser.build(paths, "stack", fit_data=fit, uncertainty=True)
    assert {name: task.kind for name, task in ensemble.tasks.items()} == {
        "score": "regression",
        "probs": "probabilities",
    }
    assert [spec.name for spec in ensemble.outputs] == [
        "score",
        "score_std",
        "probs",
        "probs_std",
        "probs_entropy",
        "probs_mutual_info",
    ]
    params = ensemble.manifest["head"]["params"]
    assert params["score"]["model"] == "ridge regression"
    assert params["probs"]["model"].startswith("multinomial logistic regression")
    ensemble.save(tmp_path / "multi.onnx")
    got = runtime.load(tmp_path / "multi.onnx").predict(x)
    np.testing.assert_allclose(got["score"], fit["y_score"], atol=0.05)
    np.testing.assert_allclose(got["score_std"], score_values.std(axis=0), atol=1e-5)
    assert (got["probs"].argmax(axis=-1) == fit["y_probs"]).mean() > 0.9


def test_select_on_several_outputs_is_refused(members_dir):
    paths = [members_dir / "multi_a.keras", members_dir / "multi_b.keras"]
    rng = np.random.default_rng(1)
    fit = {
        "x_num": rng.normal(size=(20, 4)).astype(np.float32),
        "x_cat": rng.normal(size=(20, 3)).astype(np.float32),
        "y_score": np.zeros((20, 1)),
        "y_probs": np.arange(20) % 3,
    }
    with pytest.raises(FuseError, match=r"--select scores members on one output"):
        fuser.build(paths, fit_data=fit, select="top:1")
