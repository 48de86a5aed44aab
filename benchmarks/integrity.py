"""What the integrity check costs: ``runtime.load`` with and without ``verify``.

``python -m benchmarks.integrity [--out DIR]`` builds ONNX artifacts of three sizes
(32 of the suite's MLPs, stacked; 4 wide MLPs of about 17 MB each; 8 of them), loads each
repeatedly in this process with ``verify=True`` (the default: one SHA-256 pass over the
file before ONNX Runtime parses it) and ``verify=False``, and reports the median load
times, the difference, and the hashing throughput. Writes ``DIR/integrity.json`` and
``DIR/INTEGRITY.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fusion import write_members
from benchmarks.machine import describe_machine
from benchmarks.members import wide_mlp, workdir_or_temporary

REPEATS = 7


def build_artifacts(workdir: Path) -> dict[str, Path]:
    import fuser

    artifacts = {}
    mlps = write_members("mlp", 32, workdir / "mlp")
    ensemble = fuser.build(mlps, fusion="on")
    artifacts["32 MLPs (20-64-64-5), stacked"] = ensemble.save(workdir / "mlp32.onnx", force=True)
    wide = []
    for index in range(8):
        path = workdir / "wide" / f"wide_{index}.keras"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            wide_mlp(7000 + index, 2048).save(path)
        wide.append(path)
    for count in (4, 8):
        ensemble = fuser.build(wide[:count], fusion="off")
        label = f"{count} MLPs (64-2048-2048-10)"
        artifacts[label] = ensemble.save(workdir / f"wide{count}.onnx", force=True)
    return artifacts


def _median_load_seconds(path: Path, verify: bool) -> float:
    import runtime

    runtime.load(path, verify=verify)  # warm the page cache and the imports
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        runtime.load(path, verify=verify)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def run(out: Path, workdir: Path) -> dict[str, Any]:
    import fuser

    fuser.import_tensorflow()
    rows = []
    for label, path in build_artifacts(workdir).items():
        size = path.stat().st_size
        verified = _median_load_seconds(path, True)
        unverified = _median_load_seconds(path, False)
        data = path.read_bytes()
        started = time.perf_counter()
        for _ in range(REPEATS):
            hashlib.sha256(data).hexdigest()
        hash_seconds = (time.perf_counter() - started) / REPEATS
        row = {
            "artifact": label,
            "megabytes": round(size / 1e6, 2),
            "load_ms_verify": round(verified * 1000, 2),
            "load_ms_no_verify": round(unverified * 1000, 2),
            "check_ms": round((verified - unverified) * 1000, 2),
            "check_share": round((verified - unverified) / verified, 3),
            "sha256_mb_per_s": round(size / 1e6 / hash_seconds),
        }
        print(
            f"{label}: {row['megabytes']} MB, load {row['load_ms_verify']} ms verified, "
            f"{row['load_ms_no_verify']} ms without; check {row['check_ms']} ms "
            f"({row['check_share']:.0%}); SHA-256 {row['sha256_mb_per_s']} MB/s",
            flush=True,
        )
        rows.append(row)
    results = {"machine": describe_machine(), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "integrity.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "INTEGRITY.md").write_text(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "# What the integrity check costs",
        "",
        "`python -m benchmarks.integrity` — `runtime.load(path)` (verify, the default) against "
        f"`runtime.load(path, verify=False)`, median of {REPEATS} loads in one warm process "
        "(page cache warm), ONNX artifacts.",
        "",
        "Machine: {cpu_model}, {cores_logical} logical cores, {memory_gb} GB, Python {python}."
        "".format(**results["machine"]),
        "",
        "| artifact | size | load, verified | load, verify=False | the check | share | SHA-256 |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['artifact']} | {row['megabytes']} MB | {row['load_ms_verify']} ms | "
            f"{row['load_ms_no_verify']} ms | {row['check_ms']} ms | "
            f"{row['check_share']:.0%} | {row['sha256_mb_per_s']} MB/s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.integrity", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where members and artifacts go")
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with workdir_or_temporary(arguments.workdir, "fuser-integrity-") as workdir:
        run(arguments.out, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
