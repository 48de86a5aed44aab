"""A build killed with SIGKILL at any moment leaves the old artifact or the new one, never a part.

Each trial starts ``fuser build`` in a subprocess and kills it: during loading, and at
several delays after each step of the write phase the build reports (the verified model,
then each artifact written), which is when artifacts are being written, checked, sealed
and moved into place. After every kill each output
path must hold a complete artifact that ``runtime.load`` verifies (the previous one or
the new one), or nothing at all; the only other entries allowed are hidden
``.fuser-tmp-*`` temporaries, which the next build removes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import runtime
from fuser.formats.placement import TEMPORARY_PREFIX

DELAYS = (0.02, 0.1, 0.2)


def _start_build(members_dir, outputs, head):
    arguments = [members_dir / "a.keras", members_dir / "b.h5", "--head", head, "--force"]
    for output in outputs:
        arguments += ["-o", output]
    return subprocess.Popen(
        [sys.executable, "-m", "fuser", "build", *map(str, arguments)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def _kill_after(process, marker, delay):
    for line in process.stderr:
        if marker in line:
            break
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()


def _check_outputs(directory, outputs, allowed_heads):
    for output in outputs:
        if output.exists():
            model = runtime.load(output)  # verifies every digest of the artifact
            assert model.manifest["head"]["name"] in allowed_heads
    for entry in directory.iterdir():
        assert entry in outputs or entry.name.startswith(TEMPORARY_PREFIX), entry


@pytest.mark.slow
def test_sigkill_during_a_build_never_leaves_a_partial_artifact(members_dir, tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    outputs = [directory / "ensemble.onnx", directory / "ensemble_sm", directory / "e.keras"]

    # Write-phase steps as the build reports them on stderr.
    markers = ["Fused model matches its members"] + [f"Wrote {output}" for output in outputs[:2]]

    # No previous artifact: after a kill each output is absent or complete.
    for marker in markers:
        process = _start_build(members_dir, outputs, "mean")
        _kill_after(process, marker, 0.05)
        _check_outputs(directory, outputs, {"mean"})

    # Previous artifacts in place: --force replaces them atomically or not at all.
    first = _start_build(members_dir, outputs, "median")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    first.stderr.close()
    seen = set()
    for marker in markers:
        for delay in DELAYS:
            process = _start_build(members_dir, outputs, "mean")
            _kill_after(process, marker, delay)
            _check_outputs(directory, outputs, {"median", "mean"})
            seen.add(tuple(runtime.load(output).manifest["head"]["name"] for output in outputs))
    loading = _start_build(members_dir, outputs, "mean")
    time.sleep(1.0)  # while TensorFlow imports and members load
    loading.send_signal(signal.SIGKILL)
    loading.wait(timeout=60)
    loading.stderr.close()
    _check_outputs(directory, outputs, {"median", "mean"})

    # The next build removes what the killed ones left behind.
    last = _start_build(members_dir, outputs, "mean")
    assert last.wait(timeout=300) == 0, last.stderr.read()
    last.stderr.close()
    assert sorted(directory.iterdir()) == sorted(outputs)
    assert {runtime.load(output).manifest["head"]["name"] for output in outputs} == {"mean"}
    # The kills landed at different stages of the replacement (not all before or all after).
    assert len(seen) >= 2, seen
