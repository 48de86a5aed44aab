"""Digits through a confidence cascade: each digit runs only the members it needs.

Trains one small classifier and three larger ones (about 100x its cost) on
scikit-learn's bundled digits (no download), fuses them twice, as the full ensemble
(``--head mean``) and as a cascade (``--head cascade``: the small member first; a digit
leaves as soon as the members run so far are confident enough), both ONNX, and prints:

* held-out accuracy of each member, of the full ensemble and of the cascade, and where
  the test digits leave the cascade;
* the stages the build calibrated on the validation split: order, thresholds, costs
  measured on this machine, and the cost per row it expects;
* how accuracy and cost move as the thresholds vary (calibrated at several tolerances
  on the validation split, scored on the test split), and writes that curve to
  ``OUT/cascade_curve.png``.

    python examples/cascade.py [--out DIR] [--quick]

The same build from the shell: ``fuser build small=... wide=... deep=... conv=... -o
cascade.onnx --head cascade --fit-data val.npz`` (``--cascade-tolerance T``,
``--cascade-order a,b,c``, ``--cascade-exit-stage``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from digits import load_data  # the same split of the digits: train, validation, test

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
TOLERANCES = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "output", help="working directory")
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    arguments = parser.parse_args(argv)
    out: Path = arguments.out / "cascade"
    epochs = 10 if arguments.quick else 40

    shutil.rmtree(out, ignore_errors=True)
    (out / "members").mkdir(parents=True)

    import fuser

    fuser.import_tensorflow()  # before Keras, so TensorFlow's start-up logs stay quiet
    data = load_data()
    print(
        f"Digits: {len(data['x_train'])} training, {len(data['x_val'])} validation, "
        f"{len(data['x_test'])} test images (8x8 pixels, 10 classes).\n"
    )

    print("1. Training one small and three larger classifiers")
    models = train_members(data, epochs=epochs)
    paths = {}
    for name, model in models.items():
        paths[name] = out / "members" / f"{name}.keras"
        model.save(paths[name])
    members = [f"{name}={path}" for name, path in paths.items()]

    print("\n2. Fusing them: the full ensemble, and a cascade calibrated on the validation split")
    started = time.perf_counter()
    full = fuser.build(members, "mean")
    full_path = full.save(out / "full.onnx")
    validation = {"x": data["x_val"], "y": data["y_val"]}
    cascade = fuser.build(members, "cascade", fit_data=validation, cascade_exit_stage=True)
    cascade_path = cascade.save(out / "cascade.onnx")
    print(f"   built and verified both in {time.perf_counter() - started:.1f} s")
    params = cascade.manifest["head"]["params"]
    for number, stage in enumerate(params["stages"], 1):
        threshold = (
            "answers every digit left"
            if number == len(params["stages"])
            else "no early exit"
            if stage["threshold"] is None
            else f"leaves if max probability >= {stage['threshold']:.4f}"
        )
        print(
            f"   stage {number}: {'+'.join(stage['members']):<6} {threshold:<38} "
            f"cost {1000 * stage['cost_per_row']:.3f} us per row"
        )
    print(
        f"   expected cost per row {1000 * params['expected_cost_per_row']:.3f} us against "
        f"{1000 * params['full_cost_per_row']:.3f} us for the full ensemble "
        f"({params['expected_speedup']:.1f}x less; measured on the validation digits)"
    )

    print("\n3. Held-out accuracy")
    import runtime

    probabilities = member_probabilities(models, data["x_test"])
    for name, value in zip(models, probabilities):
        print(f"   {name:<10} {accuracy(value, data['y_test']):.4f}")
    full_answer = runtime.load(full_path).predict(data["x_test"])
    routed = runtime.load(cascade_path).predict(data["x_test"])
    print(f"   {'full':<10} {accuracy(full_answer, data['y_test']):.4f}")
    print(f"   {'cascade':<10} {accuracy(routed['prediction'], data['y_test']):.4f}")
    rates = [
        f"stage {number} {np.mean(routed['exit_stage'] == number):.1%}"
        for number in range(1, len(params["stages"]) + 1)
    ]
    print(f"   test digits leave the cascade at {', '.join(rates)}")

    print("\n4. Accuracy against cost as the thresholds vary (calibrated on validation)")
    curve = tradeoff(models, data, params)
    print(f"   {'tolerance':>9}  {'test accuracy':>13}  {'cost per row':>12}  thresholds")
    for point in curve:
        thresholds = ", ".join("-" if t is None else f"{t:.3f}" for t in point["thresholds"])
        print(
            f"   {point['tolerance']:>9g}  {point['accuracy']:>13.4f}  "
            f"{point['relative_cost']:>11.1%}  {thresholds}"
        )
    figure = plot(curve, probabilities, data, params, out / "cascade_curve.png")
    print(f"   (cost per row relative to the full ensemble; the curve: {figure})")
    return 0


def train_members(data: dict[str, np.ndarray], *, epochs: int) -> dict:
    """A small MLP (64 -> 16 -> 10) and three about 100x its multiply-adds."""
    import keras

    layers = keras.layers

    def classifier(name, *hidden, seed):
        keras.utils.set_random_seed(seed)
        pixels = keras.Input((64,), name="pixels")
        x = pixels
        for layer in hidden:
            x = layer(x)
        return keras.Model(pixels, layers.Dense(10, activation="softmax")(x), name=name)

    members = {
        "small": classifier("small", layers.Dense(16, activation="relu"), seed=1),
        "wide": classifier(
            "wide",
            layers.Dense(512, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(256, activation="relu"),
            seed=2,
        ),
        "deep": classifier(
            "deep",
            *(layers.Dense(256, activation="relu") for _ in range(3)),
            seed=3,
        ),
        "conv": classifier(
            "conv",
            layers.Reshape((8, 8, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Flatten(),
            seed=4,
        ),
    }
    for name, model in members.items():
        started = time.perf_counter()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0)
        print(f"   trained {name:<6} in {time.perf_counter() - started:4.1f} s")
    return members


def member_probabilities(models: dict, x: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(model(x, training=False), np.float64) for model in models.values()])


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def tradeoff(models: dict, data: dict, params: dict) -> list[dict]:
    """For each tolerance: the thresholds the build would choose on the validation split,
    scored on the test split with the stages' measured costs."""
    from fuser.heads.thresholds import evaluate, thresholds_for

    names = list(models)
    stages = [[names.index(name) for name in stage["members"]] for stage in params["stages"]]
    common = {
        "stages": stages,
        "weights": np.full(len(names), 1.0 / len(names)),
        "costs": [stage["cost_per_row"] for stage in params["stages"]],
        "confidence": params["confidence"],
    }
    validation = member_probabilities(models, data["x_val"])
    test = member_probabilities(models, data["x_test"])
    full_cost = sum(common["costs"])
    curve = []
    for tolerance in TOLERANCES:
        thresholds = thresholds_for(validation, data["y_val"], tolerance=tolerance, **common)
        scored = evaluate(test, data["y_test"], thresholds=thresholds, **common)
        curve.append(
            {
                "tolerance": tolerance,
                "thresholds": thresholds,
                "accuracy": scored.metric,
                "relative_cost": scored.cost_per_row / full_cost,
            }
        )
    return curve


def plot(curve, probabilities, data, params, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    axes.plot(
        [p["relative_cost"] for p in curve],
        [100 * p["accuracy"] for p in curve],
        "o-",
        color="#2e7d32",
        label="cascade, calibrated on validation",
    )
    for p in curve:
        axes.annotate(
            f"{p['tolerance']:g}",
            (p["relative_cost"], 100 * p["accuracy"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    full = accuracy(probabilities.mean(axis=0), data["y_test"])
    axes.plot(1.0, 100 * full, "*", color="#1565c0", markersize=12, label="full ensemble")
    axes.set_xscale("log")
    axes.set_xlabel("cost per row, relative to the full ensemble (log)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Digits: accuracy against cost as the thresholds vary", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
