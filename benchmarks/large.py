"""An ensemble over ONNX's 2 GB limit, built once: ``python -m benchmarks.large``.

Eight MLPs of 64 -> 8192 -> 8192 -> 10 (67.7 M parameters, 271 MB each; 2.17 GB
together) are saved as ``.keras`` files, fused into one ONNX artifact (whose weights go to
an external data file beside it), loaded with the runtime with and without the integrity
check, and compared with the members run one by one. Prints and writes
``DIR/LARGE.md`` and ``DIR/large.json``: build time, file sizes, load times, peak memory.
Needs about 8 GB of memory and 5 GB of disk; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe_machine
from benchmarks.members import wide_mlp, workdir_or_temporary

MEMBERS, WIDTH = 8, 8192


def _peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss``, not inherited
    from the parent across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(workdir: Path) -> dict[str, Any]:
    """Save the members (once) and build the artifact; run in its own process."""
    import fuser

    fuser.import_tensorflow()
    import keras

    paths = []
    for index in range(MEMBERS):
        path = workdir / f"wide_{index}.keras"
        if not path.exists():
            wide_mlp(9000 + index, WIDTH).save(path)
            keras.backend.clear_session()
        paths.append(path)
    started = time.perf_counter()
    fuser.build(paths, progress=True).save(workdir / "large.onnx", force=True)
    return {"build_seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": _peak_rss_gb()}


_LOAD = """
import json, sys, time
started = time.perf_counter()
import numpy, runtime
model = runtime.load(sys.argv[1], verify=sys.argv[2] == "1")
loaded = time.perf_counter() - started
model.predict(numpy.zeros((1, 64), numpy.float32))
answered = time.perf_counter() - started
from benchmarks.large import _peak_rss_gb
print(json.dumps({"load": round(loaded, 2), "first_answer": round(answered, 2),
                  "peak_rss_gb": _peak_rss_gb()}))
"""


def _child(*arguments: str) -> dict[str, Any]:
    """Run Python with ``arguments``; its last line of output, as JSON."""
    done = subprocess.run([sys.executable, *arguments], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{arguments} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out: Path, workdir: Path) -> dict[str, Any]:
    built = _child("-m", "benchmarks.large", "--build", "--workdir", str(workdir))
    artifact = workdir / "large.onnx"
    data = [workdir / name for name in _external(artifact)]
    # Load and first answer in fresh processes, as a server starts; this process holds
    # nothing yet (TensorFlow comes below, for the comparison).
    loads = {verify: _child("-c", _LOAD, str(artifact), str(int(verify))) for verify in (1, 0)}

    import fuser
    import runtime

    fuser.import_tensorflow()
    import keras

    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    paths = [workdir / f"wide_{index}.keras" for index in range(MEMBERS)]
    expected = np.mean(
        [keras.models.load_model(p, compile=False).predict(x, verbose=0) for p in paths], axis=0
    )
    difference = float(np.abs(runtime.load(artifact).predict(x) - expected).max())
    results = {
        "machine": describe_machine(),
        "members": MEMBERS,
        "parameters": MEMBERS * (64 * WIDTH + WIDTH + WIDTH * WIDTH + WIDTH + WIDTH * 10 + 10),
        "build_seconds": built["build_seconds"],
        "build_peak_rss_gb": built["peak_rss_gb"],
        "onnx_bytes": artifact.stat().st_size,
        "external_data_bytes": sum(path.stat().st_size for path in data),
        "load_seconds_verify": loads[1]["load"],
        "load_seconds_no_verify": loads[0]["load"],
        "first_answer_seconds_verify": loads[1]["first_answer"],
        "first_answer_seconds_no_verify": loads[0]["first_answer"],
        "runtime_peak_rss_gb": loads[1]["peak_rss_gb"],
        "max_abs_difference_vs_members": difference,
    }
    print(json.dumps(results, indent=2), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "large.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "LARGE.md").write_text(
        "# An ensemble over ONNX's 2 GB limit\n\n"
        f"`python -m benchmarks.large`: {MEMBERS} MLPs 64 → {WIDTH} → {WIDTH} → 10, "
        f"{results['parameters'] / 1e9:.2f} G parameters, built with the defaults "
        "(`--fusion auto` keeps a group this large plain).\n\n"
        "Members saved as `.keras`, loaded two at once; the files are in the page cache. "
        "Build: `fuser.build` and `save`, in its own process (peak RSS: VmHWM). Load: a "
        "fresh process importing the runtime and calling `runtime.load`; first answer: the "
        "same and one request of one row; runtime RSS: that process's peak.\n\n"
        "| build | peak RSS of the build | model file | external data | load, verified | "
        "load, verify=False | first answer, verified | first answer, verify=False | "
        "runtime RSS | max abs difference vs members |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        f"| {results['build_seconds']} s | {results['build_peak_rss_gb']} GB | "
        f"{results['onnx_bytes'] / 1e3:.1f} kB | {results['external_data_bytes'] / 1e9:.2f} GB | "
        f"{results['load_seconds_verify']} s | {results['load_seconds_no_verify']} s | "
        f"{results['first_answer_seconds_verify']} s | "
        f"{results['first_answer_seconds_no_verify']} s | "
        f"{results['runtime_peak_rss_gb']} GB | {difference:.1e} |\n"
    )
    return results


def _external(artifact: Path) -> list[str]:
    from runtime import readers

    return readers.read_manifest("onnx", artifact, verify=False)["artifact"]["external_data"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where members and the artifact go")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if arguments.build:  # the child process run() starts
        print(json.dumps(build(arguments.workdir)), flush=True)
        return 0
    with workdir_or_temporary(arguments.workdir, "fuser-large-") as workdir:
        run(arguments.out, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
