"""ONNX by units: each member converted on its own, cached, in workers, joined under the head.

Converting the whole fused model at once makes tf2onnx's graph optimizers work on every
member's nodes together (their cost grows faster than the graph), holds every member's
frozen constants in one process, and redoes everything when one member is retrained. So
the ONNX writer converts *units* (``fuser.conversion.unit``) and joins them:

- a **member unit** per plain member: inputs named as the fused inputs it reads, outputs
  ``out_<slot>`` (float32) per fused output; large members are converted in worker
  processes (``fuser.conversion.workers``), the others here;
- a **group unit** per fused group: its fused form, converted here;
- the **head unit**: per fused output, the members' outputs stacked ``(batch, members,
  ...)`` in, the fused outputs out (the head and any extra outputs).

Member and group units come from the cache when it holds them (``fuser.conversion.cache``),
after a check on the probe batch against their members' own outputs; the joined model
(``fuser.conversion.join``) then goes the way of any ONNX artifact: checked, verified
against the members, sealed.

Not by units (the whole model is converted at once): groups switched on the batch size,
the cascade head (it routes rows between members), a unit with more weights than the
frozen conversion handles well, and ensembles whose weights need an external data file.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fuser.assembly import head_outputs
from fuser.built import Built
from fuser.conversion import cache, workers
from fuser.conversion.convert import keras_to_onnx
from fuser.conversion.join import join
from fuser.conversion.unit import ConversionOptions, Unit, units_of
from fuser.fusion.lowerings import lower
from fuser.members import branch

__all__ = ["ConversionOptions", "Report", "convert", "head_model", "unit_model", "why_whole"]


@dataclasses.dataclass
class Report:
    """What the conversion by units did, for the manifest and the build's output."""

    units: list[dict[str, Any]]
    workers: int
    seconds: float
    worker_peak_memory_mb: float = 0.0

    def to_manifest(self) -> dict[str, Any]:
        return {
            "by": "units",
            "workers": self.workers,
            "seconds": round(self.seconds, 2),
            "worker_peak_memory_mb": round(self.worker_peak_memory_mb, 1),
            "units": self.units,
        }


def why_whole(ensemble: Built, weights_limit: int, total_limit: int) -> str | None:
    """Why ``ensemble`` is converted as one model rather than by units, or None."""
    if ensemble.switch_batch is not None:
        return "a group is switched on the batch size"
    if getattr(ensemble.head, "routes", False):
        return "the cascade head routes rows between members"
    total = sum(member.parameters for member in ensemble.members) * 4
    if total > total_limit:
        return "the weights need an external data file"
    for unit in units_of(ensemble.members, ensemble.wiring, ensemble.fusion):
        size = sum(member.parameters for member in unit.members) * 4
        if size > weights_limit:
            names = ", ".join(member.name for member in unit.members)
            return f"{names} has {size / 1e6:,.0f} MB of weights"
    return None


def convert(ensemble: Built, opset: int, options: ConversionOptions) -> tuple[Any, Report]:
    """The ensemble's ONNX model, converted by units and joined (see the module's docstring).

    Returns the model, whose inputs and outputs carry the ensemble's names, and a report.
    """
    started = time.perf_counter()
    units = units_of(ensemble.members, ensemble.wiring, ensemble.fusion)
    folder = cache.cache_folder(options)
    for unit in units:
        unit.key = cache.key(unit, ensemble.inputs, opset) if folder is not None else None
        if unit.key is not None:
            unit.model = cache.cached(folder, unit.key)
            if unit.model is not None:
                if _agrees(unit, ensemble):
                    unit.source = "cache"
                else:
                    unit.model = None
    remote = [unit for unit in units if unit.model is None and workers.job(unit, options)]
    if len(remote) == 1 and _light(ensemble, remote[0]):
        remote = []  # a worker would import TensorFlow and load the member again: 5 to 6 s
    local = [unit for unit in units if unit.model is None and unit not in remote]
    directory = tempfile.TemporaryDirectory(prefix="fuser-units-")
    shares = workers.shares(remote, options.workers(len(remote))) if remote else []
    running = [
        workers.Worker(share, opset, options, Path(directory.name), n)
        for n, share in enumerate(shares)
    ]
    peaks: list[float] = []
    try:
        for unit in local:  # meanwhile, here: groups, small members, in-memory members
            unit.model = _convert_here(unit, opset)
            unit.source = "this process"
        for worker in running:
            peaks.append(worker.wait())
    finally:
        for worker in running:
            worker.kill()
        directory.cleanup()
    for unit in units:
        if unit.key is not None and unit.source != "cache":
            cache.store(folder, unit.key, unit.model)
    head = _convert_head(ensemble, opset)
    model = join(ensemble, units, head)
    report = Report(
        units=[
            {
                "members": [member.name for member in unit.members],
                "kind": unit.kind,
                "converted": unit.source,
            }
            for unit in units
        ],
        workers=len(shares),
        seconds=time.perf_counter() - started,
        worker_peak_memory_mb=max(peaks, default=0.0),
    )
    if folder is not None:
        cache.prune(folder)
    return model, report


def _light(ensemble: Built, unit: Unit) -> bool:
    """Whether the one unit left to convert is converted in the build process: its member
    is loaded here, and the build holds no other member nor the fused model (a rebuild
    that took every other member from its record, ``fuser.members.records``), so the
    conversion's memory is what a worker's would be."""
    (member,) = unit.members
    loaded = [each for each in ensemble.members if each.model is not None]
    return not ensemble.assembled and loaded == [member]


def _agrees(unit: Unit, ensemble: Built) -> bool:
    """Whether a cached unit answers the probe batch as its members did at this build."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(
            unit.model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feeds = {name: ensemble.probe[name] for name in unit.inputs}
        answers = session.run([f"out_{slot}" for slot in range(len(unit.slots))], feeds)
    except Exception:
        return False
    for slot, spec in enumerate(ensemble.wiring.outputs):
        want = np.asarray(ensemble.probe_values[spec.name][unit.indices], np.float64)
        got = np.asarray(answers[slot], np.float64)
        got = got[None] if unit.kind == "member" else np.swapaxes(got, 0, 1)
        if got.shape != want.shape:
            return False
        with np.errstate(invalid="ignore"):
            close = np.isclose(got, want, rtol=ensemble.tolerance, atol=ensemble.tolerance)
        if not np.all(close | (np.isnan(got) & np.isnan(want))):
            return False
    return True


def _convert_here(unit: Unit, opset: int) -> Any:
    """Convert a unit in this process (a fused group, or a member not from a file)."""
    model, owner = unit_model(unit)
    return keras_to_onnx(model, unit.inputs, unit.members[0].inputs, opset, owner=owner)[0]


def unit_model(unit: Unit) -> tuple[Any, str]:
    """A unit as a Keras model: inputs named as the fused inputs it reads, outputs
    ``out_<slot>`` (float32) per fused output; and who it is, for messages."""
    import keras
    from keras import ops

    first = unit.members[0]
    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=name)
        for name, spec in zip(unit.inputs, first.inputs)
    ]
    if unit.kind == "group":
        layers = unit.group.layers
        computed = lower(unit.group, inputs, prefix="unit")
        unit.group.layers = layers  # as the fused model's lowering recorded them
    else:
        computed = keras.tree.flatten(branch(first)(inputs))
    outputs = {
        f"out_{slot}": ops.cast(computed[index], "float32") for slot, index in enumerate(unit.slots)
    }
    if unit.kind == "group":
        owner = "the fused group of " + ", ".join(member.name for member in unit.members)
    else:
        owner = f'member "{first.name}"'
    return keras.Model(inputs, outputs), owner


def _convert_head(ensemble: Built, opset: int) -> Any:
    """The head unit: per fused output ``stacked_<output>`` in, the fused outputs out."""
    model, names, specs = head_model(ensemble)
    return keras_to_onnx(model, names, specs, opset)[0]


def head_model(ensemble: Built) -> tuple[Any, list[str], list[Any]]:
    """The head as a Keras model: per fused output the members' values stacked
    ``(batch, members, ...)`` in member order as ``stacked_<output>``, the fused outputs
    out (the head and any extra outputs); its input names and specs."""
    import keras

    count = len(ensemble.members)
    inputs = {
        spec.name: keras.Input((count, *spec.shape[1:]), name=f"stacked_{spec.name}")
        for spec in ensemble.wiring.outputs
    }
    outputs = head_outputs(
        inputs,
        ensemble.wiring,
        ensemble.head,
        tasks={name: task.kind for name, task in ensemble.tasks.items()},
        uncertainty=ensemble.uncertainty,
        expose_members=ensemble.expose_members,
    )
    model = keras.Model(list(inputs.values()), outputs, name="fuser_head")
    names = [f"stacked_{spec.name}" for spec in ensemble.wiring.outputs]
    specs = [_Spec((None, *tensor.shape[1:]), "float32") for tensor in inputs.values()]
    return model, names, specs


@dataclasses.dataclass(frozen=True)
class _Spec:
    shape: tuple
    dtype: str
