"""Convert members to ONNX in a process of their own (``fuser.conversion.units`` starts it).

Usage: ``python -m fuser.conversion._worker JOBS.json``. Each job names a member file, how to
load it (safe mode, custom classes by module and name, the size limit), the fused input
names it reads and the output slots, the opset and where to write the ONNX model; they
are done one after another (TensorFlow is imported once). Prints one JSON line:
``{"seconds": ..., "peak_memory_mb": ...}``. An error ends the process with a non-zero
status, its last line on stderr ``member NAME: what went wrong``.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path


def main(jobs_path: str) -> int:
    started = time.perf_counter()
    jobs = json.loads(Path(jobs_path).read_text())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from fuser._tf import tensorflow

    tensorflow()
    for job in jobs:
        try:
            convert(job)
        except Exception as error:
            raise Failed(job["name"], error) from error
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_memory_mb": peak}))
    return 0


class Failed(Exception):
    def __init__(self, member: str, error: BaseException) -> None:
        super().__init__(member)
        self.member, self.error = member, error


def convert(job: dict) -> None:
    """Load one member and write its unit's ONNX model where the job says. The member is
    loaded inside ``build`` so that nothing here keeps it: its weights are freed once the
    unit is frozen, before the conversion's own peak."""
    from fuser.conversion.convert import built_to_onnx
    from fuser.members import load_members, parse_specs

    custom_objects = {
        entry["name"]: _attribute(importlib.import_module(entry["module"]), entry["qualname"])
        for entry in job["custom_objects"]
    }
    (member,), _ = load_members(
        parse_specs([f"{job['name']}={job['path']}"]),
        jobs=1,
        safe_mode=job["safe_mode"],
        custom_objects=custom_objects or None,
        max_member_bytes=job["max_member_bytes"],
    )
    signature, owner = member.inputs, f'member "{member.name}"'
    loaded = [member]
    del member

    def build() -> object:
        return _unit_model(loaded.pop(), job)

    model, _ = built_to_onnx(build, job["inputs"], signature, job["opset"], owner=owner)
    Path(job["output"]).write_bytes(model.SerializeToString())


def _unit_model(member: object, job: dict) -> object:
    """The member's unit: the fused inputs it reads in, ``out_<slot>`` (float32) out."""
    import keras
    from keras import ops

    from fuser.members import branch

    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=name)
        for name, spec in zip(job["inputs"], member.inputs)
    ]
    computed = keras.tree.flatten(branch(member)(inputs))
    outputs = {
        f"out_{slot}": ops.cast(computed[index], "float32")
        for slot, index in enumerate(job["slots"])
    }
    return keras.Model(inputs, outputs)


def _attribute(module: object, qualname: str) -> object:
    value = module
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except Failed as failure:  # one line for the build, which names the member
        from fuser.errors import FuseError, brief, library_of

        error = failure.error
        detail = brief(error)
        if not isinstance(error, FuseError):  # a library's error: say which
            detail = f"{library_of(error) or type(error).__name__}: {detail}"
        print(f"member {failure.member}: {detail}", file=sys.stderr)
        sys.exit(1)
