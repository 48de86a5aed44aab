"""Digits: five different classifiers, three member formats, one fused artifact.

Trains five small Keras classifiers on scikit-learn's bundled digits (no download), saves
them as ``.keras``, legacy ``.h5`` and SavedModel directories, fuses them into one ONNX
artifact and one SavedModel with ``fuser.build``, and shows what that gains:

* held-out accuracy of each member and of the ensemble;
* time per batch-1 request: the members one by one (``model.predict``, and the fairer
  ``tf.function`` per member) against the fused artifact served by ``runtime``;
* a fresh process's time and peak memory to its first answer, both ways;
* combining heads side by side on held-out digits (mean, vote, stack and greedy
  selection fitted on a validation split), and an uncertainty output that flags the test
  digits the members disagree on.

    python examples/digits.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
SEED = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "output", help="working directory")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing rounds")
    arguments = parser.parse_args(argv)
    out: Path = arguments.out
    epochs, requests = (8, 20) if arguments.quick else (40, 200)

    shutil.rmtree(out, ignore_errors=True)
    (out / "members").mkdir(parents=True)

    import fuser

    fuser.import_tensorflow()  # before Keras, so TensorFlow's start-up logs stay quiet
    data = load_data()
    print(
        f"Digits: {len(data['x_train'])} training, {len(data['x_val'])} validation, "
        f"{len(data['x_test'])} test images (8x8 pixels, 10 classes).\n"
    )

    print("1. Training five classifiers and saving them in three member formats")
    models = train_members(data, epochs=epochs)
    paths = save_members(models, out / "members")
    for name, path in paths.items():
        print(f"   {name:<10} -> {path.relative_to(out)}")

    print("\n2. Fusing them into one artifact")
    started = time.perf_counter()
    ensemble = fuser.build([f"{name}={path}" for name, path in paths.items()], progress=True)
    onnx_path = ensemble.save(out / "digits.onnx")
    savedmodel_path = ensemble.save(out / "digits_savedmodel")
    build_seconds = time.perf_counter() - started
    members_text = " ".join(f"{name}={path.relative_to(out)}" for name, path in paths.items())
    print(
        f"   built and verified in {build_seconds:.1f} s: {onnx_path.name}, {savedmodel_path.name}/"
        f"\n   the same from the shell, in {out}:"
        f"\n   fuser build {members_text} -o digits.onnx -o digits_savedmodel"
    )

    print("\n3. Held-out accuracy")
    import runtime

    served = runtime.load(onnx_path)
    member_probabilities = {
        name: np.asarray(model(data["x_test"], training=False)) for name, model in models.items()
    }
    for name, probabilities in member_probabilities.items():
        print(f"   {name:<10} {accuracy(probabilities, data['y_test']):.4f}")
    fused_probabilities = served.predict(data["x_test"])
    members_mean = np.mean(list(member_probabilities.values()), axis=0)
    print(f"   {'ensemble':<10} {accuracy(fused_probabilities, data['y_test']):.4f}")
    difference = float(np.max(np.abs(fused_probabilities - members_mean)))
    print(f"   fused ONNX artifact vs the members' mean: max abs difference {difference:.1e}")
    if difference > 1e-4:
        print("   the fused artifact disagrees with its members", file=sys.stderr)
        return 1

    print(f"\n4. Time per batch-1 request (median of {requests} requests, this process)")
    rows = data["x_test"][:requests]
    timings = time_requests(models, served, rows)
    fused = timings["fused ONNX artifact (runtime)"]
    for label, seconds in timings.items():
        ratio = "" if seconds is fused else f"   {seconds / fused:6.1f}x the fused artifact"
        print(f"   {label:<44} {seconds * 1e3:8.2f} ms{ratio}")

    print("\n5. A fresh process, from start to its first answer")
    sample = out / "sample.npy"
    np.save(sample, data["x_test"][:1])
    fresh_fused = cold_start(RUNTIME_SCRIPT, str(onnx_path), str(sample))
    fresh_members = cold_start(
        MEMBERS_SCRIPT, json.dumps({k: str(v) for k, v in paths.items()}), str(sample)
    )
    for label, figures in (
        ("members loaded with TensorFlow", fresh_members),
        ("fused ONNX artifact (runtime)", fresh_fused),
    ):
        print(f"   {label:<32} {figures['seconds']:5.2f} s  {figures['peak_rss_mb']:6.0f} MB")
    print(
        f"   the fused artifact starts {fresh_members['seconds'] / fresh_fused['seconds']:.1f}x "
        f"faster with {fresh_members['peak_rss_mb'] / fresh_fused['peak_rss_mb']:.1f}x less memory"
    )

    print("\n6. Combining heads, fitted on the validation split, scored on the test split")
    best_member = max(accuracy(p, data["y_test"]) for p in member_probabilities.values())
    heads = compare_heads(paths, data, out)
    print(f"   {'best single member':<34} {best_member:.4f}")
    for label, (score, detail) in heads.items():
        print(f"   {label:<34} {score:.4f}  {detail}")

    print("\n7. Flagging the test digits the members disagree on (--uncertainty)")
    flagged = flag_disagreement(paths, data, out)
    print(
        f"   the {flagged['count']} test digits with the highest mutual information "
        f"(members' disagreement) hold {flagged['errors_flagged']} of the ensemble's "
        f"{flagged['errors']} mistakes;\n   accuracy on them {flagged['accuracy_flagged']:.4f}, "
        f"on the other {flagged['rest']} digits {flagged['accuracy_rest']:.4f}"
    )
    return 0


def compare_heads(paths: dict[str, Path], data: dict, out: Path) -> dict[str, tuple]:
    """Test accuracy of several heads; those that learn see the validation split only."""
    import fuser
    import runtime

    members = [f"{name}={path}" for name, path in paths.items()]
    validation = {"x": data["x_val"], "y": data["y_val"]}
    (out / "heads").mkdir(exist_ok=True)
    builds = {
        "mean (soft voting)": {"head": "mean"},
        "vote (hard majority)": {"head": "vote"},
        "stack (fitted on validation)": {"head": "stack", "fit_data": validation},
        "greedy selection, 10 rounds": {"select": "greedy:10", "fit_data": validation},
    }
    results = {}
    for label, options in builds.items():
        ensemble = fuser.build(members, **options)
        artifact = ensemble.save(out / "heads" / f"{label.split()[0]}.onnx", force=True)
        served = runtime.load(artifact)
        detail = ""
        if options.get("select"):
            picks = served.manifest["validation"]["selection"]["picks"]
            detail = "picks " + ", ".join(
                f"{name} {count}" for name, count in picks.items() if count
            )
        elif options["head"] == "stack":
            fitted = served.manifest["head"]["params"]["prediction"]
            weights = ", ".join(
                f"{name} {weight:.2f}" for name, weight in zip(paths, fitted["member_weights"])
            )
            detail = f"member weights {weights}"
        results[label] = (accuracy(served.predict(data["x_test"]), data["y_test"]), detail)
    return results


def flag_disagreement(paths: dict[str, Path], data: dict, out: Path, share: float = 0.05) -> dict:
    """The ensemble with ``--uncertainty``: are its mistakes where the members disagree?"""
    import fuser
    import runtime

    ensemble = fuser.build([f"{name}={path}" for name, path in paths.items()], uncertainty=True)
    served = runtime.load(ensemble.save(out / "digits_uncertainty.onnx", force=True))
    outputs = served.predict(data["x_test"])
    wrong = np.argmax(outputs["prediction"], axis=1) != data["y_test"]
    count = max(1, round(share * len(wrong)))
    flagged = np.zeros(len(wrong), dtype=bool)
    flagged[np.argsort(outputs["mutual_info"])[-count:]] = True
    return {
        "count": count,
        "rest": int((~flagged).sum()),
        "errors": int(wrong.sum()),
        "errors_flagged": int(wrong[flagged].sum()),
        "accuracy_flagged": float(1 - wrong[flagged].mean()),
        "accuracy_rest": float(1 - wrong[~flagged].mean()),
    }


def load_data() -> dict[str, np.ndarray]:
    """Digits split 60/20/20 into train, validation (kept for stacking) and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=SEED, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=SEED, stratify=y_rest
    )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": x_test,
        "y_test": y_test,
    }


def train_members(data: dict[str, np.ndarray], *, epochs: int) -> dict:
    """Five deliberately different classifiers sharing the input ``pixels`` (None, 64)."""
    import keras

    def classifier(name, *hidden, seed):
        keras.utils.set_random_seed(seed)
        pixels = keras.Input((64,), name="pixels")
        x = pixels
        for layer in hidden:
            x = layer(x)
        probabilities = keras.layers.Dense(10, activation="softmax")(x)
        return keras.Model(pixels, probabilities, name=name)

    normalization = keras.layers.Normalization()
    normalization.adapt(data["x_train"])
    layers = keras.layers
    members = {
        "small": classifier("small", layers.Dense(16, activation="relu"), seed=1),
        "wide": classifier(
            "wide", layers.Dense(256, activation="relu"), layers.Dropout(0.3), seed=2
        ),
        "deep": classifier(
            "deep",
            layers.Dense(64, activation="relu"),
            layers.Dense(64, activation="relu"),
            layers.Dense(32, activation="relu"),
            seed=3,
        ),
        "conv": classifier(
            "conv",
            layers.Reshape((8, 8, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.Flatten(),
            seed=4,
        ),
        "normed": classifier("normed", normalization, layers.Dense(48, activation="tanh"), seed=5),
    }
    for name, model in members.items():
        started = time.perf_counter()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0)
        print(f"   trained {name:<8} in {time.perf_counter() - started:4.1f} s")
    return members


def save_members(models: dict, directory: Path) -> dict[str, Path]:
    """One member per way people save models: .keras, .h5, export() and tf.saved_model.save."""
    import tensorflow as tf

    paths = {
        "small": directory / "small.keras",
        "wide": directory / "wide.h5",
        "deep": directory / "deep_export",
        "conv": directory / "conv_tf_saved_model",
        "normed": directory / "normed.keras",
    }
    models["small"].save(paths["small"])
    with _absl_quiet():  # Keras warns that .h5 is legacy: saving one is the point here
        models["wide"].save(paths["wide"])
    models["deep"].export(str(paths["deep"]), verbose=False)
    tf.saved_model.save(models["conv"], str(paths["conv"]))
    models["normed"].save(paths["normed"])
    return paths


@contextlib.contextmanager
def _absl_quiet():
    import logging

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def time_requests(models: dict, served, rows: np.ndarray) -> dict[str, float]:
    """Median seconds per batch-1 request, three ways, on the same rows."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # Keras warns of retracing when five models predict

    def predict_loop(row):
        return np.mean([model.predict(row, verbose=0) for model in models.values()], axis=0)

    functions = [
        tf.function(
            lambda x, model=model: model(x, training=False),
            input_signature=[tf.TensorSpec((None, 64), tf.float32)],
        )
        for model in models.values()
    ]

    def per_member_function(row):
        return np.mean([function(row).numpy() for function in functions], axis=0)

    approaches = {
        "members one by one, model.predict": (predict_loop, max(5, len(rows) // 10)),
        "members one by one, tf.function each": (per_member_function, len(rows)),
        "fused ONNX artifact (runtime)": (served.predict, len(rows)),
    }
    timings = {}
    for label, (answer, count) in approaches.items():
        answer(rows[:1])  # warm up: tracing, session start
        seconds = []
        for row in rows[:count]:
            started = time.perf_counter()
            answer(row[None, :])
            seconds.append(time.perf_counter() - started)
        timings[label] = float(np.median(seconds))
    return timings


RUNTIME_SCRIPT = """
import sys, numpy as np, runtime
print(runtime.load(sys.argv[1]).predict(np.load(sys.argv[2])).argmax())
"""

MEMBERS_SCRIPT = """
import json, sys, numpy as np, keras, tensorflow as tf
x = np.load(sys.argv[2])
outputs = []
for path in json.loads(sys.argv[1]).values():
    if path.endswith((".keras", ".h5")):
        outputs.append(keras.models.load_model(path).predict(x, verbose=0))
    else:
        serve = tf.saved_model.load(path).signatures["serving_default"]
        outputs.append(next(iter(serve(tf.constant(x)).values())).numpy())
print(np.mean(outputs, axis=0).argmax())
"""

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
REPORT_PEAK_MEMORY = """
import atexit
def _report_peak():
    with open("/proc/self/status") as status:
        print(next(line for line in status if line.startswith("VmHWM")).replace(":", ""))
atexit.register(_report_peak)
"""


def cold_start(script: str, *arguments: str) -> dict[str, float]:
    """Wall time of a fresh interpreter to its first answer, and its peak resident memory."""
    program = textwrap.dedent(REPORT_PEAK_MEMORY) + textwrap.dedent(script)
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-c", program, *arguments],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    seconds = time.perf_counter() - started
    peak_kb = next(
        int(line.split()[1]) for line in finished.stdout.splitlines() if line.startswith("VmHWM")
    )
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


if __name__ == "__main__":
    sys.exit(main())
