"""What the numbers were measured on: CPU, cores, memory, load, and package versions."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any

PACKAGES = ("fuser", "tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx", "numpy")


def describe_machine() -> dict[str, Any]:
    """A dict for ``results.json``: read from the system and package metadata, no imports."""
    import psutil

    machine = {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    for package in PACKAGES:
        try:
            machine[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            machine[package] = None
    return machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
