"""What ``--fusion auto`` measures: a group stacked against its members as plain branches.

Which form is faster depends on the shapes and on the CPU: on one 2-core Intel Xeon VM,
32 stacked MLPs answered batch 4096 in 0.59 of the plain graph's time; on a 2-core AMD
EPYC VM the same stacked graph took 1.04 of it, and 8 MLPs 64 -> 256 -> 256 -> 10
1.13 to 1.2 (``benchmarks/results/amd-epyc``). No fixed rule is right on both. So the
build times both forms of each group where it runs, with ONNX Runtime (the runtime's
engine) at batch 1, 8, 64, 256 and a large batch, and stacks the group only if the
stacked form is not slower at any of them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


@dataclass
class Measurement:
    """The fastest call of the plain and the stacked form, per batch size, in ms."""

    batches: list[int]
    plain_ms: list[float]
    stacked_ms: list[float]

    @property
    def losing_batches(self) -> list[int]:
        """The batch sizes at which the stacked form was slower, by more than ``MARGIN``
        (closer than that, two runs disagreed on which one was faster)."""
        return [
            b
            for b, s, p in zip(self.batches, self.stacked_ms, self.plain_ms)
            if s > p * (1 + MARGIN)
        ]

    @property
    def stacked_wins(self) -> bool:
        return not self.losing_batches

    def describe(self) -> str:
        """``batch 1: 0.0266 vs 0.0954 ms, ...``: stacked vs plain."""
        return ", ".join(
            f"batch {b}: {s:.3g} vs {p:.3g} ms"
            for b, s, p in zip(self.batches, self.stacked_ms, self.plain_ms)
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "engine": "onnxruntime",
            "batches": self.batches,
            "plain_ms": [round(value, 4) for value in self.plain_ms],
            "stacked_ms": [round(value, 4) for value in self.stacked_ms],
        }


def batches_for(values_per_row: int, members: int = 1) -> list[int]:
    """``_BATCHES`` up to ``_MAX_VALUES`` input values times members, and that largest."""
    largest = 2 ** int(math.log2(max(1, _MAX_VALUES // max(1, values_per_row * members))))
    largest = min(largest, _BATCHES[-1])
    return sorted({*(b for b in _BATCHES if b <= largest), largest})


def measure(group: Group) -> Measurement:
    """Time ``group`` stacked and as plain branches, in ONNX Runtime on this machine.

    Both forms are converted here and timed in a fresh Python process that imports only
    numpy and onnxruntime (``fuser/_timing.py``), as a serving process would run them.
    """
    specs = group.members[0].inputs
    values_per_row = sum(math.prod(spec.shape[1:]) for spec in specs)
    batches = batches_for(values_per_row, len(group.members))
    with tempfile.TemporaryDirectory(prefix="fuser-timing-") as directory:
        models = {}
        for form, model in _models(group).items():
            models[form] = str(Path(directory) / f"{form}.onnx")
            Path(models[form]).write_bytes(_to_onnx(model, specs))
        request = {
            "models": models,
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
        raise RuntimeError(lines[-1] if lines else f"timing exited with {done.returncode}")
    times = json.loads(done.stdout.strip().splitlines()[-1])["ms"]
    return Measurement(batches, times["plain"], times["stacked"])


def _models(group: Group) -> dict[str, Any]:
    """The group as one Keras model each way: stacked, and its members side by side."""
    import keras
    from keras import ops

    from fuser import fuse, stack

    specs = group.members[0].inputs
    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=f"input_{index}")
        for index, spec in enumerate(specs)
    ]
    stacked = stack.lower(group, inputs, prefix="measured")
    per_member = [keras.tree.flatten(fuse.branch(member)(inputs)) for member in group.members]
    plain = [
        ops.stack([outputs[index] for outputs in per_member], axis=1)
        for index in range(len(per_member[0]))
    ]
    return {
        "plain": keras.Model(inputs, [ops.cast(value, "float32") for value in plain]),
        "stacked": keras.Model(inputs, [ops.cast(value, "float32") for value in stacked]),
    }


def _to_onnx(model: Any, specs: Any) -> bytes:
    """``model`` frozen and converted as the ONNX writer does (``fuser.export``)."""
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    from fuser._tf import python_logs_quiet
    from fuser.export import DEFAULT_OPSET
    from runtime._keras import native_grouped_convolutions

    signature = [
        tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=f"input_{index}")
        for index, spec in enumerate(specs)
    ]

    @tf.function(input_signature=signature)
    def serve(*tensors):
        return model(list(tensors), training=False)

    with python_logs_quiet("tensorflow", "tf2onnx"), native_grouped_convolutions():
        frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
        converted, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(),
            input_names=[f"input_{index}:0" for index in range(len(specs))],
            output_names=[tensor.name for tensor in frozen.outputs],
            opset=DEFAULT_OPSET,
        )
    return converted.SerializeToString()
