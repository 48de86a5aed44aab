"""What ``--fusion auto`` measures: a group stacked against its members as plain branches.

Which form is faster depends on the shapes and on the CPU: on one 2-core Intel Xeon VM,
32 stacked MLPs answered batch 4096 in 0.59 of the plain graph's time; on a 2-core AMD
EPYC VM the same stacked graph took 1.04 of it, and 8 MLPs 64 -> 256 -> 256 -> 10
1.13 to 1.2 (``benchmarks/results/amd-epyc``). No fixed rule is right on both. So the
build times both forms of each group where it runs, with ONNX Runtime (the runtime's
engine) at batch 1, 8, 64, 256 and a large batch. A group not slower stacked at any of
them is stacked. One that wins at small batches only keeps both forms behind a switch
on the batch size (``runtime._switch.BatchSwitch``: an ``If`` in ONNX), if that switch,
timed too, is not slower than the plain branches at any batch size.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fuser.onnx_convert import DEFAULT_OPSET, to_onnx

if TYPE_CHECKING:
    from fuser.stack import Group

# Groups with more weights than this are not measured (converting both forms would cost
# seconds and gigabytes); ``fuser.stack`` decides those by a fixed rule.
MEASURE_MAX_BYTES = 32_000_000
# The largest batch measured has at most this many input values times members (4096
# rows of 32 members with 32 features; 128 rows of 8 members with 32x32x3 images): the
# stacked activations grow with both, and must fit in memory.
_MAX_VALUES = 2**22
# Stacked counts as slower only beyond this: within it, repeated builds disagreed.
MARGIN = 0.05
# Stacked convolutions lost most at middling batches (1.5x at 64 rows of 32x32x3 images,
# par at 1024), stacked dense layers at large ones: so the sizes in between are timed too.
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


def _pairs(batches: list[int], times: list[float], plain: list[float]) -> str:
    return ", ".join(f"batch {b}: {t:.3g} vs {p:.3g} ms" for b, t, p in zip(batches, times, plain))


@dataclass
class SwitchTiming:
    """The switch (stacked up to ``max_stacked_batch`` rows, plain above) against the plain
    branches, timed in one run after the first; fastest call per batch size, in ms."""

    max_stacked_batch: int
    plain_ms: list[float]
    switch_ms: list[float]

    def to_manifest(self) -> dict[str, Any]:
        return {
            "max_stacked_batch": self.max_stacked_batch,
            "plain_ms": [round(value, 4) for value in self.plain_ms],
            "switch_ms": [round(value, 4) for value in self.switch_ms],
        }


@dataclass
class Measurement:
    """The fastest call of the plain and the stacked form, per batch size, in ms."""

    batches: list[int]
    plain_ms: list[float]
    stacked_ms: list[float]
    switch: SwitchTiming | None = None
    # Both forms as converted for the timing: {form: (ONNX model, output names)}.
    converted: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def losing_batches(self) -> list[int]:
        """The batch sizes at which the stacked form was slower, by more than ``MARGIN``
        (closer than that, two runs disagreed on which one was faster)."""
        return _slower(self.batches, self.stacked_ms, self.plain_ms)

    @property
    def stacked_wins(self) -> bool:
        return not self.losing_batches

    @property
    def stacked_limit(self) -> int | None:
        """The largest batch up to which the stacked form is not slower, if it is faster,
        by more than ``MARGIN``, at the smallest: where a switch would use it. None when
        it never is, or always is (then no switch is needed)."""
        first_plain, first_stacked = self.plain_ms[0], self.stacked_ms[0]
        if self.stacked_wins or first_stacked > first_plain * (1 - MARGIN):
            return None
        losing = self.losing_batches
        return max(b for b in self.batches if b < losing[0])

    @property
    def switch_losing_batches(self) -> list[int]:
        if self.switch is None:
            return []
        return _slower(self.batches, self.switch.switch_ms, self.switch.plain_ms)

    def describe(self) -> str:
        """``batch 1: 0.0266 vs 0.0954 ms, ...``: stacked vs plain (and the switch's run)."""
        text = _pairs(self.batches, self.stacked_ms, self.plain_ms)
        if self.switch is not None:
            text += (
                f"; stacked up to batch {self.switch.max_stacked_batch}, plain above, vs plain: "
                + _pairs(self.batches, self.switch.switch_ms, self.switch.plain_ms)
            )
        return text

    def to_manifest(self) -> dict[str, Any]:
        record = {
            "engine": "onnxruntime",
            "batches": self.batches,
            "plain_ms": [round(value, 4) for value in self.plain_ms],
            "stacked_ms": [round(value, 4) for value in self.stacked_ms],
        }
        if self.switch is not None:
            record["switch"] = self.switch.to_manifest()
        return record

    @classmethod
    def from_manifest(cls, record: dict[str, Any]) -> Measurement:
        switch = record.get("switch")
        return cls(
            record["batches"],
            record["plain_ms"],
            record["stacked_ms"],
            SwitchTiming(**switch) if switch else None,
        )


def batches_for(values_per_row: int, members: int = 1) -> list[int]:
    """``_BATCHES`` up to ``_MAX_VALUES`` input values times members, and that largest."""
    largest = 2 ** int(math.log2(max(1, _MAX_VALUES // max(1, values_per_row * members))))
    largest = min(largest, _BATCHES[-1])
    return sorted({*(b for b in _BATCHES if b <= largest), largest})


def measure(group: Group) -> Measurement:
    """Time ``group`` stacked and as plain branches, in ONNX Runtime on this machine."""
    batches = _batches(group)
    forms = _converted_forms(group)
    # Plain first: the other forms' answers are checked against its.
    models = {form: forms[form][0].SerializeToString() for form in ("plain", "stacked")}
    times = _time(models, group, batches)
    measured = Measurement(batches, times["plain"], times["stacked"])
    measured.converted = forms  # for measure_switch
    return measured


def measure_switch(group: Group, measured: Measurement) -> SwitchTiming:
    """Time the switch at ``measured.stacked_limit`` against the plain branches again,
    as the ONNX writer joins them (``fuser.onnx_switch``)."""
    from fuser import onnx_switch

    limit = measured.stacked_limit
    if limit is None:
        raise ValueError("the stacked form wins at no batch size or at all of them")
    specs = group.members[0].inputs
    forms = measured.converted or _converted_forms(group)
    (stacked, stacked_outputs), (plain, plain_outputs) = forms["stacked"], forms["plain"]
    switch = onnx_switch.stitch(
        stacked,
        plain,
        data_inputs=[f"input_{index}:0" for index in range(len(specs))],
        small_outputs=stacked_outputs,
        large_outputs=plain_outputs,
        limit=limit,
    )
    models = {"plain": plain.SerializeToString(), "switch": switch.SerializeToString()}
    times = _time(models, group, measured.batches)
    return SwitchTiming(limit, times["plain"], times["switch"])


def _converted_forms(group: Group) -> dict[str, tuple[Any, list[str]]]:
    """``{"stacked" | "plain": (ONNX model, output names)}`` for ``group``."""
    from fuser import fuse

    specs = group.members[0].inputs
    return {
        form: _to_onnx(model, specs) for form, model in fuse.group_forms(group, "measured").items()
    }


def _batches(group: Group) -> list[int]:
    values_per_row = sum(math.prod(spec.shape[1:]) for spec in group.members[0].inputs)
    return batches_for(values_per_row, len(group.members))


def _time(models: dict[str, bytes], group: Group, batches: list[int]) -> dict[str, list[float]]:
    """The fastest call of each ONNX model per batch size, in ms, timed in a fresh
    Python process that imports only numpy and onnxruntime (``fuser/_timing.py``), as a
    serving process would run them."""
    specs = group.members[0].inputs
    with tempfile.TemporaryDirectory(prefix="fuser-timing-") as directory:
        paths = {}
        for form, model in models.items():
            paths[form] = str(Path(directory) / f"{form}.onnx")
            Path(paths[form]).write_bytes(model)
        request = {
            "models": paths,
            "inputs": [
                {"name": f"input_{index}:0", "shape": list(spec.shape[1:]), "dtype": spec.dtype}
                for index, spec in enumerate(specs)
            ],
            "batches": batches,
            "seconds": _SECONDS,
            "min_runs": _MIN_RUNS,
        }
        request_path = Path(directory) / "request.json"
        request_path.write_text(json.dumps(request))
        script = Path(__file__).with_name("_timing.py")
        done = subprocess.run(
            # -P: fuser/ (the script's folder) must not shadow modules of the same name.
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
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for form, error in result["error"].items():
        if not error <= CHECK_TOLERANCE:  # NaN and inf included
            raise FormsDisagree(
                f"its {form} form computes different answers in ONNX Runtime than its plain "
                f"branches (largest difference {error:.3g}, relative to 1 + the value; "
                f"tolerance {CHECK_TOLERANCE:g}), so it stays plain."
            )
    return result["ms"]


def _to_onnx(model: Any, specs: Any) -> tuple[Any, list[str]]:
    """``model`` frozen and converted as the ONNX writer does (``fuser.onnx_convert``): the
    ONNX model and its output names. Inputs are named ``input_0:0``, ``input_1:0``..."""
    import tensorflow as tf

    from runtime._keras import native_grouped_convolutions

    signature = [
        tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=f"input_{index}")
        for index, spec in enumerate(specs)
    ]

    @tf.function(input_signature=signature)
    def serve(*tensors):
        return model(list(tensors), training=False)

    with native_grouped_convolutions("onnx"):
        concrete = serve.get_concrete_function()
    return to_onnx(concrete, [f"input_{index}:0" for index in range(len(specs))], DEFAULT_OPSET)
