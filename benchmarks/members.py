"""The member families and their files: seeded random-weight Keras models, saved as .keras.

No training is needed to compare serving speed, but the outputs must not be trivial, so
every member gets its own seed and the CNN's batch normalisation gets random statistics.
A member set of size N is the family's first N members, so sets share their files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Family:
    """A kind of member: how one is built, and the input it takes."""

    name: str
    description: str
    input_name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    build: Callable[[int], Any]  # seed -> keras.Model


def _mlp(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((20,), name="features")
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    outputs = keras.layers.Dense(5, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs)


def _cnn(seed: int, size: int = 32) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="image")
    hidden = inputs
    for filters, pooling in ((16, keras.layers.MaxPooling2D()), (32, None)):
        hidden = keras.layers.Conv2D(filters, 3)(hidden)
        hidden = keras.layers.BatchNormalization()(hidden)
        hidden = keras.layers.ReLU()(hidden)
        if pooling is not None:
            hidden = pooling(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    model = keras.Model(inputs, outputs)
    _randomise_batch_norm(model, np.random.default_rng(seed))
    return model


def _randomise_batch_norm(model: Any, rng: np.random.Generator) -> None:
    """Give batch normalisation the statistics training would, so it is not an identity."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.8, 1.2, size).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.1, size).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.0, 0.1, size).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, size).astype("float32"))


def cnn_family(name: str, size: int) -> Family:
    """The small CNN on ``size`` x ``size`` x 3 images (the suite's ``cnn``: 32)."""
    return Family(
        name=name,
        description=(
            f"CNN {size}×{size}×3 → Conv2D(16, 3)+BN+ReLU+MaxPool → Conv2D(32, 3)+BN+ReLU"
            "+GlobalAvgPool → Dense(10, softmax), 5.6k parameters"
        ),
        input_name="image",
        input_shape=(size, size, 3),
        build=lambda seed: _cnn(seed, size),
    )


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="mlp",
            description="MLP 20 → 64 → 64 → 5 (softmax), 5.8k parameters",
            input_name="features",
            input_shape=(20,),
            build=_mlp,
        ),
        cnn_family("cnn", 32),
    )
}


def write_members(family: Family, count: int, directory: Path) -> list[Path]:
    """Save the family's first ``count`` members as ``.keras`` files in ``directory``.

    Member ``k`` of every family has its own seed, so a rerun writes the same weights.
    Files already there are kept (a rerun into the same directory reuses them).
    """
    directory.mkdir(parents=True, exist_ok=True)
    family_offset = 1000 * (sorted(FAMILIES).index(family.name) + 1)
    paths = []
    for index in range(count):
        path = directory / f"{family.name}_{index:02d}.keras"
        if not path.exists():
            family.build(family_offset + index).save(path)
        paths.append(path)
    return paths


def random_inputs(family: Family, rows: int, seed: int) -> np.ndarray:
    """Standard normal float32 inputs for the family, the same for every approach."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, *family.input_shape)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MemberSet:
    """N members of one family and every artifact the approaches serve them from.

    Attributes:
        member_paths: the members as ``.keras`` files.
        member_onnx_paths: each member alone as an ONNX file (a one-member fuser build).
        fused_onnx_path, fused_keras_path: the fused ensemble of all N members, plain
            graph (``--fusion off``).
        fused_stacked_onnx_path: the same, same-architecture members stacked
            (``--fusion on``).
    """

    family: str
    member_paths: tuple[Path, ...]
    member_onnx_paths: tuple[Path, ...]
    fused_onnx_path: Path
    fused_keras_path: Path
    fused_stacked_onnx_path: Path

    @property
    def size(self) -> int:
        return len(self.member_paths)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return FAMILIES[self.family].input_shape

    def to_json(self) -> str:
        return json.dumps(
            {
                "family": self.family,
                "member_paths": [str(path) for path in self.member_paths],
                "member_onnx_paths": [str(path) for path in self.member_onnx_paths],
                "fused_onnx_path": str(self.fused_onnx_path),
                "fused_keras_path": str(self.fused_keras_path),
                "fused_stacked_onnx_path": str(self.fused_stacked_onnx_path),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> MemberSet:
        data = json.loads(text)
        return cls(
            family=data["family"],
            member_paths=tuple(Path(path) for path in data["member_paths"]),
            member_onnx_paths=tuple(Path(path) for path in data["member_onnx_paths"]),
            fused_onnx_path=Path(data["fused_onnx_path"]),
            fused_keras_path=Path(data["fused_keras_path"]),
            fused_stacked_onnx_path=Path(data["fused_stacked_onnx_path"]),
        )


@contextlib.contextmanager
def workdir_or_temporary(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """``workdir`` (created, and kept), or a temporary directory removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as directory:
            yield Path(directory)


def wide_mlp(seed: int, width: int) -> Any:
    """An MLP 64 -> width -> width -> 10 (softmax) with seeded random weights: large members."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name="features")
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    hidden = keras.layers.Dense(width, activation="relu")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs)
