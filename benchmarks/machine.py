"""What the numbers were measured on: CPU, its vector extensions, whether TensorFlow used
oneDNN, cores, memory, load, and package versions.

TensorFlow's CPU kernels differ with oneDNN on or off (its default depends on the CPU:
on with AVX-512 VNNI or newer, off on AVX2-only CPUs; ``TF_ENABLE_ONEDNN_OPTS`` forces
it), and so do the TensorFlow-side figures; every result records which it was.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("fuser", "tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx", "numpy")


def describe_machine() -> dict[str, Any]:
    """A dict for ``results.json``: read from the system and package metadata, no imports."""
    import psutil

    machine = {
        "cpu_model": _cpu_model(),
        "cpu_vector_extensions": _vector_extensions(),
        "tensorflow_onednn": tensorflow_onednn(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
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


def _vector_extensions() -> list[str]:
    """The CPU's AVX flags (``avx2``, ``avx512f``, ``avx512_vnni``...) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(flag for flag in flags if flag.startswith(("avx", "amx")))
    except OSError:
        pass
    return []


def tensorflow_onednn() -> bool | None:
    """Whether TensorFlow runs with oneDNN in a process started with this environment
    (asked of TensorFlow in a child process, so this one imports nothing); None if unknown."""
    code = (
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "print(bool(port.IsMklEnabled()))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return {"True": True, "False": False}.get(lines[-1]) if lines else None


def describe_onednn(machine: dict[str, Any]) -> str:
    """``oneDNN on (TensorFlow's default on this CPU)`` and the like, for reports."""
    state = machine.get("tensorflow_onednn")
    forced = machine.get("TF_ENABLE_ONEDNN_OPTS")
    text = {True: "oneDNN on", False: "oneDNN off", None: "oneDNN unknown"}[state]
    if forced:
        return f"{text} (TF_ENABLE_ONEDNN_OPTS={forced})"
    return f"{text} (TensorFlow's default on this CPU)"
