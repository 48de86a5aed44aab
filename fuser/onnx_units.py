"""ONNX by units: each member converted on its own, in worker processes, cached, then joined.

Converting the whole fused model at once makes tf2onnx's graph optimizers work on every
member's nodes together (their cost grows faster than the graph), holds every member's
frozen constants in one process, and redoes everything when one member is retrained. So
the ONNX writer converts *units* and joins them:

- a **member unit** per plain member: its own ``tf.function`` whose inputs carry the fused
  input names it reads, outputs ``out_<slot>`` (float32) per fused output. Members loaded
  from files are converted in worker processes (``python -m fuser._convert_worker``), up
  to ``jobs`` at once, each loading its member again: the build process never holds their
  frozen constants, and a worker's memory returns to the system when it ends;
- a **group unit** per stacked group: its stacked form, converted in the build process;
- the **head unit**: per fused output, the members' outputs stacked ``(batch, members,
  ...)`` in, the fused outputs out (the head and any extra outputs).

The join prefixes every unit's names (``u<i>/``) but the shared inputs, stacks each
member's output on axis 1 (``Unsqueeze``, ``Concat``, a ``Gather`` where groups put them out
of member order) into the head's inputs, stores equal initializers once, and takes the
largest opset and IR version of the units. The joined model then goes the way of any
ONNX artifact: checked, verified against the members, sealed.

Member and group units are **cached** (``ConversionOptions.cache_dir``; by default
``$FUSER_CACHE_DIR``, else ``$XDG_CACHE_HOME/fuser``, else ``~/.cache/fuser``), keyed by
the SHA-256 of the member files, the lowering of a group, the fused input names and
output slots, the opset, the versions of TensorFlow, Keras, tf2onnx, ONNX, NumPy,
protobuf and fuser, and the source of the conversion code: a rebuild after retraining one
member converts only that one. A unit taken from the cache is run on the probe batch
against its members' own outputs before it is joined; one that disagrees is converted
again. Entries are written atomically; the oldest are removed beyond
``FUSER_CACHE_BYTES`` (default 4 GB).

Not by units (the whole model is converted as before): groups switched on the batch size,
the cascade head (it routes rows between members), a unit with more weights than the
frozen conversion handles well (``WEIGHTS_AS_INPUTS_BYTES``), and ensembles whose weights
need an external data file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fuser.errors import FuseError

if TYPE_CHECKING:
    from fuser.ensemble import Ensemble

_SOURCES = ("onnx_convert.py", "onnx_units.py", "_convert_worker.py", "stack.py")
_DEFAULT_CACHE_BYTES = 4_000_000_000
_WORKER_TIMEOUT_SECONDS = 3600
# Members with fewer weights are converted in the build process: a worker first spends
# 5 to 6 s importing TensorFlow and loading its member (measured), more than converting
# a small member takes, while a large one (tens of MB: seconds to a minute and gigabytes
# of memory) is worth it.
WORKER_MIN_BYTES = 16_000_000


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
    """How the ONNX writer converts: conversion workers, the cache, and how workers load
    members (as the build did)."""

    jobs: int | None = None  # worker processes at once; None: one per core
    cache_dir: Path | None = None  # None: the default folder; see ``cache_folder``
    cache: bool = True
    safe_mode: bool = True
    custom_objects: dict[str, Any] | None = None
    max_member_bytes: int | None = None

    def workers(self, units: int) -> int:
        # The build process waits while they work: one worker per core.
        return max(1, min(units, self.jobs or os.cpu_count() or 1))


def cache_folder(options: ConversionOptions) -> Path | None:
    """Where converted units are kept, or None without a cache."""
    if not options.cache:
        return None
    if options.cache_dir is not None:
        return Path(options.cache_dir)
    if os.environ.get("FUSER_CACHE_DIR"):
        return Path(os.environ["FUSER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fuser"


@dataclasses.dataclass
class Unit:
    """One piece of the ensemble converted on its own."""

    kind: str  # "member" | "group"
    members: list[Any]  # fuser.members.Member, in member order
    indices: list[int]  # their positions in the ensemble's member order
    inputs: list[str]  # fused input names, in the unit's input order
    slots: list[int]  # per fused output slot, the member output index it reads
    group: Any = None  # fuser.stack.Group, for a group unit
    key: str | None = None  # cache key; None: not cached
    model: Any = None  # the converted ONNX model
    source: str = ""  # "cache", "worker", "this process"


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


def why_whole(ensemble: Ensemble, weights_limit: int, total_limit: int) -> str | None:
    """Why ``ensemble`` is converted as one model rather than by units, or None."""
    if ensemble.switch_batch is not None:
        return "a group is switched on the batch size"
    if getattr(ensemble.head, "routes", False):
        return "the cascade head routes rows between members"
    total = sum(member.parameters for member in ensemble.members) * 4
    if total > total_limit:
        return "the weights need an external data file"
    for unit in _units(ensemble):
        size = sum(member.parameters for member in unit.members) * 4
        if size > weights_limit:
            names = ", ".join(member.name for member in unit.members)
            return f"{names} has {size / 1e6:,.0f} MB of weights"
    return None


def _units(ensemble: Ensemble) -> list[Unit]:
    wiring = ensemble.wiring
    position = {member.name: index for index, member in enumerate(ensemble.members)}
    units, grouped = [], set()
    for group in ensemble.fusion.groups:
        first = group.members[0]
        units.append(
            Unit(
                "group",
                list(group.members),
                [position[member.name] for member in group.members],
                list(wiring.input_order[first.name]),
                list(wiring.output_order[first.name]),
                group=group,
            )
        )
        grouped.update(member.name for member in group.members)
    for member in ensemble.members:
        if member.name not in grouped:
            units.append(
                Unit(
                    "member",
                    [member],
                    [position[member.name]],
                    list(wiring.input_order[member.name]),
                    list(wiring.output_order[member.name]),
                )
            )
    return units


def convert(ensemble: Ensemble, opset: int, options: ConversionOptions) -> tuple[Any, Report]:
    """The ensemble's ONNX model, converted by units and joined (see the module's docstring).

    Returns the model, whose inputs and outputs carry the ensemble's names, and a report.
    """
    started = time.perf_counter()
    units = _units(ensemble)
    folder = cache_folder(options)
    for unit in units:
        unit.key = _key(unit, ensemble.inputs, opset) if folder is not None else None
        if unit.key is not None:
            unit.model = _cached(folder, unit.key)
            if unit.model is not None:
                if _agrees(unit, ensemble):
                    unit.source = "cache"
                else:
                    unit.model = None
    remote = [unit for unit in units if unit.model is None and _worker_job(unit, options)]
    local = [unit for unit in units if unit.model is None and unit not in remote]
    directory = tempfile.TemporaryDirectory(prefix="fuser-units-")
    shares = _shares(remote, options.workers(len(remote))) if remote else []
    workers = [
        _Worker(share, opset, options, Path(directory.name), n) for n, share in enumerate(shares)
    ]
    peaks: list[float] = []
    try:
        for unit in local:  # meanwhile, here: groups, small members, in-memory members
            unit.model = _convert_here(unit, opset)
            unit.source = "this process"
        for worker in workers:
            peaks.append(worker.wait())
    finally:
        for worker in workers:
            worker.kill()
        directory.cleanup()
    for unit in units:
        if unit.key is not None and unit.source != "cache":
            _store(folder, unit.key, unit.model)
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
        _prune(folder)
    return model, report


# Keys and the cache -------------------------------------------------------------------


def _fingerprint() -> dict[str, str]:
    """The versions and conversion code a converted unit depends on."""
    from importlib import metadata

    versions = {}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "numpy", "protobuf", "fuser"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    code = hashlib.sha256()
    for name in _SOURCES:
        code.update(Path(__file__).with_name(name).read_bytes())
    versions["code"] = code.hexdigest()
    return versions


def _key(unit: Unit, input_specs: Sequence[Any], opset: int) -> str | None:
    """A unit's cache key; None for members that are not files (nothing to hash)."""
    hashes = [member.sha256 for member in unit.members]
    if any(digest is None for digest in hashes):
        return None
    description: dict[str, Any] = {
        "kind": unit.kind,
        "members": hashes,
        "inputs": unit.inputs,
        "input_specs": [
            [spec.name, list(spec.shape), spec.dtype]
            for spec in input_specs
            if spec.name in unit.inputs
        ],
        "slots": unit.slots,
        "opset": opset,
        "fingerprint": _fingerprint(),
    }
    if unit.kind == "group":
        description["lowering"] = unit.group.layers
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _cached(folder: Path, key: str) -> Any:
    import onnx

    path = folder / "onnx-units" / f"{key}.onnx"
    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
    except (OSError, Exception):  # missing, or damaged: converted again
        return None
    os.utime(path)  # recently used: pruned last
    return model


def _store(folder: Path, key: str, model: Any) -> None:
    """Write a converted unit to the cache; a cache that cannot be written is skipped."""
    target = folder / "onnx-units" / f"{key}.onnx"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-", delete=False) as out:
            out.write(model.SerializeToString())
        os.replace(out.name, target)
    except OSError:
        return


def _prune(folder: Path) -> None:
    """Remove the least recently used units beyond ``FUSER_CACHE_BYTES``."""
    try:
        limit = int(os.environ.get("FUSER_CACHE_BYTES", _DEFAULT_CACHE_BYTES))
        entries = sorted(
            (entry.stat().st_mtime, entry.stat().st_size, entry)
            for entry in (folder / "onnx-units").glob("*.onnx")
        )
    except (OSError, ValueError):
        return
    total = sum(size for _, size, _ in entries)
    for _, size, entry in entries:
        if total <= limit:
            break
        entry.unlink(missing_ok=True)
        total -= size


def _agrees(unit: Unit, ensemble: Ensemble) -> bool:
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


# Converting ---------------------------------------------------------------------------


def _worker_job(unit: Unit, options: ConversionOptions) -> dict[str, Any] | None:
    """The job a worker process needs to convert ``unit`` on its own, or None when it is
    converted here (groups; small members; members not from files; custom classes a
    fresh process cannot import)."""
    if unit.kind != "member":
        return None
    (member,) = unit.members
    if member.parameters * 4 < WORKER_MIN_BYTES:
        return None
    if member.source is None or member.format == "memory":
        return None
    classes = []
    for name, value in (options.custom_objects or {}).items():
        module = getattr(value, "__module__", None)
        if not module or module == "__main__" or "<locals>" in value.__qualname__:
            return None
        classes.append({"name": name, "module": module, "qualname": value.__qualname__})
    return {
        "name": member.name,
        "path": str(member.source),
        "inputs": unit.inputs,
        "slots": unit.slots,
        "safe_mode": options.safe_mode,
        "custom_objects": classes,
        "max_member_bytes": options.max_member_bytes,
    }


def _shares(units: list[Unit], workers: int) -> list[list[Unit]]:
    """``units`` dealt to ``workers`` processes, largest first to the least loaded: each
    worker imports TensorFlow once (5 to 6 s) for all of its units."""
    shares: list[list[Unit]] = [[] for _ in range(min(workers, len(units)))]
    loads = [0] * len(shares)
    for unit in sorted(units, key=lambda each: -each.members[0].parameters):
        lightest = loads.index(min(loads))
        shares[lightest].append(unit)
        loads[lightest] += unit.members[0].parameters
    return shares


class _Worker:
    """One worker process converting a share of member units, one after another."""

    def __init__(
        self, share: list[Unit], opset: int, options: ConversionOptions, folder: Path, number: int
    ) -> None:
        self.share = share
        self.jobs = [
            {**_worker_job(unit, options), "opset": opset, "output": f"{folder}/{number}_{n}.onnx"}
            for n, unit in enumerate(share)
        ]
        request = folder / f"jobs_{number}.json"
        request.write_text(json.dumps(self.jobs))
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        environment = {
            **os.environ,
            "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fuser._convert_worker", str(request)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        self.peak: float | None = None

    def wait(self) -> float:
        """Wait for the worker; set each unit's model; its peak memory in MB."""
        import onnx

        if self.peak is not None:
            return self.peak
        try:
            stdout, stderr = self.process.communicate(timeout=_WORKER_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            raise FuseError(
                f"Converting members to ONNX in a worker process took over "
                f"{_WORKER_TIMEOUT_SECONDS} s; it was stopped."
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


def _convert_here(unit: Unit, opset: int) -> Any:
    """Convert a unit in this process (a stacked group, or a member not from a file)."""
    import keras
    from keras import ops

    from fuser import stack as stack_lib
    from fuser.fuse import branch

    first = unit.members[0]
    inputs = [
        keras.Input(shape=spec.shape[1:], dtype=spec.dtype, name=name)
        for name, spec in zip(unit.inputs, first.inputs)
    ]
    if unit.kind == "group":
        layers = unit.group.layers
        computed = stack_lib.lower(unit.group, inputs, prefix="unit")
        unit.group.layers = layers  # as the fused model's lowering recorded them
    else:
        computed = keras.tree.flatten(branch(first)(inputs))
    outputs = {
        f"out_{slot}": ops.cast(computed[index], "float32") for slot, index in enumerate(unit.slots)
    }
    if unit.kind == "group":
        owner = "the stacked group of " + ", ".join(member.name for member in unit.members)
    else:
        owner = f'member "{first.name}"'
    return unit_to_onnx(keras.Model(inputs, outputs), unit.inputs, first.inputs, opset, owner)


def unit_to_onnx(
    model: Any, names: Sequence[str], specs: Sequence[Any], opset: int, owner: str
) -> Any:
    """A unit's Keras model (inputs ``names``, a dict of outputs) as an ONNX model whose
    inputs and outputs carry those names (no ``:0``); ``owner`` is what an operation ONNX
    lacks is said to be in (``member "a"``)."""
    import tensorflow as tf

    from fuser.onnx_convert import to_onnx
    from runtime._keras import native_grouped_convolutions

    signature = [
        tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=name)
        for name, spec in zip(names, specs)
    ]

    @tf.function(input_signature=signature)
    def serve(*tensors):
        return model(list(tensors), training=False)

    with native_grouped_convolutions("onnx"):
        concrete = serve.get_concrete_function()
    converted, outputs = to_onnx(concrete, [f"{name}:0" for name in names], opset, owner=owner)
    flat = tf.nest.flatten({name: name for name in concrete.structured_outputs})
    renames = dict(zip(outputs, flat))
    renames.update({f"{name}:0": name for name in names})
    rename(converted.graph, renames)
    return converted


def _convert_head(ensemble: Ensemble, opset: int) -> Any:
    """The head unit: per fused output ``stacked_<output>`` in, the fused outputs out."""
    import keras

    from fuser.fuse import head_outputs

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
    return unit_to_onnx(model, names, specs, opset, "the head")


@dataclasses.dataclass(frozen=True)
class _Spec:
    shape: tuple
    dtype: str


def rename(graph: Any, renames: dict[str, str]) -> None:
    """Rename values everywhere in ``graph`` and its subgraphs."""
    from fuser.onnx_switch import graphs

    for each in graphs(graph):
        for value in [*each.input, *each.output, *each.value_info]:
            value.name = renames.get(value.name, value.name)
        for node in each.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
            node.output[:] = [renames.get(name, name) for name in node.output]


# Joining ------------------------------------------------------------------------------


def _content(tensor: Any) -> tuple:
    """What makes two initializers equal: type, shape and a digest of the values."""
    if tensor.HasField("raw_data"):
        values = tensor.raw_data
    else:
        import onnx

        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = ""
        values = copy.SerializeToString(deterministic=True)
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(values).digest()


def join(ensemble: Ensemble, units: list[Unit], head: Any) -> Any:
    """One ONNX model: the units (names prefixed, inputs shared), each fused output's
    member values stacked in member order into the head, the head's outputs named as the
    ensemble's."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.compose import add_prefix_graph

    nodes: list[Any] = []
    initializers: list[Any] = []
    seen: dict[tuple, str] = {}

    def take(graph: Any, prefix: str, *, rename_inputs: bool) -> Any:
        prefixed = add_prefix_graph(
            graph, prefix, rename_inputs=rename_inputs, rename_outputs=True, inplace=False
        )
        duplicate: dict[str, str] = {}
        for tensor in prefixed.initializer:
            content = _content(tensor)
            if content in seen:
                duplicate[tensor.name] = seen[content]
            else:
                seen[content] = tensor.name
                initializers.append(tensor)
        if duplicate:
            rename(prefixed, duplicate)
        nodes.extend(prefixed.node)
        return prefixed

    for number, unit in enumerate(units):
        take(unit.model.graph, f"u{number}/", rename_inputs=False)
    axis = numpy_helper.from_array(np.array([1], np.int64), "fuser_join/axis_1")
    if any(unit.kind == "member" for unit in units):
        initializers.append(axis)
    for slot, spec in enumerate(ensemble.wiring.outputs):
        parts, order = [], []
        for number, unit in enumerate(units):
            value = f"u{number}/out_{slot}"
            if unit.kind == "member":
                expanded = f"fuser_join/u{number}_{slot}"
                nodes.append(
                    helper.make_node(
                        "Unsqueeze", [value, axis.name], [expanded], name=f"{expanded}/unsqueeze"
                    )
                )
                value = expanded
            parts.append(value)
            order += unit.indices
        stacked = f"head/stacked_{spec.name}"
        joined = stacked if order == sorted(order) else f"fuser_join/concat_{slot}"
        nodes.append(
            helper.make_node("Concat", parts, [joined], axis=1, name=f"fuser_join/concat_{slot}")
        )
        if joined != stacked:
            inverse = numpy_helper.from_array(
                np.argsort(order).astype(np.int64), f"fuser_join/member_order_{slot}"
            )
            initializers.append(inverse)
            nodes.append(
                helper.make_node(
                    "Gather", [joined, inverse.name], [stacked], axis=1, name=f"{stacked}/order"
                )
            )
    head_graph = take(head.graph, "head/", rename_inputs=True)
    head_outputs = {value.name: value for value in head_graph.output}
    outputs = []
    for spec in ensemble.outputs:
        value = onnx.ValueInfoProto()
        value.CopyFrom(head_outputs[f"head/{spec.name}"])
        value.name = spec.name
        outputs.append(value)
        nodes.append(
            helper.make_node(
                "Identity", [f"head/{spec.name}"], [spec.name], name=f"out/{spec.name}"
            )
        )
    inputs = {}
    for unit in units:
        for value in unit.model.graph.input:
            if value.name in unit.inputs and value.name not in inputs:
                inputs[value.name] = value
    graph = helper.make_graph(
        nodes,
        "fused_ensemble",
        [inputs[spec.name] for spec in ensemble.inputs],
        outputs,
        initializers,
    )
    opsets: dict[str, int] = {}
    for model in [*(unit.model for unit in units), head]:
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(domain, v) for domain, v in opsets.items()]
    )
    model.ir_version = max(unit.model.ir_version for unit in units)
    model.ir_version = max(model.ir_version, head.ir_version)
    return model
