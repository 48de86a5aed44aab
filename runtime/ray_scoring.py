"""Batch scoring on Ray Data: one artifact load per worker, one forward pass per block.

    >>> import ray
    >>> from runtime.ray_scoring import score
    >>> table = ray.data.read_parquet("s3://bucket/rows/")
    >>> scored = score(table, "ensemble.onnx", feature_columns=[f"f{i}" for i in range(20)])
    >>> scored.write_parquet("s3://bucket/scored/")

``score`` is ``Dataset.map_batches`` with ``Scorer``, a callable class, so each Ray worker
(an actor) loads and verifies the artifact once and then scores block after block; the
same code runs on a laptop's local Ray or a cluster (``ray.init(address=...)``), as long
as every node can read the artifact path. Ray is not a dependency of fuser: install it
(``pip install "ray[data]"``) where you score.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np


class Scorer:
    """A ``map_batches`` callable: the batch's columns in, the same columns plus outputs out.

    Args:
        artifact: the fused artifact, readable from every worker.
        feature_columns: for a one-input model with inputs of shape ``(None, F)``, the
            ``F`` scalar columns stacked in order into the input. Without it, the input
            is the column named like the model's input (an ``(N, ...)`` tensor column);
            several inputs are always taken from the columns of their names.
        output_column: the column the output goes to, for a one-output model (default:
            the output's name); several outputs each go to the column of their name.
        keep_columns: keep the batch's columns beside the outputs (default), or return
            only the outputs.
        threads: ONNX Runtime intra-op threads per worker (default 1: Ray runs one worker
            per CPU it schedules).
        verify: check the artifact's digests when each worker loads it.
    """

    def __init__(
        self,
        artifact: str | os.PathLike,
        *,
        feature_columns: Sequence[str] | None = None,
        output_column: str | None = None,
        keep_columns: bool = True,
        threads: int | None = 1,
        verify: bool = True,
    ) -> None:
        import runtime
        from runtime.readers import artifact_format

        kind = artifact_format(artifact)
        self.model = runtime.load(
            artifact, verify=verify, threads=threads if kind == "onnx" else None
        )
        self.feature_columns = list(feature_columns) if feature_columns is not None else None
        if self.feature_columns is not None and len(self.model.inputs) != 1:
            raise ValueError(
                f"feature_columns applies to one-input models; this one takes "
                f"{[spec.name for spec in self.model.inputs]}, read from the columns of those names."
            )
        names = [spec.name for spec in self.model.outputs]
        if output_column is not None and len(names) != 1:
            raise ValueError(
                f"output_column applies to one-output models; this one answers {names}, "
                "each written to the column of its name."
            )
        self.output_columns = (
            {names[0]: output_column or names[0]}
            if len(names) == 1
            else {name: name for name in names}
        )
        self.keep_columns = keep_columns

    def inputs(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's inputs taken from a batch's columns."""
        if self.feature_columns is not None:
            missing = [column for column in self.feature_columns if column not in batch]
            if missing:
                raise ValueError(
                    f"The batch lacks the feature columns {missing}; it has {sorted(batch)}."
                )
            columns = [np.asarray(batch[column]) for column in self.feature_columns]
            return {self.model.inputs[0].name: np.stack(columns, axis=1)}
        names = [spec.name for spec in self.model.inputs]
        missing = [name for name in names if name not in batch]
        if missing:
            raise ValueError(
                f"The batch lacks the input columns {missing} (it has {sorted(batch)}); name "
                "the columns after the inputs, or pass feature_columns for a one-input model."
            )
        return {name: np.asarray(batch[name]) for name in names}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.model.predict(self.inputs(batch), as_dict=True)
        result = dict(batch) if self.keep_columns else {}
        for name, column in self.output_columns.items():
            result[column] = outputs[name]
        return result


def score(
    dataset: Any,
    artifact: str | os.PathLike,
    *,
    feature_columns: Sequence[str] | None = None,
    output_column: str | None = None,
    keep_columns: bool = True,
    batch_size: int = 4096,
    concurrency: int | tuple[int, int] | None = None,
    num_cpus: float = 1.0,
    threads: int | None = 1,
    verify: bool = True,
) -> Any:
    """Score a Ray ``Dataset`` with a fused artifact; returns the lazy scored ``Dataset``.

    ``batch_size`` rows go through each forward pass; ``concurrency`` is the number of
    workers (an int, or a ``(min, max)`` autoscaling range; default: as many as fit in
    the cluster's CPUs with one CPU left for reading); ``num_cpus`` what each worker
    reserves. The other arguments are ``Scorer``'s.
    """
    if concurrency is None:
        import ray

        cpus = ray.cluster_resources().get("CPU", 1)
        concurrency = max(1, int((cpus - 1) / num_cpus))
    return dataset.map_batches(
        Scorer,
        fn_constructor_args=(os.fspath(artifact),),
        fn_constructor_kwargs={
            "feature_columns": feature_columns,
            "output_column": output_column,
            "keep_columns": keep_columns,
            "threads": threads,
            "verify": verify,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
        num_cpus=num_cpus,
    )
