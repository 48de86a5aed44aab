"""Cold start: a fresh Python process, from interpreter start to its first answer.

The parent side (``measure_cold_start``) starts ``python -m benchmarks.cold_start`` and
stamps the time from just before the process is created to the moment the child's report
line arrives, after the child has set the approach up and answered one request. Meanwhile
it polls the resident memory of the child and all of its descendants (pool workers
included) and keeps the peak. The child side (``main``) imports only what its approach
imports: for ``fused_onnx`` that is NumPy, ONNX Runtime and fuser's runtime, never
TensorFlow, and the child reports which of them it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.01


def measure_cold_start(
    approach_name: str,
    member_set_path: Path,
    input_path: Path,
    output_path: Path,
    *,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Start one child serving ``approach_name``; time its first answer and its peak memory.

    Returns:
        ``cold_start_seconds``, ``peak_rss_mb`` (the larger of the polled peak of the
        process tree and the child's own ``ru_maxrss``), ``processes`` (most seen at once),
        and the child's report (which heavy modules it imported).

    Raises:
        RuntimeError: the child failed or timed out; the message ends with its stderr.
    """
    import psutil

    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, [environment.get("PYTHONPATH")])]
    )
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [
        sys.executable,
        "-m",
        "benchmarks.cold_start",
        approach_name,
        str(member_set_path),
        str(input_path),
        str(output_path),
    ]
    answer: dict[str, Any] = {}
    started = time.perf_counter()
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        cwd=REPOSITORY,
        text=True,
    )

    def read_answer() -> None:
        line = child.stdout.readline()
        answer["seconds"] = time.perf_counter() - started
        answer["line"] = line
        answer["rest"] = child.stdout.read()

    def read_errors() -> None:
        answer["stderr"] = child.stderr.read()

    readers = [threading.Thread(target=read, daemon=True) for read in (read_answer, read_errors)]
    for reader in readers:
        reader.start()
    peak_bytes, most_processes = 0, 1
    tree = psutil.Process(child.pid)
    while child.poll() is None:
        resident, processes = _tree_rss(tree)
        peak_bytes = max(peak_bytes, resident)
        most_processes = max(most_processes, processes)
        if time.perf_counter() - started > timeout:
            _kill_tree(tree)
            break
        time.sleep(POLL_SECONDS)
    child.wait()
    for reader in readers:
        reader.join(timeout=10)
    if child.returncode != 0 or not answer.get("line", "").strip():
        errors = answer.get("stderr", "").strip().splitlines()[-15:]
        raise RuntimeError(
            f"The cold-start child for {approach_name} failed (exit status {child.returncode}):\n"
            + "\n".join(errors)
        )
    report = json.loads(answer["line"])
    peak_bytes = max(peak_bytes, report.pop("self_max_rss_bytes"))
    return {
        "cold_start_seconds": answer["seconds"],
        "peak_rss_mb": peak_bytes / 2**20,
        "processes": most_processes,
        **report,
    }


def _tree_rss(process: Any) -> tuple[int, int]:
    """Resident bytes of ``process`` and all its descendants, and how many there are."""
    import psutil

    total, count = 0, 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for member in members:
        try:
            total += member.memory_info().rss
            count += 1
        except psutil.Error:
            continue
    return total, count


def _kill_tree(process: Any) -> None:
    import psutil

    try:
        members = [*process.children(recursive=True), process]
    except psutil.Error:
        return
    for member in members:
        try:
            member.kill()
        except psutil.Error:
            continue


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``), 0 where /proc is missing.

    Not ``ru_maxrss``: Linux carries it over from the parent across fork and exec, so a
    child of a big benchmark process would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> None:
    """The child: set one approach up, answer one request, report, exit."""
    from benchmarks.approaches import APPROACHES
    from benchmarks.members import MemberSet

    approach_name, member_set_path, input_path, output_path = argv or sys.argv[1:]
    approach = APPROACHES[approach_name](MemberSet.from_json(Path(member_set_path).read_text()))
    approach.setup()
    answer = approach.predict(np.load(input_path))
    np.save(output_path, answer)
    report = {
        "tensorflow_imported": approach.tensorflow_imported(),
        "onnxruntime_imported": "onnxruntime" in sys.modules,
        "self_max_rss_bytes": _peak_rss_bytes(),
    }
    print(json.dumps(report), flush=True)
    approach.close()
    # Skip interpreter teardown (TensorFlow's can take seconds); nothing is left to flush.
    os._exit(0)


if __name__ == "__main__":
    main()
