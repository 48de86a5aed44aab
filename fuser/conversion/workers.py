"""Worker processes converting member units, one share of the members each.

A worker (``python -m fuser.conversion._worker``) imports TensorFlow once, loads each of its
members again from its file, converts it and writes the unit's ONNX model: the build
process never holds their frozen constants, and a worker's memory returns to the system
when it ends. Only members worth it go to workers (``WORKER_MIN_BYTES``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fuser.conversion.unit import ConversionOptions, Unit
from fuser.errors import FuseError

# Members with fewer weights are converted in the build process: a worker first spends
# 5 to 6 s importing TensorFlow and loading its member, more than converting a small
# member takes, while a large one (tens of MB: seconds to a minute and gigabytes of
# memory) is worth it.
WORKER_MIN_BYTES = 16_000_000
_TIMEOUT_SECONDS = 3600


def environment() -> dict[str, str]:
    """The environment of a helper process (a conversion worker, an artifact's check): this
    fuser package first on its path, TensorFlow's C++ logs quiet unless asked for."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
    }


def job(unit: Unit, options: ConversionOptions) -> dict[str, Any] | None:
    """The job a worker process needs to convert ``unit`` on its own, or None when it is
    converted here (groups; small members; members not from files; custom classes a
    fresh process cannot import)."""
    if unit.kind != "member":
        return None
    (member,) = unit.members
    # A member taken from its record is not loaded here: a worker loads it, whatever its size.
    if member.parameters * 4 < WORKER_MIN_BYTES and member.model is not None:
        return None
    if member.source is None or member.format == "memory":
        return None
    classes = importable(options.custom_objects)
    if classes is None:
        return None
    return {
        "name": member.name,
        "path": str(member.source),
        "inputs": unit.inputs,
        "slots": unit.slots,
        "safe_mode": options.safe_mode,
        "custom_objects": classes,
        "max_member_bytes": options.max_member_bytes,
    }


def importable(custom_objects: dict[str, Any] | None) -> list[dict[str, str]] | None:
    """The custom classes as a fresh process imports them (name, module, qualified name);
    None if one of them cannot be (defined in ``__main__`` or in a function)."""
    classes = []
    for name, value in (custom_objects or {}).items():
        module = getattr(value, "__module__", None)
        if not module or module == "__main__" or "<locals>" in value.__qualname__:
            return None
        classes.append({"name": name, "module": module, "qualname": value.__qualname__})
    return classes


def shares(units: list[Unit], workers: int) -> list[list[Unit]]:
    """``units`` dealt to ``workers`` processes, largest first to the least loaded: each
    worker imports TensorFlow once (5 to 6 s) for all of its units."""
    shares: list[list[Unit]] = [[] for _ in range(min(workers, len(units)))]
    loads = [0] * len(shares)
    for unit in sorted(units, key=lambda each: -each.members[0].parameters):
        lightest = loads.index(min(loads))
        shares[lightest].append(unit)
        loads[lightest] += unit.members[0].parameters
    return shares


class Worker:
    """One worker process converting a share of member units, one after another."""

    def __init__(
        self, share: list[Unit], opset: int, options: ConversionOptions, folder: Path, number: int
    ) -> None:
        self.share = share
        self.jobs = [
            {**job(unit, options), "opset": opset, "output": f"{folder}/{number}_{n}.onnx"}
            for n, unit in enumerate(share)
        ]
        request = folder / f"jobs_{number}.json"
        request.write_text(json.dumps(self.jobs))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fuser.conversion._worker", str(request)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
        )
        self.peak: float | None = None

    def wait(self) -> float:
        """Wait for the worker; set each unit's model; its peak memory in MB."""
        import onnx

        if self.peak is not None:
            return self.peak
        try:
            stdout, stderr = self.process.communicate(timeout=_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            raise FuseError(
                f"Converting members to ONNX in a worker process took over "
                f"{_TIMEOUT_SECONDS} s; it was stopped."
            ) from None
        if self.process.returncode != 0:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            detail = lines[-1] if lines else f"exit status {self.process.returncode}"
            failed = self.share[0]
            for unit in self.share:
                prefix = f"member {unit.members[0].name}: "
                if detail.startswith(prefix):
                    failed, detail = unit, detail[len(prefix) :]
            raise FuseError(
                f"Converting {failed.members[0].describe()} to ONNX in a worker process "
                f"failed: {detail}"
            )
        for job, unit in zip(self.jobs, self.share):
            unit.model = onnx.load(job["output"])
            unit.source = "worker"
        self.peak = float(json.loads(stdout.strip().splitlines()[-1])["peak_memory_mb"])
        return self.peak

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
