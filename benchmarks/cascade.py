"""A confidence cascade against the full fused ensemble, side by side, on held-out rows.

``python -m benchmarks.cascade [--quick] [--out DIR] [--workdir DIR]`` trains four
classifiers of very different cost on a generated task, builds the full fused ensemble
(``--head mean``) and the cascade (``--head cascade``, calibrated on a validation split
with the default tolerance), both ONNX, and measures them in one run, alternating:

- accuracy on a held-out test split (20,000 rows: 0.2 points is 40 rows);
- throughput at batch 1024 (rows per second, median over calls on the test split's
  batches in turn: each call routes a different mix of easy and hard rows);
- batch-1 latency of easy rows (the cascade lets them leave at stage 1) and of hard
  rows (they reach its last stage), each through both artifacts;
- where the test rows leave, and how accuracy and cost per row move as the
  thresholds vary (calibrated at several tolerances, and one threshold for every
  stage): ``cascade_curve.png``.

The task is scikit-learn's ``make_classification`` (10 classes, 40 features, 60,000
rows, two clusters per class at ``class_sep=2``): large enough that 0.2 points of
accuracy is dozens of rows, and shaped as cascades expect, a small model right on most
rows with a harder tail (the small member scores about 94%, the large ones 97-98%).
Digits has 1,797 rows; its 360 test rows make 0.2 points less than one row. The
members are MLPs (one 40-64-10, three of 0.29 to 0.31 M multiply-adds, about 90x
its), trained in about a minute on 2 cores.

Writes ``DIR/cascade.json``, ``DIR/CASCADE.md`` and ``DIR/cascade_curve.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe_machine, describe_onednn
from benchmarks.measure import Budget, timed_calls
from benchmarks.members import workdir_or_temporary

FEATURES, CLASSES = 40, 10
# name -> hidden layer widths; the first is the cheap one.
MEMBERS = {
    "small": (64,),
    "big_a": (512, 512),
    "big_b": (1024, 256),
    "big_c": (384, 384, 384),
}
SETTINGS = {
    False: {"rows": 60_000, "epochs": 12, "rounds": 7, "latency_rows": 200},
    True: {"rows": 15_000, "epochs": 4, "rounds": 3, "latency_rows": 40},
}
BATCH = 1024
TOLERANCES = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
THROUGHPUT = Budget(seconds=0.0, min_calls=1, max_calls=1, warmup_calls=0, warmup_seconds=0.0)


def make_data(rows: int) -> dict[str, np.ndarray]:
    """The task, split half for training, a sixth for validation, a third for testing;
    features standardised with the training split's statistics."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows,
        n_features=FEATURES,
        n_informative=16,
        n_redundant=8,
        n_classes=CLASSES,
        n_clusters_per_class=2,
        class_sep=2.0,
        flip_y=0.0,
        random_state=0,
    )
    x = x.astype(np.float32)
    train, validation = rows // 2, rows // 2 + rows // 6
    mean, std = x[:train].mean(axis=0), x[:train].std(axis=0)
    x = (x - mean) / std
    return {
        "x_train": x[:train],
        "y_train": y[:train],
        "x_val": x[train:validation],
        "y_val": y[train:validation],
        "x_test": x[validation:],
        "y_test": y[validation:],
    }


def train_members(data: dict[str, np.ndarray], directory: Path, epochs: int) -> dict[str, Any]:
    """Train and save the members (``.keras``); returns their paths and figures."""
    import keras

    directory.mkdir(parents=True, exist_ok=True)
    members = {}
    for seed, (name, widths) in enumerate(MEMBERS.items()):
        path = directory / f"{name}.keras"
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((FEATURES,), name="features")
        hidden = inputs
        for width in widths:
            hidden = keras.layers.Dense(width, activation="relu")(hidden)
            if name != "small":
                hidden = keras.layers.Dropout(0.1)(hidden)
        model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(hidden))
        started = time.perf_counter()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=256, verbose=0)
        model.save(path)
        dims = [FEATURES, *widths, CLASSES]
        members[name] = {
            "path": path,
            "hidden": list(widths),
            "multiply_adds": sum(a * b for a, b in itertools.pairwise(dims)),
            "train_seconds": round(time.perf_counter() - started, 1),
            "model": model,
        }
        print(f"trained {name} {widths} in {members[name]['train_seconds']} s", flush=True)
    return members


def member_probabilities(members: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """(members, rows, classes) float64: each member on its own."""
    return np.stack(
        [
            np.asarray(member["model"].predict(x, batch_size=4096, verbose=0), np.float64)
            for member in members.values()
        ]
    )


def run(out: Path, *, quick: bool, workdir: Path) -> dict[str, Any]:
    import fuser
    import runtime

    fuser.import_tensorflow()
    settings = SETTINGS[quick]
    machine = describe_machine()
    data = make_data(settings["rows"])
    members = train_members(data, workdir / "members", settings["epochs"])
    paths = [f"{name}={member['path']}" for name, member in members.items()]
    validation = {"x": data["x_val"], "y": data["y_val"]}

    started = time.perf_counter()
    full = fuser.build(paths, "mean")
    full_path = full.save(workdir / "full.onnx", force=True)
    full_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cascade = fuser.build(paths, "cascade", fit_data=validation, cascade_exit_stage=True)
    cascade_path = cascade.save(workdir / "cascade.onnx", force=True)
    cascade_seconds = time.perf_counter() - started
    params = cascade.manifest["head"]["params"]
    served = {"full": runtime.load(full_path), "cascade": runtime.load(cascade_path)}  # accuracy

    x_test, y_test = data["x_test"], data["y_test"]
    answers = {
        "full": served["full"].predict(x_test, batch_size=4096),
        "cascade": served["cascade"].predict(x_test, batch_size=4096),
    }
    exit_stage = answers["cascade"]["exit_stage"]
    accuracy = {
        "full": float(np.mean(answers["full"].argmax(axis=1) == y_test)),
        "cascade": float(np.mean(answers["cascade"]["prediction"].argmax(axis=1) == y_test)),
    }
    stages = len(params["stages"])
    exit_rates = [float(np.mean(exit_stage == number + 1)) for number in range(stages)]
    print(f"test accuracy: full {accuracy['full']:.4f}, cascade {accuracy['cascade']:.4f}")

    count = settings["latency_rows"]
    easy = x_test[exit_stage == 1][:count]
    hard = x_test[exit_stage == stages][:count]
    timed = measure_in_fresh_process(
        {"full": full_path, "cascade": cascade_path},
        {"throughput": x_test, "easy": easy, "hard": hard},
        settings["rounds"],
        workdir,
    )
    throughput, latency = timed["throughput"], timed["latency"]
    speedup = throughput["cascade"]["rows_per_second"] / throughput["full"]["rows_per_second"]
    print(
        f"batch {BATCH}: full {throughput['full']['rows_per_second']:,.0f} rows/s, cascade "
        f"{throughput['cascade']['rows_per_second']:,.0f} rows/s ({speedup:.2f}x)",
        flush=True,
    )
    for kind in ("easy", "hard"):
        print(
            f"batch 1, {kind} rows: full {latency['full'][kind]['p50_ms']:.4f} ms, cascade "
            f"{latency['cascade'][kind]['p50_ms']:.4f} ms",
            flush=True,
        )
    curve = tradeoff(members, data, params)

    results = {
        "machine": machine,
        "quick": quick,
        "task": {
            "generator": "sklearn.datasets.make_classification",
            "rows": settings["rows"],
            "features": FEATURES,
            "classes": CLASSES,
            "class_sep": 2.0,
            "train_rows": len(data["y_train"]),
            "validation_rows": len(data["y_val"]),
            "test_rows": len(y_test),
        },
        "members": {
            name: {
                "hidden": member["hidden"],
                "multiply_adds": member["multiply_adds"],
                "train_seconds": member["train_seconds"],
                "test_accuracy": curve["members"][name]["accuracy"],
            }
            for name, member in members.items()
        },
        "build_seconds": {"full": round(full_seconds, 1), "cascade": round(cascade_seconds, 1)},
        "cascade": params,
        "test": {
            "accuracy": accuracy,
            "accuracy_difference_points": round(100 * (accuracy["cascade"] - accuracy["full"]), 3),
            "exit_rates": exit_rates,
        },
        "timing_process": timed["process"],
        "throughput": throughput,
        "throughput_ratio": round(speedup, 3),
        "latency_batch_1": latency,
        "easy_rows": len(easy),
        "hard_rows": len(hard),
        "curve": curve,
        "goals": {
            "accuracy_within_0.2_points": abs(accuracy["cascade"] - accuracy["full"]) <= 0.002,
            "throughput_at_least_2x": speedup >= 2.0,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text(json.dumps(results, indent=2, default=_plain) + "\n")
    plot(results, out / "cascade_curve.png")
    (out / "CASCADE.md").write_text(report(results))
    return results


def measure_in_fresh_process(
    artifacts: dict[str, Path], rows: dict[str, np.ndarray], rounds: int, workdir: Path
) -> dict[str, Any]:
    """Throughput and latency measured in a fresh process that imports numpy, onnxruntime
    and ``runtime`` only, as a server would run the artifacts: in this process, which
    trained the members, TensorFlow's thread pools slow ONNX Runtime down, and not alike
    for every model (measured in one run here: the full ensemble answered 47,000 rows/s
    at batch 1024 in this process, 89,000 in a fresh one; the cascade lost less)."""
    import subprocess

    request = {"artifacts": {name: str(path) for name, path in artifacts.items()}, "rows": {}}
    for kind, values in rows.items():
        request["rows"][kind] = str(workdir / f"timing_{kind}.npy")
        np.save(request["rows"][kind], values)
    request["rounds"] = rounds
    request_path = workdir / "timing_request.json"
    request_path.write_text(json.dumps(request))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cascade", "--measure", str(request_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if done.returncode != 0:
        raise SystemExit(f"the timing process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(request_path: Path) -> dict[str, Any]:
    """The child's side of ``measure_in_fresh_process``."""
    import runtime

    request = json.loads(request_path.read_text())
    served = {name: runtime.load(path) for name, path in request["artifacts"].items()}
    rows = {kind: np.load(path) for kind, path in request["rows"].items()}
    rounds = request["rounds"]
    return {
        "throughput": measure_throughput(served, rows["throughput"], rounds),
        "latency": measure_latency(served, {k: rows[k] for k in ("easy", "hard")}, rounds),
        "process": {
            "tensorflow_imported": "tensorflow" in sys.modules,
            "onnxruntime_threads": "default (one per core)",
        },
    }


def measure_throughput(served: dict[str, Any], x: np.ndarray, rounds: int) -> dict[str, Any]:
    """Rows per second at batch ``BATCH``: every full batch of ``x`` in turn, both
    artifacts alternating batch by batch, ``rounds`` times; the median call."""
    batches = [x[start : start + BATCH] for start in range(0, len(x) - BATCH + 1, BATCH)]
    for model in served.values():  # warm-up
        for batch in batches[:3]:
            model.predict(batch)
    seconds: dict[str, list[float]] = {name: [] for name in served}
    for round_number in range(rounds):
        for batch in batches:
            names = list(served) if round_number % 2 == 0 else list(served)[::-1]
            for name in names:
                seconds[name] += list(timed_calls(served[name].predict, batch, THROUGHPUT))
    return {
        name: {
            "rows_per_second": round(BATCH / float(np.median(values)), 1),
            "call_ms_p50": round(1000 * float(np.median(values)), 4),
            "calls": len(values),
        }
        for name, values in seconds.items()
    }


def measure_latency(
    served: dict[str, Any], rows: dict[str, np.ndarray], rounds: int
) -> dict[str, Any]:
    """Batch-1 latency (ms) of each kind of row through each artifact: every row in turn,
    the artifacts alternating row by row, ``rounds`` times; median and 99th percentile."""
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in rows} for n in served}
    for model in served.values():
        for kind in rows:
            for row in rows[kind][:20]:
                model.predict(row[None])
    for round_number in range(rounds):
        for kind, chosen in rows.items():
            for row in chosen:
                names = list(served) if round_number % 2 == 0 else list(served)[::-1]
                for name in names:
                    started = time.perf_counter()
                    served[name].predict(row[None])
                    times[name][kind].append(time.perf_counter() - started)
    return {
        name: {
            kind: {
                "p50_ms": round(1000 * float(np.median(values)), 4),
                "p99_ms": round(1000 * float(np.percentile(values, 99)), 4),
                "calls": len(values),
            }
            for kind, values in kinds.items()
        }
        for name, kinds in times.items()
    }


def tradeoff(members: dict[str, Any], data: dict[str, np.ndarray], params: dict) -> dict:
    """Test accuracy against expected cost per row as the thresholds vary: calibrated on
    the validation split at each of ``TOLERANCES``, and one threshold for every stage;
    each member alone too. Costs are the stages' measured costs (the manifest's)."""
    from fuser.heads.thresholds import evaluate, thresholds_for

    names = list(members)
    stages = [[names.index(name) for name in stage["members"]] for stage in params["stages"]]
    costs = [stage["cost_per_row"] for stage in params["stages"]]
    full_cost = sum(costs)
    weights = np.full(len(names), 1.0 / len(names))
    validation = member_probabilities(members, data["x_val"])
    test = member_probabilities(members, data["x_test"])
    common = {"stages": stages, "weights": weights, "costs": costs, "confidence": "max"}

    def point(thresholds, **extra):
        routed = evaluate(test, data["y_test"], thresholds=thresholds, **common)
        return {
            "thresholds": thresholds,
            "accuracy": round(routed.metric, 6),
            "relative_cost": round(routed.cost_per_row / full_cost, 6),
            "exit_rates": [round(rate, 4) for rate in routed.exit_rates],
            **extra,
        }

    calibrated = [
        point(
            thresholds_for(validation, data["y_val"], tolerance=tolerance, **common),
            tolerance=tolerance,
        )
        for tolerance in TOLERANCES
    ]
    uniform = [
        point([float(level)] * (len(stages) - 1), threshold=float(level))
        for level in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)
    ]
    alone = {}
    for index, name in enumerate(names):
        stage = next(number for number, members_of in enumerate(stages) if index in members_of)
        alone[name] = {
            "accuracy": round(float(np.mean(test[index].argmax(axis=-1) == data["y_test"])), 6),
            "relative_cost": round(costs[stage] / len(stages[stage]) / full_cost, 6),
        }
    return {"calibrated": calibrated, "uniform": uniform, "members": alone}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["curve"]
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    calibrated = curve["calibrated"]
    axes.plot(
        [p["relative_cost"] for p in calibrated],
        [100 * p["accuracy"] for p in calibrated],
        "o-",
        color="#2e7d32",
        label="cascade, thresholds calibrated on validation (tolerance 0 to 0.05)",
    )
    for p in calibrated:
        if p["tolerance"] not in (0.0, 0.001, 0.005, 0.01, 0.02, 0.05):
            continue  # the others crowd their neighbours
        axes.annotate(
            f"{p['tolerance']:g}",
            (p["relative_cost"], 100 * p["accuracy"]),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=7,
            color="#2e7d32",
        )
    uniform = curve["uniform"]
    axes.plot(
        [p["relative_cost"] for p in uniform],
        [100 * p["accuracy"] for p in uniform],
        "s--",
        color="#9e9e9e",
        markersize=4,
        label="cascade, one threshold for every stage (0.5 to 0.9999)",
    )
    for number, (name, member) in enumerate(curve["members"].items()):
        axes.plot(member["relative_cost"], 100 * member["accuracy"], "D", color="#e91e63")
        axes.annotate(
            name,
            (member["relative_cost"], 100 * member["accuracy"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(5, 4 - 9 * (number % 2)),
        )
    test = results["test"]
    axes.plot(
        1.0,
        100 * test["accuracy"]["full"],
        "*",
        color="#1565c0",
        markersize=13,
        label="full fused ensemble (mean of all four)",
    )
    measured = 1.0 / results["throughput_ratio"]
    axes.plot(
        measured,
        100 * test["accuracy"]["cascade"],
        "P",
        color="#ff6f00",
        markersize=11,
        label="the built cascade, cost from measured throughput",
    )
    axes.set_xscale("log")
    axes.set_xlabel("cost per row, relative to the full ensemble (log)")
    axes.set_ylabel("test accuracy (%)")
    low = min(100 * p["accuracy"] for p in calibrated) - 0.6
    axes.set_ylim(
        max(low, 100 * min(m["accuracy"] for m in curve["members"].values()) - 0.5),
        100 * max(test["accuracy"]["full"], max(p["accuracy"] for p in calibrated)) + 0.3,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    axes.set_title("Accuracy against cost as the cascade's thresholds vary", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def report(results: dict[str, Any]) -> str:
    machine, test = results["machine"], results["test"]
    params, task = results["cascade"], results["task"]
    throughput, latency = results["throughput"], results["latency_batch_1"]
    lines = [
        "# A confidence cascade against the full fused ensemble",
        "",
        "`python -m benchmarks.cascade"
        + (" --quick" if results["quick"] else "")
        + "`: both artifacts ONNX, through `runtime.load(...).predict`, measured side by "
        "side in one run (alternating call by call, so that a busy moment of the shared "
        "machine lands on both).",
        "",
        "Machine: {cpu_model}, {cores_logical} logical cores, {memory_gb} GB, Python {python}, "
        "load average at start {load_average_at_start}.".format(**machine)
        + f" TensorFlow (training, building): {describe_onednn(machine)}; the timings are "
        "ONNX Runtime's, which oneDNN does not affect.",
        "",
        f"Task: `make_classification`, {task['rows']:,} rows, {task['features']} features, "
        f"{task['classes']} classes, class_sep {task['class_sep']}; {task['train_rows']:,} "
        f"rows to train, {task['validation_rows']:,} to calibrate the cascade (`--fit-data`), "
        f"{task['test_rows']:,} held out for the figures below.",
        "",
        "| member | hidden layers | multiply-adds per row | test accuracy |",
        "| :--- | :--- | ---: | ---: |",
    ]
    for name, member in results["members"].items():
        lines.append(
            f"| {name} | {' → '.join(map(str, member['hidden']))} | "
            f"{member['multiply_adds']:,} | {member['test_accuracy']:.4f} |"
        )
    ratio = results["throughput_ratio"]
    lines += [
        "",
        "## Side by side",
        "",
        "| | full fused ensemble | cascade | cascade / full |",
        "| :--- | ---: | ---: | ---: |",
        f"| test accuracy | {test['accuracy']['full']:.4f} | {test['accuracy']['cascade']:.4f} | "
        f"{test['accuracy_difference_points']:+.2f} points |",
        f"| throughput at batch {BATCH} (rows/s, median call) | "
        f"{throughput['full']['rows_per_second']:,.0f} | "
        f"{throughput['cascade']['rows_per_second']:,.0f} | {ratio:.2f}x |",
    ]
    for kind, label in (("easy", "leave at stage 1"), ("hard", "reach the last stage")):
        full_ms, cascade_ms = latency["full"][kind]["p50_ms"], latency["cascade"][kind]["p50_ms"]
        lines.append(
            f"| batch-1 latency, {results[kind + '_rows']} rows that {label} (p50 ms) | "
            f"{full_ms:.4f} | {cascade_ms:.4f} | {cascade_ms / full_ms:.2f}x |"
        )
    goals = results["goals"]
    lines += [
        "",
        f"Goals: accuracy within 0.2 points of the full ensemble: "
        f"**{'met' if goals['accuracy_within_0.2_points'] else 'missed'}** "
        f"({test['accuracy_difference_points']:+.2f}); throughput at batch {BATCH} at least 2x: "
        f"**{'met' if goals['throughput_at_least_2x'] else 'missed'}** ({ratio:.2f}x).",
        "",
        "## The cascade the build calibrated",
        "",
        f"Stages {params['order']}; thresholds on the {params['confidence']} probability, "
        f"chosen on the {params['fit']['rows']:,} validation rows to cost least with "
        f"{params['metric']} within {params['tolerance']:g} of the full ensemble "
        f"(validation: cascade {params['fit']['cascade']:.4f}, full {params['fit']['full']:.4f}). "
        f"Costs: {params['cost_source']}.",
        "",
        "| stage | members | threshold | cost per row (ms) | leave here, validation | "
        "leave here, test |",
        "| ---: | :--- | ---: | ---: | ---: | ---: |",
    ]
    for number, stage in enumerate(params["stages"]):
        threshold = "—" if stage["threshold"] is None else f"{stage['threshold']:.4f}"
        lines.append(
            f"| {number + 1} | {', '.join(stage['members'])} | {threshold} | "
            f"{stage['cost_per_row']:.3g} | {stage['exit_rate']:.1%} | "
            f"{test['exit_rates'][number]:.1%} |"
        )
    lines += [
        "",
        f"Expected cost per row on the validation rows: {params['expected_cost_per_row']:.3g} ms "
        f"against {params['full_cost_per_row']:.3g} ms for every stage "
        f"({params['expected_speedup']:.2f}x less); measured at batch {BATCH}: {ratio:.2f}x "
        "(routing costs something, and a stage's cost per row is not quite linear in rows).",
        "",
        "## Accuracy against cost as the thresholds vary",
        "",
        "![accuracy against cost per row](cascade_curve.png)",
        "",
        "Thresholds calibrated on the validation split at each tolerance, scored on the test "
        "split (cost: the stages' measured costs, weighted by where the test rows leave):",
        "",
        "| tolerance | thresholds | test accuracy | cost per row / full | leave at stage 1, 2, ... |",
        "| ---: | :--- | ---: | ---: | :--- |",
    ]
    for p in results["curve"]["calibrated"]:
        thresholds = ", ".join("—" if t is None else f"{t:.4f}" for t in p["thresholds"])
        rates = ", ".join(f"{rate:.1%}" for rate in p["exit_rates"])
        lines.append(
            f"| {p['tolerance']:g} | {thresholds} | {p['accuracy']:.4f} | "
            f"{p['relative_cost']:.3f} | {rates} |"
        )
    lines += [
        "",
        "The built cascade corresponds to the tolerance 0.001 row (the default: one "
        "validation error per thousand rows). At batch 1 the figures are mostly fixed costs: "
        "an easy row still pays the routing and ONNX Runtime's pass over the later stages "
        "on zero rows (a few microseconds each), and a hard row runs the stages one after "
        "another with the routing between them, slower than the full ensemble; the "
        "cascade's gain is in throughput, where rows that left cost nothing later.",
        "",
    ]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cascade", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="15,000 rows, short training")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where members and artifacts go")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the timing child
    arguments = parser.parse_args(argv)
    if arguments.measure is not None:
        print(json.dumps(measure(arguments.measure)))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with workdir_or_temporary(arguments.workdir, "fuser-cascade-") as workdir:
        run(arguments.out, quick=arguments.quick, workdir=workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
