"""Batch scoring on a local Ray instance: a million rows, each scored exactly once."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import N_FEATURES

import fuser
import runtime
from runtime.ray_scoring import Scorer, score

ray = pytest.importorskip("ray")

ROWS = 1_000_000
COLUMNS = [f"f{index:02d}" for index in range(N_FEATURES)]


def features_of(ids: np.ndarray) -> np.ndarray:
    """Deterministic features of row ids, so any worker can make any row."""
    angles = ids[:, None].astype(np.float64) * 0.001 + np.arange(N_FEATURES)[None, :]
    return np.sin(angles).astype(np.float32) * 2


def _with_features(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = features_of(batch["id"])
    return {"id": batch["id"], **{column: values[:, i] for i, column in enumerate(COLUMNS)}}


@pytest.fixture(scope="module")
def artifact(members_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ray") / "ensemble.onnx"
    return fuser.build([members_dir / "a.keras", members_dir / "b.h5"]).save(path)


@pytest.fixture(scope="module")
def local_ray():
    # Workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_million_rows_are_scored_exactly_once_as_one_process_scores_them(artifact, local_ray):
    table = ray.data.range(ROWS, override_num_blocks=16).map_batches(_with_features)
    # Two workers of half a CPU each leave room on this 2-CPU instance for the read tasks.
    scored = score(
        table, artifact, feature_columns=COLUMNS, batch_size=8192, concurrency=2, num_cpus=0.5
    )
    ids, predictions = [], []
    for batch in scored.iter_batches(batch_size=100_000, batch_format="numpy"):
        ids.append(batch["id"])
        predictions.append(batch["prediction"])
    ids, predictions = np.concatenate(ids), np.concatenate(predictions)
    assert len(ids) == ROWS
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], np.arange(ROWS))  # every row once, none twice
    expected = runtime.load(artifact).predict(features_of(np.arange(ROWS)), batch_size=65536)
    np.testing.assert_allclose(predictions[order], expected, atol=1e-6)


def test_scorer_reads_tensor_or_scalar_columns_and_names_what_is_missing(artifact):
    ids = np.arange(10)
    x = features_of(ids)
    expected = runtime.load(artifact).predict(x)
    scalar = Scorer(artifact, feature_columns=COLUMNS, output_column="p")
    out = scalar({"id": ids, **{column: x[:, i] for i, column in enumerate(COLUMNS)}})
    np.testing.assert_array_equal(out["p"], expected)
    assert set(out) == {"id", "p", *COLUMNS}
    tensor = Scorer(artifact, keep_columns=False)
    out = tensor({"features": x})
    assert set(out) == {"prediction"}
    np.testing.assert_array_equal(out["prediction"], expected)
    with pytest.raises(ValueError, match=r"lacks the input columns \['features'\]"):
        tensor({"id": ids})
    with pytest.raises(ValueError, match=r"lacks the feature columns \['f19'\]"):
        scalar({column: x[:, i] for i, column in enumerate(COLUMNS[:-1])})
