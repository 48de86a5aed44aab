"""What ``--fusion auto`` measures: a group's fused form against its plain branches.

Both forms (``fuser.fusion.forms``) are converted to ONNX as the artifact writer converts
(``fuser.conversion.convert``) and timed with ONNX Runtime, the runtime's engine, in a
fresh process without TensorFlow (``_timing.py``, as a serving process runs them) at
batch 1, 8, 64, 256 and a large batch; the same process checks that the forms compute
the same answers. ``fuser.fusion.policy`` decides from the figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuser.conversion import switch as switch_lib
from fuser.conversion.convert import DEFAULT_OPSET, keras_to_onnx
from fuser.fusion.forms import forms as group_forms
from fuser.fusion.plan import Group
from runtime.describe import timings

# Groups with more weights than this are not measured (converting both forms would cost
# seconds and gigabytes); ``fuser.fusion.policy`` decides those by a fixed rule.
MEASURE_MAX_BYTES = 32_000_000
# The largest batch measured has at most this many input values times members (4096
# rows of 32 members with 32 features; 128 rows of 8 members with 32x32x3 images): the
# fused activations grow with both, and must fit in memory.
_MAX_VALUES = 2**22
# Fused counts as slower only beyond this: within it, repeated builds disagreed.
MARGIN = 0.05
# Fused convolutions were measured to lose most at middling batches, fused dense layers
# at large ones (docs/fusion.md): so the sizes in between are timed too.
_BATCHES = (1, 8, 64, 256, 4096)
_SECONDS = 0.12  # per batch size and form, after warm-up (two rounds of half)
_MIN_RUNS = 3  # per round
_TIMEOUT_SECONDS = 300
# The forms timed must agree this closely (the build's default tolerance).
CHECK_TOLERANCE = 1e-4


class FormsDisagree(Exception):
    """ONNX Runtime computes a group's forms differently; the message says by how much."""


def _slower(batches: list[int], times: list[float], plain: list[float]) -> list[int]:
    """The batch sizes at which ``times`` exceed ``plain`` by more than ``MARGIN``."""
    return [b for b, t, p in zip(batches, times, plain) if t > p * (1 + MARGIN)]


@dataclass
class SwitchTiming:
    """The switch (fused up to ``max_fused_batch`` rows, plain above) against the plain
    branches, timed in one run after the first; fastest call per batch size, in ms."""

    max_fused_batch: int
    plain_ms: list[float]
    switch_ms: list[float]

    def to_manifest(self) -> dict[str, Any]:
        return {
            "max_stacked_batch": self.max_fused_batch,  # its name in manifests
            "plain_ms": [round(value, 4) for value in self.plain_ms],
            "switch_ms": [round(value, 4) for value in self.switch_ms],
        }


@dataclass
class Measurement:
    """The fastest call of the plain and the fused form, per batch size, in ms (the
    manifest keeps the fused form's times as ``stacked_ms``, the name they first had)."""

    batches: list[int]
    plain_ms: list[float]
    fused_ms: list[float]
    switch: SwitchTiming | None = None
    # Both forms as converted for the timing: {form: (ONNX model, output names)}.
    converted: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def losing_batches(self) -> list[int]:
        """The batch sizes at which the fused form was slower, by more than ``MARGIN``
        (closer than that, two runs disagreed on which one was faster)."""
        return _slower(self.batches, self.fused_ms, self.plain_ms)

    @property
    def fused_wins(self) -> bool:
        return not self.losing_batches

    @property
    def fused_limit(self) -> int | None:
        """The largest batch up to which the fused form is not slower, if it is faster,
        by more than ``MARGIN``, at the smallest: where a switch would use it. None when
        it never is, or always is (then no switch is needed)."""
        first_plain, first_fused = self.plain_ms[0], self.fused_ms[0]
        if self.fused_wins or first_fused > first_plain * (1 - MARGIN):
            return None
        losing = self.losing_batches
        return max(b for b in self.batches if b < losing[0])

    @property
    def switch_losing_batches(self) -> list[int]:
        if self.switch is None:
            return []
        return _slower(self.batches, self.switch.switch_ms, self.switch.plain_ms)

    def describe(self) -> str:
        """``batch 1: 0.0266 vs 0.0954 ms, ...``: fused vs plain (and the switch's run)."""
        return timings(self.to_manifest())

    def to_manifest(self) -> dict[str, Any]:
        record = {
            "engine": "onnxruntime",
            "batches": self.batches,
            "plain_ms": [round(value, 4) for value in self.plain_ms],
            "stacked_ms": [round(value, 4) for value in self.fused_ms],
        }
        if self.switch is not None:
            record["switch"] = self.switch.to_manifest()
        return record


def batches_for(values_per_row: int, members: int = 1) -> list[int]:
    """``_BATCHES`` up to ``_MAX_VALUES`` input values times members, and that largest."""
    largest = 2 ** int(math.log2(max(1, _MAX_VALUES // max(1, values_per_row * members))))
    largest = min(largest, _BATCHES[-1])
    return sorted({*(b for b in _BATCHES if b <= largest), largest})


def measure(group: Group) -> Measurement:
    """Time ``group`` fused and as plain branches, in ONNX Runtime on this machine."""
    batches = _batches(group)
    converted = _converted_forms(group)
    # Plain first: the other forms' answers are checked against its.
    models = {form: converted[form][0].SerializeToString() for form in ("plain", "fused")}
    times = _time(models, group, batches)
    measured = Measurement(batches, times["plain"], times["fused"])
    measured.converted = converted  # for measure_switch
    return measured


def measure_switch(group: Group, measured: Measurement) -> SwitchTiming:
    """Time the switch at ``measured.fused_limit`` against the plain branches again, as
    the ONNX writer joins them (``fuser.conversion.switch``)."""
    limit = measured.fused_limit
    if limit is None:
        raise ValueError("the fused form wins at no batch size or at all of them")
    converted = measured.converted or _converted_forms(group)
    (fused, fused_outputs), (plain, plain_outputs) = converted["fused"], converted["plain"]
    switch = switch_lib.stitch(
        fused,
        plain,
        data_inputs=_input_names(group),
        small_outputs=fused_outputs,
        large_outputs=plain_outputs,
        limit=limit,
    )
    models = {"plain": plain.SerializeToString(), "switch": switch.SerializeToString()}
    times = _time(models, group, measured.batches)
    return SwitchTiming(limit, times["plain"], times["switch"])


def _input_names(group: Group) -> list[str]:
    return [f"input_{index}" for index in range(len(group.members[0].inputs))]


def _converted_forms(group: Group) -> dict[str, tuple[Any, list[str]]]:
    """``{"fused" | "plain": (ONNX model, output names)}`` for ``group``."""
    specs = group.members[0].inputs
    return {
        form: keras_to_onnx(model, _input_names(group), specs, DEFAULT_OPSET)
        for form, model in group_forms(group, "measured").items()
    }


def _batches(group: Group) -> list[int]:
    values_per_row = sum(math.prod(spec.shape[1:]) for spec in group.members[0].inputs)
    return batches_for(values_per_row, len(group.members))


def _time(models: dict[str, bytes], group: Group, batches: list[int]) -> dict[str, list[float]]:
    """Time both forms and check that ONNX Runtime computes them alike."""
    specs = [(name, spec) for name, spec in zip(_input_names(group), group.members[0].inputs)]
    result = time_models(models, specs, batches, seconds=_SECONDS)
    for form, error in result["error"].items():
        if not error <= CHECK_TOLERANCE:  # NaN and inf included
            raise FormsDisagree(
                f"its {form} form computes different answers in ONNX Runtime than its plain "
                f"branches (largest difference {error:.3g}, relative to 1 + the value; "
                f"tolerance {CHECK_TOLERANCE:g}), so it stays plain."
            )
    return result["ms"]


def time_models(
    models: dict[str, bytes],
    inputs: Sequence[tuple[str, Any]],
    batches: Sequence[int],
    *,
    seconds: float,
    min_runs: int = _MIN_RUNS,
) -> dict[str, Any]:
    """The fastest call of each ONNX model per batch size, in ms, timed in a fresh Python
    process that imports only numpy and onnxruntime (``_timing.py`` beside this file), as
    a serving process would run them; ``inputs`` are ``(name, spec)`` pairs.

    Returns ``{"ms": {form: [ms per batch]}, "error": {form: its largest difference from
    the first form's answers}}``.

    Raises:
        RuntimeError: ONNX Runtime failed to run a model (its last line).
    """
    with tempfile.TemporaryDirectory(prefix="fuser-timing-") as directory:
        paths = {}
        for form, model in models.items():
            paths[form] = str(Path(directory) / f"{form}.onnx")
            Path(paths[form]).write_bytes(model)
        request = {
            "models": paths,
            "inputs": [
                {"name": name, "shape": list(spec.shape[1:]), "dtype": spec.dtype}
                for name, spec in inputs
            ],
            "batches": list(batches),
            "seconds": seconds,
            "min_runs": min_runs,
        }
        request_path = Path(directory) / "request.json"
        request_path.write_text(json.dumps(request))
        script = Path(__file__).with_name("_timing.py")
        done = subprocess.run(
            # -P: this folder (the script's) must not shadow modules of the same name.
            [sys.executable, "-P", str(script), str(request_path)],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_SECONDS,
        )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(
            "ONNX Runtime failed to run them: "
            + (lines[-1] if lines else f"the timing process exited with {done.returncode}")
        )
    return json.loads(done.stdout.strip().splitlines()[-1])
