"""The cascade head (``--head cascade``): each row runs only the stages it needs.

Every artifact is compared with a NumPy routing computed here, independently, from the
members run one by one and the thresholds the manifest records: the same rows must
leave at the same stage, with the answer of the members they ran.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import N_CLASSES, N_FEATURES, mlp, reference_outputs
from scipy.special import softmax

import fuser
import runtime
from fuser import FuseError, VerificationError
from fuser.cli import main
from fuser.heads import CascadeHead
from fuser.heads.calibration import Expectation
from fuser.heads.thresholds import search_thresholds
from runtime.backends import open_backend

# Three cheap-to-costly members and a pair of the same architecture (stackable).
MEMBERS = {"small": (31, 3), "mid": (32, 24), "big_a": (33, 40), "big_b": (34, 40)}
# Costs per row given to the head, so that most builds here time nothing.
COSTS = {"small": 1.0, "mid": 8.0, "big_a": 20.0, "big_b": 20.0}
FORMATS = ("cascade.onnx", "cascade_savedmodel", "cascade.keras")


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cascade_members")
    paths = {}
    for name, (seed, width) in MEMBERS.items():
        paths[name] = root / f"{name}.keras"
        mlp(seed, width=width).save(paths[name])
    return paths


def _values(paths, x) -> np.ndarray:
    """(members, rows, classes) float64: each member run on its own."""
    return np.stack([out[0] for out in reference_outputs(list(paths), x)]).astype(np.float64)


@pytest.fixture(scope="module")
def fit(members) -> dict[str, np.ndarray]:
    """Validation data whose labels are the members' mean argmax, a fifth of them noisy."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, N_FEATURES)).astype(np.float32)
    y = _values(members.values(), x).mean(axis=0).argmax(axis=-1)
    noisy = rng.random(len(y)) < 0.2
    y[noisy] = rng.integers(0, N_CLASSES, noisy.sum())
    return {"x": x, "y": y}


def _cascade(**options) -> CascadeHead:
    options.setdefault("costs", COSTS)
    options.setdefault("tolerance", 0.05)  # lets many rows leave early
    return CascadeHead(**options)


@pytest.fixture(scope="module")
def built(members, fit, tmp_path_factory):
    """A cascade with exit_stage and uncertainty, written in every format."""
    out = tmp_path_factory.mktemp("cascade_artifacts")
    ensemble = fuser.build(
        list(members.values()),
        _cascade(exit_stage=True),
        fit_data=fit,
        uncertainty=True,
        fusion="off",
    )
    return ensemble, {name: ensemble.save(out / name) for name in FORMATS}


# -- an independent NumPy reference ------------------------------------------------------


def _route(values, params, names, *, task="probabilities"):
    """Prediction, exit stage and the uncertainty outputs over the members each row ran."""
    if task == "logits":
        probabilities = softmax(values, axis=-1)
    elif values.shape[-1] == 1:
        probabilities = np.concatenate([1 - values, values], axis=-1)
    else:
        probabilities = values
    weights = params.get("weights", {name: 1.0 for name in names})
    rows = values.shape[1]
    stages = [[names.index(name) for name in stage["members"]] for stage in params["stages"]]
    exit_stage = np.full(rows, len(stages))
    combined = np.zeros((len(stages), rows, probabilities.shape[-1]))
    running, total = 0.0, 0.0
    for number, stage in enumerate(stages):
        for index in stage:
            running = running + weights[names[index]] * probabilities[index]
            total += weights[names[index]]
        combined[number] = running / total
    confidence = combined.max(axis=-1)
    if params["confidence"] == "margin":
        ordered = np.sort(combined, axis=-1)
        confidence = ordered[..., -1] - ordered[..., -2]
    left = np.zeros(rows, dtype=bool)
    for number, stage in enumerate(params["stages"][:-1]):
        if stage["threshold"] is not None:
            leaving = ~left & (confidence[number] >= stage["threshold"])
            exit_stage[leaving] = number + 1
            left |= leaving
    chosen = combined[exit_stage - 1, np.arange(rows)]
    near = np.zeros(rows, dtype=bool)
    for number, stage in enumerate(params["stages"][:-1]):
        if stage["threshold"] is not None:
            near |= np.abs(confidence[number] - stage["threshold"]) < 1e-5
    extras = {"std": [], "entropy": [], "mutual_info": []}
    for row in range(rows):
        ran = [index for stage in stages[: exit_stage[row]] for index in stage]
        member = probabilities[ran, row]
        layout = member[:, 1:] if values.shape[-1] == 1 else member
        extras["std"].append(layout.std(axis=0))
        extras["entropy"].append(_entropy(chosen[row]))
        extras["mutual_info"].append(_entropy(member.mean(axis=0)) - _entropy(member).mean())
    prediction = chosen[:, 1:] if values.shape[-1] == 1 else chosen
    expected = {"prediction": prediction, "exit_stage": exit_stage.astype(np.float64)}
    expected.update({name: np.array(value) for name, value in extras.items()})
    return expected, near


def _entropy(p):
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)


def _assert_routes_like_reference(results, expected, near, what):
    far = ~near
    assert near.sum() <= 1, "the test needs rows clear of the thresholds"
    np.testing.assert_array_equal(
        results["exit_stage"][far], expected["exit_stage"][far], err_msg=what
    )
    for name, want in expected.items():
        if name in results:
            np.testing.assert_allclose(
                results[name][far], want[far], atol=2e-5, err_msg=f"{what} {name}"
            )


def _names(paths):
    return [Path(path).stem for path in paths]


def _rows(count, seed):
    return np.random.default_rng(seed).normal(size=(count, N_FEATURES)).astype(np.float32)


# -- round trips -------------------------------------------------------------------------


def test_every_format_routes_rows_like_numpy_with_uncertainty_over_members_that_ran(built, members):
    ensemble, artifacts = built
    params = ensemble.manifest["head"]["params"]
    x = _rows(200, 8)
    expected, near = _route(_values(members.values(), x), params, _names(members.values()))
    assert len(set(expected["exit_stage"])) >= 3, "rows must leave at several stages"
    for name, path in artifacts.items():
        results = runtime.load(path).predict(x)
        assert list(results) == ["prediction", "exit_stage", "std", "entropy", "mutual_info"]
        _assert_routes_like_reference(results, expected, near, name)
        # Another batch size: the routing is per row, whatever the batch.
        again = runtime.load(path).predict(x[:37])
        np.testing.assert_array_equal(again["exit_stage"], results["exit_stage"][:37])


def test_a_row_that_ran_one_member_has_no_disagreement(built):
    _, artifacts = built
    x = _rows(200, 8)
    results = runtime.load(artifacts["cascade.onnx"]).predict(x)
    first = results["exit_stage"] == 1
    assert first.any()
    np.testing.assert_allclose(results["std"][first], 0.0, atol=1e-6)
    np.testing.assert_allclose(results["mutual_info"][first], 0.0, atol=1e-6)
    assert np.all(results["mutual_info"][~first] > -1e-6)


@pytest.mark.parametrize("artifact", FORMATS)
def test_routing_of_empty_single_and_uniform_batches(built, members, artifact):
    """An empty batch, one row, a batch where every row leaves at stage 1 (later stages
    see no rows) and one where none does, straight through each format's backend."""
    ensemble, artifacts = built
    params = ensemble.manifest["head"]["params"]
    backend = open_backend(artifacts[artifact])
    pool = _rows(400, 9)
    expected, near = _route(_values(members.values(), pool), params, _names(members.values()))
    last = len(params["stages"])
    easy = np.flatnonzero((expected["exit_stage"] == 1) & ~near)[:25]
    hard = np.flatnonzero((expected["exit_stage"] == last) & ~near)[:25]
    assert len(easy) and len(hard)
    empty = backend.run({"features": pool[:0]})
    assert empty["prediction"].shape == (0, N_CLASSES) and empty["exit_stage"].shape == (0,)
    for rows in (easy, hard, easy[:1], hard[:1], np.concatenate([hard, easy])):
        results = backend.run({"features": pool[rows]})
        np.testing.assert_array_equal(results["exit_stage"], expected["exit_stage"][rows])
        np.testing.assert_allclose(results["prediction"], expected["prediction"][rows], atol=2e-5)


def test_build_verifies_the_routing_on_the_probe_batch_and_every_validation_row(built, fit):
    _, artifacts = built
    for path in artifacts.values():
        manifest = runtime.load(path).manifest
        for record in manifest["verification"]["routing"].values():
            assert record["exit_stages"] == "compared"
            assert record["fit_rows"] == len(fit["y"])
            assert record["fit_rows_routed_otherwise"] == 0
            assert record["probe_rows"] == 8


def test_calibration_meets_the_tolerance_and_keeps_thresholds_clear_of_every_fit_row(
    built, members, fit
):
    ensemble, _ = built
    params = ensemble.manifest["head"]["params"]
    names = _names(members.values())
    expected, _ = _route(_values(members.values(), fit["x"]), params, names)
    accuracy = np.mean(expected["prediction"].argmax(axis=-1) == fit["y"])
    full_params = {**params, "stages": [{"members": names, "threshold": None}]}
    full, _ = _route(_values(members.values(), fit["x"]), full_params, names)
    full_accuracy = np.mean(full["prediction"].argmax(axis=-1) == fit["y"])
    assert accuracy >= full_accuracy - 0.05 - 1e-9
    assert params["fit"] == {
        "source": "fit_data",
        "rows": 300,
        "cascade": pytest.approx(accuracy, abs=1e-6),
        "full": pytest.approx(full_accuracy, abs=1e-6),
        "higher_is_better": True,
    }
    assert params["expected_cost_per_row"] < params["full_cost_per_row"]
    assert sum(stage["exit_rate"] for stage in params["stages"]) == pytest.approx(1.0)
    assert [stage["members"] for stage in params["stages"]] == [
        ["small"],
        ["mid"],
        ["big_a"],
        ["big_b"],
    ]
    validation = ensemble.manifest["validation"]["outputs"]["prediction"]
    assert validation["ensemble"] is not None and validation["full_ensemble"] is not None
    # No fit row reaching a stage lies within the margin of its threshold.
    probabilities = _values(members.values(), fit["x"])
    running = np.cumsum(probabilities, axis=0) / np.arange(1, 5)[:, None, None]
    confidence = running.max(axis=-1)
    for number, stage in enumerate(params["stages"][:-1]):
        reaching = expected["exit_stage"] > number
        if stage["threshold"] is not None:
            gap = np.abs(confidence[number, reaching] - stage["threshold"])
            assert gap.min() > params["threshold_margin"]


def test_a_stricter_tolerance_costs_more_and_loses_nothing(members, fit):
    paths = list(members.values())
    loose = fuser.build(paths, _cascade(tolerance=0.1), fit_data=fit, fusion="off")
    strict = fuser.build(paths, _cascade(tolerance=0.0), fit_data=fit, fusion="off")
    loose_params, strict_params = (e.manifest["head"]["params"] for e in (loose, strict))
    assert strict_params["fit"]["cascade"] >= strict_params["fit"]["full"] - 1e-9
    assert strict_params["expected_cost_per_row"] >= loose_params["expected_cost_per_row"]


def test_cascade_order_is_respected(members, fit, tmp_path):
    order = ["big_b", "small", "mid", "big_a"]
    ensemble = fuser.build(
        list(members.values()), _cascade(order=order), fit_data=fit, fusion="off"
    )
    params = ensemble.manifest["head"]["params"]
    assert [stage["members"] for stage in params["stages"]] == [[name] for name in order]
    assert params["order"] == "as given (--cascade-order)"
    path = ensemble.save(tmp_path / "ordered.onnx")
    x = _rows(120, 3)
    expected, near = _route(_values(members.values(), x), params, _names(members.values()))
    results = runtime.load(path).predict(x)
    np.testing.assert_allclose(results[~near], expected["prediction"][~near], atol=2e-5)


def test_stages_are_timed_on_this_machine_and_run_cheapest_first(members, fit):
    ensemble = fuser.build(
        [members["big_a"], members["small"], members["mid"]],
        "cascade",
        fit_data=fit,
        fusion="off",
        cascade_tolerance=0.05,
    )
    params = ensemble.manifest["head"]["params"]
    assert params["cost_unit"] == "ms" and "ONNX Runtime" in params["cost_source"]
    costs = [stage["cost_per_row"] for stage in params["stages"]]
    assert costs == sorted(costs)
    assert params["order"] == "cheapest first, by the measured cost per row"
    assert all(stage["cost_batch_1"] > 0 for stage in params["stages"])


@pytest.mark.fusion
def test_a_stacked_group_is_one_stage(members, fit, tmp_path):
    ensemble = fuser.build(
        list(members.values()), _cascade(exit_stage=True), fit_data=fit, fusion="on"
    )
    params = ensemble.manifest["head"]["params"]
    assert ["big_a", "big_b"] in [stage["members"] for stage in params["stages"]]
    assert [group["members"] for group in ensemble.manifest["fusion"]["groups"]] == [
        ["big_a", "big_b"]
    ]
    x = _rows(150, 4)
    expected, near = _route(_values(members.values(), x), params, _names(members.values()))
    for name in ("stacked.onnx", "stacked_savedmodel", "stacked.keras"):
        results = runtime.load(ensemble.save(tmp_path / name)).predict(x)
        _assert_routes_like_reference(results, expected, near, name)


@pytest.mark.fusion
def test_cascade_order_that_splits_a_stacked_group_keeps_its_members_plain(
    members, fit, monkeypatch
):
    from fuser.fusion import policy

    monkeypatch.setattr(policy, "keeps_plain", lambda group: None)  # auto fuses
    order = ["big_a", "small", "big_b", "mid"]
    ensemble = fuser.build(list(members.values()), _cascade(order=order), fit_data=fit)
    assert ensemble.manifest["fusion"]["groups"] == []
    assert (
        "--cascade-order puts big_a, big_b in different stages"
        in (ensemble.manifest["fusion"]["plain"]["big_a"])
    )
    stages = ensemble.manifest["head"]["params"]["stages"]
    assert [stage["members"] for stage in stages] == [[name] for name in order]


def test_exit_stage_is_an_optional_output(members, fit, tmp_path):
    ensemble = fuser.build(list(members.values()), _cascade(), fit_data=fit, fusion="off")
    assert [spec.name for spec in ensemble.outputs] == ["prediction"]
    x = _rows(60, 2)
    params = ensemble.manifest["head"]["params"]
    expected, near = _route(_values(members.values(), x), params, _names(members.values()))
    for name in FORMATS:
        served = runtime.load(ensemble.save(tmp_path / name))
        assert [spec.name for spec in served.outputs] == ["prediction"]
        got = served.predict(x)
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got[~near], expected["prediction"][~near], atol=2e-5)
        routing = served.manifest["verification"]["routing"]
        assert routing["artifact"]["exit_stages"] == "inferred from the prediction"
        assert routing["fused_model"]["exit_stages"] == "compared"


def test_greedy_selection_weights_the_cascade(members, fit, tmp_path):
    ensemble = fuser.build(
        list(members.values()), _cascade(), fit_data=fit, select="greedy:6", fusion="off"
    )
    params = ensemble.manifest["head"]["params"]
    picks = ensemble.manifest["validation"]["selection"]["picks"]
    kept = [name for name in MEMBERS if picks[name]]
    assert params["combination"] == "weighted"
    assert params["weights"] == {name: pytest.approx(picks[name] / 6) for name in kept}
    x = _rows(100, 6)
    paths = [members[name] for name in kept]
    expected, near = _route(_values(paths, x), params, kept)
    got = runtime.load(ensemble.save(tmp_path / "greedy.onnx")).predict(x)
    np.testing.assert_allclose(got[~near], expected["prediction"][~near], atol=2e-5)


@pytest.mark.parametrize("kind", ["logits", "binary"])
def test_logits_and_one_column_members_are_routed_on_probabilities(tmp_path, kind):
    import keras

    paths = []
    for seed, width in ((41, 2), (42, 16), (43, 32)):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((N_FEATURES,), name="features")
        hidden = keras.layers.Dense(width, activation="tanh")(inputs)
        if kind == "logits":
            model = keras.Model(inputs, keras.layers.Dense(N_CLASSES)(hidden))
            model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        else:
            model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))
        paths.append(tmp_path / f"{kind}{seed}.keras")
        model.save(paths[-1])
    x = _rows(200, 7)
    values = _values(paths, x)
    task = "logits" if kind == "logits" else "probabilities"
    probabilities = softmax(values, axis=-1) if kind == "logits" else values
    y = (
        probabilities.mean(axis=0).argmax(axis=-1)
        if kind == "logits"
        else (probabilities.mean(axis=0)[:, 0] > 0.5).astype(int)
    )
    costs = {path.stem: float(index + 1) for index, path in enumerate(paths)}
    ensemble = fuser.build(
        paths,
        CascadeHead(costs=costs, tolerance=0.05, confidence="margin", exit_stage=True),
        fit_data={"x": x, "y": y},
        fusion="off",
    )
    params = ensemble.manifest["head"]["params"]
    assert params["confidence"] == "margin"
    test = _rows(150, 11)
    expected, near = _route(_values(paths, test), params, _names(paths), task=task)
    results = runtime.load(ensemble.save(tmp_path / f"{kind}.onnx")).predict(test)
    assert results["prediction"].shape == (150, N_CLASSES if kind == "logits" else 1)
    _assert_routes_like_reference(results, expected, near, kind)


# -- safe mode, oneDNN ---------------------------------------------------------------------


@pytest.mark.slow
def test_keras_artifact_loads_in_safe_mode_in_a_fresh_process(built):
    _, artifacts = built
    script = textwrap.dedent(
        """
        import sys, numpy as np, runtime
        model = runtime.load(sys.argv[1])
        out = model.predict(np.zeros((3, 20), np.float32))
        print(sorted(out), out["exit_stage"].tolist())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(artifacts["cascade.keras"])],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'exit_stage'" in done.stdout


def _cnn(seed, *, grouped):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    if grouped:
        x = keras.layers.Conv2D(4, 3, groups=4, padding="same", activation="relu")(x)
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES, activation="softmax")(x))


@pytest.mark.slow
@pytest.mark.fusion
def test_stages_of_grouped_convolutions_that_no_row_reaches_run_with_onednn_on_and_off(
    tmp_path,
):
    """TensorFlow's oneDNN grouped convolution fails on an empty batch: a stage no row
    reaches must be skipped there, in every artifact TensorFlow runs."""
    paths = []
    for seed, grouped in ((51, False), (52, True), (53, True)):
        paths.append(tmp_path / f"cnn{seed}.keras")
        _cnn(seed, grouped=grouped).save(paths[-1])
    x = np.random.default_rng(1).normal(size=(60, 8, 8, 3)).astype(np.float32)
    y = _values(paths, x).mean(axis=0).argmax(axis=-1)
    head = CascadeHead(
        order=[path.stem for path in paths],
        costs={path.stem: 1.0 + index for index, path in enumerate(paths)},
        tolerance=1.0,  # anything goes: every row leaves at stage 1
        exit_stage=True,
    )
    ensemble = fuser.build(paths, head, fit_data={"x": x, "y": y}, fusion="on")
    assert ensemble.manifest["fusion"]["groups"], "the grouped CNNs should be stacked"
    np.save(tmp_path / "x.npy", x[:5])
    for name in ("cnn_savedmodel", "cnn.keras", "cnn.onnx"):
        artifact = ensemble.save(tmp_path / name)
        for onednn in ("0", "1"):
            output = tmp_path / f"{name}_{onednn}.npz"
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fuser",
                    "predict",
                    str(artifact),
                    "--input",
                    str(tmp_path / "x.npy"),
                    "--output",
                    str(output),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3"},
                timeout=300,
            )
            assert done.returncode == 0, f"{name} oneDNN={onednn}: {done.stderr[-1500:]}"
            with np.load(output) as results:
                np.testing.assert_array_equal(results["exit_stage"], 1.0)


# -- the NumPy pieces --------------------------------------------------------------------


def _outcome(confidence, bad, cost, thresholds):
    """Total cost, total badness and exit stages of thresholds, by brute force."""
    exit_stage = np.full(confidence.shape[1], len(cost))
    left = np.zeros(confidence.shape[1], dtype=bool)
    for number, threshold in enumerate(thresholds):
        if threshold is not None:
            leaving = ~left & (confidence[number] >= threshold)
            exit_stage[leaving] = number + 1
            left |= leaving
    through = np.concatenate([[0.0], np.cumsum(cost)])
    rows = np.arange(confidence.shape[1])
    return through[exit_stage].sum(), bad[exit_stage - 1, rows].sum(), exit_stage


def test_threshold_search_matches_an_exhaustive_search_and_keeps_clear_of_rows():
    import itertools

    rng = np.random.default_rng(0)
    worse = 0
    for _ in range(40):
        stages, rows = 3, 30
        confidence = np.round(rng.random((stages, rows)) * 0.9 + 0.1, 2)
        bad = (rng.random((stages, rows)) < np.array([[0.4], [0.25], [0.1]])).astype(float)
        cost = np.array([1.0, 3.0, 9.0])
        allowed = bad[-1].sum() + 1
        margin = 1e-3
        chosen = search_thresholds(confidence, bad, cost, allowed, margin, 0.0)
        cost_found, bad_found, exit_stage = _outcome(confidence, bad, cost, chosen)
        assert bad_found <= allowed
        for number, threshold in enumerate(chosen):
            if threshold is not None:
                reaching = exit_stage > number
                assert np.abs(confidence[number, reaching] - threshold).min() > margin
        candidates = []
        for number in range(stages - 1):
            levels = np.unique(np.concatenate([confidence[number], [0.0]]))
            candidates.append([None, *((levels[:-1] + levels[1:]) / 2)])
        outcomes = [
            _outcome(confidence, bad, cost, combo) for combo in itertools.product(*candidates)
        ]
        best = min(total for total, errors, _ in outcomes if errors <= allowed)
        worse += cost_found > best + 1e-9
    assert worse <= 2


def _expectation(margin):
    confidence = np.array([[0.9, 0.5, 0.70000001], [1.0, 1.0, 1.0]])
    candidates = {
        "prediction": np.array([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3]),
        "exit_stage": np.array([[1.0] * 3, [2.0] * 3]),
    }
    return Expectation(
        candidates, confidence, np.array([1, 2, 1]), [0.7], margin, "prediction", "exit_stage"
    )


def test_a_row_within_float_error_of_a_threshold_may_go_either_way_others_may_not():
    results = {"prediction": np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])}
    results["exit_stage"] = np.array([1.0, 2.0, 2.0])  # row 2 lies 1e-8 above 0.7
    want, otherwise = _expectation(1e-5).expected(results, "The artifact")
    assert otherwise == 1
    np.testing.assert_array_equal(want["prediction"], results["prediction"])
    with pytest.raises(
        VerificationError, match=r"routes 1 of 3 rows otherwise .*\(row 2: stage 2, expected 1\)"
    ):
        _expectation(0.0).expected(results, "The artifact")
    results["exit_stage"] = np.array([2.0, 2.0, 1.0])  # row 0: 0.9, far above
    with pytest.raises(VerificationError, match=r"row 0: stage 2, expected 1"):
        _expectation(1e-5).expected(results, "The artifact")


# -- refusals ------------------------------------------------------------------------------

REFUSALS = [
    ({"fit_data": None}, r"'cascade' head needs validation data: pass --fit-data"),
    ({"members": ["small"]}, r"needs at least 2 members \(one stage each\); got 1"),
    (
        {"members": "regressors"},
        r"routes rows by the confidence of a classifier's prediction, but output 'prediction' is a regression",
    ),
    (
        {"members": "two_outputs"},
        r"confidence of one output, but this ensemble has outputs score, probs",
    ),
    (
        {"expose_members": True},
        r"--expose-members gives every member's output .* drop --expose-members",
    ),
    ({"xla": True}, r"--xla compiles fixed shapes.*drop --xla"),
    (
        {"cascade_order": ["small", "mid", "nobody"]},
        r"--cascade-order must name every member once.*unknown nobody; missing big_a, big_b",
    ),
    ({"cascade_order": ["small", "small", "mid", "big_a", "big_b"]}, r"repeated small"),
    ({"cascade_tolerance": -0.1}, r"--cascade-tolerance must be a number of at least 0"),
    (
        {"cascade_confidence": "entropy"},
        r"--cascade-confidence must be one of max, margin; got 'entropy'",
    ),
    (
        {"head": "mean", "cascade_order": ["small"]},
        r"--cascade-order applies to the 'cascade' head, not 'mean'",
    ),
    (
        {"head": "vote", "cascade_tolerance": 0.1, "cascade_exit_stage": True},
        r"--cascade-tolerance, --cascade-exit-stage apply to the 'cascade' head",
    ),
    (
        {"weights": [1, 1, 1, 1], "select": "greedy:3"},
        r"--weights and --select greedy:K both weigh",
    ),
    ({"weights": [1, 2]}, r"--weights gives 2 weights for 4 members"),
    (
        {"members": ["big_a", "big_b"], "fusion": "stack"},
        r"--fusion on runs every member \(big_a, big_b\) as one fused computation, which leaves the cascade a single stage",
    ),
    (
        {"cascade_order": ["big_a", "small", "big_b", "mid"], "fusion": "stack"},
        r"--cascade-order puts big_a, big_b in different stages, but --fusion on",
    ),
]


@pytest.mark.parametrize(("options", "pattern"), REFUSALS, ids=[p for _, p in REFUSALS])
def test_what_the_cascade_cannot_do_is_refused_in_one_sentence(
    members, fit, task_paths, options, pattern
):
    options = dict(options)
    chosen = options.pop("members", list(MEMBERS))
    paths = task_paths[chosen] if isinstance(chosen, str) else [members[name] for name in chosen]
    data = task_paths[f"{chosen}_fit"] if isinstance(chosen, str) else fit
    options.setdefault("fit_data", data)
    options.setdefault("head", "cascade")
    with pytest.raises(FuseError, match=pattern) as caught:
        fuser.build(paths, **options)
    assert len(caught.value.problems) == 1, caught.value.problems


@pytest.fixture(scope="module")
def task_paths(tmp_path_factory, members_dir):
    import keras

    root = tmp_path_factory.mktemp("cascade_tasks")
    regressors = []
    for seed in (61, 62):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((N_FEATURES,), name="features")
        regressors.append(root / f"regressor{seed}.keras")
        keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(regressors[-1])
    two = [members_dir / "multi_a.keras", members_dir / "multi_b.keras"]
    rng = np.random.default_rng(0)
    return {
        "regressors": regressors,
        "regressors_fit": {"x": _rows(20, 1), "y": rng.normal(size=(20, 2))},
        "two_outputs": two,
        "two_outputs_fit": {
            "x_num": rng.normal(size=(20, 4)).astype(np.float32),
            "x_cat": rng.normal(size=(20, 3)).astype(np.float32),
            "y_score": np.zeros((20, 1)),
            "y_probs": np.arange(20) % 3,
        },
    }


# -- the command line ------------------------------------------------------------------------


def test_cli_builds_a_cascade_and_inspect_prints_its_stages(members, fit, tmp_path, capsys):
    np.savez(tmp_path / "val.npz", x=fit["x"], y=fit["y"])
    target = tmp_path / "cli.onnx"
    argv = ["build", *(f"{name}={path}" for name, path in members.items())]
    argv += ["-o", str(target), "-q", "--head", "cascade", "--fit-data", str(tmp_path / "val.npz")]
    argv += ["--cascade-order", "small,mid,big_a,big_b", "--cascade-tolerance", "0.05"]
    argv += ["--cascade-confidence", "margin", "--cascade-exit-stage", "--fusion", "off"]
    assert main(argv) == 0, capsys.readouterr().err
    served = runtime.load(target)
    params = served.manifest["head"]["params"]
    assert [stage["members"] for stage in params["stages"]] == [
        ["small"],
        ["mid"],
        ["big_a"],
        ["big_b"],
    ]
    assert params["tolerance"] == 0.05 and params["confidence"] == "margin"
    assert [spec.name for spec in served.outputs] == ["prediction", "exit_stage"]
    capsys.readouterr()
    assert main(["inspect", str(target)]) == 0
    text = capsys.readouterr().out
    assert re.search(
        r"^cascade    4 stages, margin confidence, as given \(--cascade-order\); accuracy within 0\.05 of the full ensemble$",
        text,
        re.M,
    ), text
    assert re.search(
        r"^stage 1    small: threshold [\d.]+, cost \S+ ms per row, leaves [\d.]+% \(reaches 100\.0%\)$",
        text,
        re.M,
    ), text
    assert re.search(
        r"^stage 4    big_b: last, cost \S+ ms per row, leaves [\d.]+% \(reaches [\d.]+%\)$",
        text,
        re.M,
    ), text
    assert re.search(
        r"^expected   cost per row \S+ ms against \S+ for the full ensemble \([\d.]+x less\); accuracy [\d.]+ against [\d.]+ on val\.npz \(300 rows\)$",
        text,
        re.M,
    ), text
    assert main(["inspect", str(target), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["head"]["name"] == "cascade"


def test_cli_refuses_cascade_options_without_the_cascade_head(members, tmp_path, capsys):
    argv = ["build", *(str(path) for path in members.values()), "-o", str(tmp_path / "x.onnx")]
    argv += ["-q", "--cascade-order", "small,mid", "--cascade-exit-stage"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--cascade-order, --cascade-exit-stage apply to the 'cascade' head, not 'mean'" in error
    assert not (tmp_path / "x.onnx").exists()


# -- the benchmark ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cascade_benchmark_measures_both_artifacts_side_by_side(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cascade", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "cascade.json").read_text())
    assert results["timing_process"]["tensorflow_imported"] is False
    assert set(results["throughput"]) == {"full", "cascade"}
    for name in ("full", "cascade"):
        assert set(results["latency_batch_1"][name]) == {"easy", "hard"}
    assert sum(results["test"]["exit_rates"]) == pytest.approx(1.0)
    assert len(results["curve"]["calibrated"]) == 8
    report = (tmp_path / "CASCADE.md").read_text()
    assert "| test accuracy |" in report and "throughput at batch 1024" in report
    assert (tmp_path / "cascade_curve.png").stat().st_size > 10_000
