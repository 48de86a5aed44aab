"""Building real architectures: wall time and peak memory of ``fuser build``, phase by phase.

``python -m benchmarks.real_members [--size 96] [--architectures a,b,...] [--workdir DIR]
[--out DIR] [--fuser-source DIR] [--label TEXT]`` writes ``keras.applications`` members
(random weights, perturbed so that members differ; ``classes=10``), then runs
``fuser build MEMBERS --fusion off -o e.onnx -o e_savedmodel`` in a fresh process,
measuring its wall time and peak resident memory (its own, and its workers') and
reading each stage's time from the build's progress lines. With ``--rebuild`` it then
changes one member's weights and builds again, as after retraining one member.

``--fuser-source DIR`` runs the ``fuser`` package found in DIR instead of this one (a
``git worktree`` of an older commit, say), so that two versions are measured on one
machine in one run; ``--label`` names the row. Results are appended to
``DIR/real_members.json`` and ``REAL_MEMBERS.md`` is written from all rows there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import describe_machine, describe_onednn

ARCHITECTURES = (
    "MobileNetV3Small",
    "EfficientNetV2B0",
    "ResNet50V2",
    "NASNetMobile",
    "DenseNet121",
)
_OUTPUTS = {"onnx": "e.onnx", "savedmodel": "e_savedmodel", "keras": "e.keras"}
_LABELS = {"onnx": "ONNX", "savedmodel": "SavedModel", "keras": ".keras"}
_DEFAULT_OUTPUTS = ("onnx", "savedmodel")  # rows measured before --outputs existed
_STEP = re.compile(r"^(?P<step>[A-Z][^:\n]*): done in (?P<seconds>[0-9.]+) s\.", re.MULTILINE)
# The build's own peak, as its last "Wrote ..." line says (the workers are not in it).
_BUILD_PEAK = re.compile(r"peak memory of the build so far (?P<mb>[0-9,.]+) MB")


def write_members(
    architectures: list[str], size: int, directory: Path, *, seed: int = 0
) -> list[Path]:
    """One ``.keras`` file per architecture, random weights perturbed with ``seed``."""
    import keras

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(architectures):
        path = directory / f"{name}.keras"
        paths.append(path)
        if path.exists():
            continue
        keras.utils.set_random_seed(index)
        model = getattr(keras.applications, name)(
            input_shape=(size, size, 3), weights=None, classes=10
        )
        perturb(model, seed + index)
        model.save(path)
    return paths


def perturb(model: Any, seed: int) -> None:
    """Add noise to kernels and biases: untrained ImageNet models with ``weights=None``
    can answer a constant, which would make the build's verification say nothing."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if any(key in variable.path for key in ("kernel", "bias")):
            value = np.asarray(variable)
            variable.assign(value + rng.normal(0, 0.02, value.shape).astype(value.dtype))


def weights_bytes(paths: list[Path]) -> int:
    """The members' weights in bytes: a .keras file is its weights, stored uncompressed."""
    return sum(path.stat().st_size for path in paths)


def timed_build(
    paths: list[Path], outputs: list[Path], source: Path | None, extra: list[str], cache: Path
) -> dict[str, Any]:
    """Run ``fuser build`` in a fresh process; wall seconds, peak RSS, stage times."""
    environment = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "COLUMNS": "200",
        "FUSER_CACHE_DIR": str(cache),
    }
    if source is not None:
        environment["PYTHONPATH"] = str(source)
    command = [sys.executable, "-m", "fuser", "build", *map(str, paths), "--force"]
    command += [argument for output in outputs for argument in ("-o", str(output))] + extra
    started = time.perf_counter()
    # Run from the cache's folder: ``python -m`` puts the working directory first on the
    # path, where a checkout would shadow ``--fuser-source``.
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=environment,
        cwd=cache.parent,
    )
    stderr = process.stderr.read()
    process.stderr.close()
    _, status, usage = os.wait4(process.pid, 0)  # the peak of the child or its workers (Linux)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"fuser build failed ({process.returncode}):\n{stderr[-3000:]}")
    peak_mb = usage.ru_maxrss / 1024
    steps = {match["step"]: float(match["seconds"]) for match in _STEP.finditer(stderr)}
    onnx = next((output for output in outputs if output.suffix == ".onnx"), None)
    workers = 0.0
    if onnx is not None:  # the conversion workers' own peak, as the manifest records it
        import runtime

        conversion = runtime.load(onnx).manifest.get("build", {}).get("onnx_conversion") or {}
        workers = conversion.get("worker_peak_memory_mb", 0.0)
    build_peaks = [float(match["mb"].replace(",", "")) for match in _BUILD_PEAK.finditer(stderr)]
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb),  # the largest of the build and its workers
        "build_peak_rss_mb": round(max(build_peaks, default=peak_mb)),
        "worker_peak_rss_mb": round(workers),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_members", description=__doc__)
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fuser-real-members"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--fuser-source", type=Path, help="run the fuser package in this folder")
    parser.add_argument("--label", default="this version")
    parser.add_argument("--rebuild", action="store_true", help="then rebuild, one member changed")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (default 1)")
    parser.add_argument(
        "--outputs",
        default="onnx,savedmodel",
        help="artifacts to write, of onnx, savedmodel, keras (default onnx,savedmodel)",
    )
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    architectures = arguments.architectures.split(",")
    members = arguments.workdir / f"members_{arguments.size}"
    paths = write_members(architectures, arguments.size, members)
    kinds = arguments.outputs.split(",")
    unknown = sorted(set(kinds) - set(_OUTPUTS))
    if unknown:
        parser.error(f"--outputs takes {', '.join(_OUTPUTS)}; received {', '.join(unknown)}")
    outputs = [arguments.workdir / _OUTPUTS[kind] for kind in kinds]
    cache = arguments.workdir / "cache"
    row: dict[str, Any] = {
        "label": arguments.label,
        "architectures": architectures,
        "size": arguments.size,
        "outputs": kinds,
        "weights_mb": round(weights_bytes(paths) / 1e6, 1),
        "first": [],
    }
    if arguments.rebuild:
        row["rebuild_one_changed"] = []
    for _ in range(arguments.repeat):
        shutil.rmtree(cache, ignore_errors=True)  # the first build converts every member
        run = timed_build(paths, outputs, arguments.fuser_source, ["--fusion", "off"], cache)
        row["first"].append(run)
        print(f"{arguments.label}: first build {run}", flush=True)
        if arguments.rebuild:
            import keras

            changed = paths[-1]
            original = changed.read_bytes()
            model = keras.models.load_model(changed)
            perturb(model, 999)
            model.save(changed)
            run = timed_build(paths, outputs, arguments.fuser_source, ["--fusion", "off"], cache)
            row["rebuild_one_changed"].append(run)
            print(f"{arguments.label}: rebuild {run}", flush=True)
            changed.write_bytes(original)  # the members as they were, for the next run
    arguments.out.mkdir(parents=True, exist_ok=True)
    results_path = arguments.out / "real_members.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": []}
    results["machine"] = describe_machine()
    results["rows"] = [r for r in results["rows"] if r["label"] != row["label"]] + [row]
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    (arguments.out / "REAL_MEMBERS.md").write_text(report(results))
    return 0


def report(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# Building real architectures",
        "",
        "`python -m benchmarks.real_members [--outputs onnx,savedmodel] --rebuild` — `fuser "
        "build MEMBERS --fusion off -o e.onnx -o e_savedmodel` (the outputs of the row) in a "
        "fresh process with an empty cache, then again after one member (DenseNet121) was "
        "changed; wall time and the process's peak resident memory. Rows labelled with "
        "another version ran that version's code (`--fuser-source`, a `git worktree` of the "
        "commit) on the same members; rows from an earlier session say so (this VM's speed "
        "varies by a quarter between sessions: compare rows of one session).",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores_logical']} logical cores, "
        f"{machine['memory_gb']} GB, TensorFlow {describe_onednn(machine)}; load average at "
        f"start {machine['load_average_at_start']}.",
        "",
        "| version | outputs | members | weights | build: median (min to max) | peak memory: "
        "build process, largest conversion worker | memory goal (2 GB + 4x weights) | "
        "stages, median |",
        "| :--- | :--- | :--- | ---: | ---: | ---: | ---: | :--- |",
    ]
    for row in results["rows"]:
        medians = {}
        for key, what in (("first", "first build"), ("rebuild_one_changed", "one member changed")):
            runs = row.get(key)
            if not runs:
                continue
            seconds = sorted(run["seconds"] for run in runs)
            median = medians[key] = seconds[len(seconds) // 2]
            faster = ""
            if key != "first" and medians.get("first"):
                faster = f", {medians['first'] / median:.1f}x faster than the first build"
            peak = max(run.get("build_peak_rss_mb", run["peak_rss_mb"]) for run in runs)
            worker = max(run.get("worker_peak_rss_mb", 0) for run in runs)
            goal = 2000 + 4 * row["weights_mb"]
            steps = "; ".join(
                f"{step} {sorted(run['steps'].get(step, 0) for run in runs)[len(runs) // 2]:.1f} s"
                for step in runs[0]["steps"]
            )
            kinds = " + ".join(_LABELS[kind] for kind in row.get("outputs", _DEFAULT_OUTPUTS))
            lines.append(
                f"| {row['label']}, {what} | {kinds} | {', '.join(row['architectures'])} at "
                f"{row['size']} px | {row['weights_mb']:.0f} MB | {median:.0f} s "
                f"({seconds[0]:.0f} to {seconds[-1]:.0f} s, {len(runs)} runs{faster}) | "
                f"{peak:,} MB, "
                f"{f'{worker:,} MB' if worker else 'none'} | "
                f"{goal:,.0f} MB | {steps} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
