"""What each command does, given its parsed arguments; each returns the exit status."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

import runtime
from fuser import packaging
from fuser.builder import build as build_ensemble
from fuser.cli.status import EXIT_OK
from fuser.errors import FuseError
from fuser.formats import placement
from fuser.formats.onnx import check_opset
from fuser.formats.registry import format_problems
from fuser.formats.writer import output, output_problems
from fuser.members import detect_format, parse_specs
from runtime.server import ServeOptions, run


def build(arguments: argparse.Namespace) -> int:
    # Outputs first, once: a build bound to fail at the end fails before it starts.
    problems = output_problems(arguments.output, force=arguments.force)
    problems += check_opset(arguments.opset)
    custom_objects = _custom_objects(arguments.custom_objects, problems)
    problems += _early_format_problems(arguments.members, arguments.output)
    weights = _weights(arguments.weights, problems)
    if problems:
        raise FuseError(problems)
    outputs = [output(path, force=arguments.force) for path in arguments.output]
    ensemble = build_ensemble(
        arguments.members,
        arguments.head,
        weights=weights,
        cascade_order=arguments.cascade_order.split(",") if arguments.cascade_order else None,
        cascade_tolerance=arguments.cascade_tolerance,
        cascade_confidence=arguments.cascade_confidence,
        cascade_exit_stage=arguments.cascade_exit_stage,
        task=arguments.task,
        fit_data=arguments.fit_data,
        select=arguments.select,
        metric=arguments.metric,
        uncertainty=arguments.uncertainty,
        expose_members=arguments.expose_members,
        fusion=arguments.fusion,
        jobs=arguments.jobs,
        input_name=arguments.input_name,
        xla=arguments.xla,
        safe_mode=not arguments.unsafe,
        custom_objects=custom_objects,
        max_member_bytes=arguments.max_member_bytes,
        cache=not arguments.no_cache,
        cache_dir=arguments.cache,
        probe_batch=arguments.probe_batch,
        tolerance=arguments.tolerance,
        allow_nonfinite=arguments.allow_nonfinite,
        progress=not arguments.quiet,
    )
    # Refuse a format that cannot hold a member before writing any artifact.
    problems = [
        problem for each in outputs for problem in format_problems(each.path, ensemble.members)
    ]
    if problems:
        raise FuseError(problems)
    ensemble.save_all(outputs, opset=arguments.opset)
    return EXIT_OK


def _weights(text: str | None, problems: list[str]) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        problems.append(
            f"--weights expects numbers separated by commas, like 0.5,0.3,0.2; got {text!r}."
        )
        return None


def _early_format_problems(members: list[str], outputs: list[Path]) -> list[str]:
    """Formats that cannot hold some member, found before anything is loaded.

    Detecting a member's format reads only its files, so a build bound to fail at the
    writing stage fails in a second instead of after loading and fusing.
    """

    try:
        specs = parse_specs(members)
    except FuseError:
        return []  # the build reports it, with every other problem
    detected = []
    for spec in specs:
        try:
            kind = detect_format(spec)
        except FuseError:
            continue
        detected.append(SimpleNamespace(describe=spec.describe, format=kind, source=spec.source))
    return [problem for path in outputs for problem in format_problems(path, detected)]


def _custom_objects(specs: list[str], problems: list[str]) -> dict[str, Any] | None:
    """``--custom-objects MODULE:NAME`` values as ``{NAME: class}``, for ``build``,
    ``predict`` and ``serve``. Importing MODULE also runs its registrations
    (``register_keras_serializable``), so Keras finds the class by its registered name."""
    objects = {}
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            problems.append(f"--custom-objects expects MODULE:NAME, received {spec!r}.")
            continue
        try:
            objects[attribute] = getattr(importlib.import_module(module_name), attribute)
        except ModuleNotFoundError as error:
            problems.append(
                f"--custom-objects {spec!r} could not be imported ({error}); put the folder "
                "that holds the module on PYTHONPATH."
            )
        except (ImportError, AttributeError) as error:
            problems.append(f"--custom-objects {spec!r} could not be imported ({error}).")
    return objects or None


def predict(arguments: argparse.Namespace) -> int:
    _check_output(arguments.output, force=arguments.force)  # before any work
    problems: list[str] = []
    custom_objects = _custom_objects(arguments.custom_objects, problems)
    if problems:
        raise FuseError(problems)
    model = runtime.load(
        arguments.artifact,
        threads=arguments.threads,
        verify=not arguments.no_verify,
        custom_objects=custom_objects,
    )
    batch = _read_batch(arguments.input, [spec.name for spec in model.inputs])
    result = model.predict(batch, batch_size=arguments.batch_size)
    outputs = result if isinstance(result, dict) else {model.outputs[0].name: result}
    _write_outputs(arguments.output, outputs, force=arguments.force)
    rows = next(iter(outputs.values())).shape[0]
    print(f"Wrote {rows} rows of {', '.join(outputs)} to {arguments.output}.", file=sys.stderr)
    return EXIT_OK


def _check_output(path: Path, *, force: bool) -> None:
    if path.suffix.lower() not in (".npy", ".npz"):
        raise ValueError(f"--output must end in .npy or .npz, received {path}.")
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a .npy or .npz file path.")
    if (path.exists() or path.is_symlink()) and not force:
        raise ValueError(f"--output {path} already exists; pass --force to replace it.")
    if not path.parent.is_dir():
        raise ValueError(f"The folder {path.parent} of --output {path} does not exist.")


def _write_outputs(path: Path, outputs: dict[str, Any], *, force: bool) -> None:
    """Write the answers to ``path`` (.npy for one output, .npz for any): beside it first,
    then one rename; a failed write (a full disk, say) leaves nothing behind."""

    suffix = path.suffix.lower()
    _check_output(path, force=force)
    if suffix == ".npy" and len(outputs) > 1:
        raise ValueError(
            f"This ensemble has {len(outputs)} outputs ({', '.join(outputs)}); write them "
            f"to an .npz file, not {path}."
        )
    temporary = placement.temporary_beside(path)
    try:
        with open(temporary, "wb") as handle:
            if suffix == ".npz":
                np.savez(handle, **outputs)
            else:
                np.save(handle, next(iter(outputs.values())))
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(temporary, path)
        else:
            placement.place(temporary, path, "onnx", force=False)
    except OSError as error:
        raise OSError(f"Could not write {path}: {error.strerror or error}.") from error
    finally:
        placement.remove(temporary)


def serve(arguments: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise FuseError(
            'fuser serve needs the serve extra: pip install "fuser[serve]" (starlette, uvicorn).'
        ) from None

    options = ServeOptions(
        name=arguments.name or arguments.artifact.stem,
        max_batch_size=arguments.max_batch_size,
        batch_timeout_ms=arguments.batch_timeout_ms,
        batching=not arguments.no_batching,
        max_body_bytes=arguments.max_body_bytes,
        request_timeout_s=arguments.request_timeout_s,
        max_connections=arguments.max_connections,
    )
    problems = options.check()
    if not 0 <= arguments.port <= 65535:
        problems.append(f"--port must be between 0 and 65535, got {arguments.port}.")
    custom_objects = _custom_objects(arguments.custom_objects, problems)
    if problems:
        raise FuseError(problems)
    model = runtime.load(
        arguments.artifact,
        threads=arguments.threads,
        verify=not arguments.no_verify,
        custom_objects=custom_objects,
    )
    batching = (
        f"dynamic batching up to {options.max_batch_size} rows, {options.batch_timeout_ms:g} ms"
        if options.batching
        else "no batching"
    )
    print(
        f"Serving {arguments.artifact} as '{options.name}' on "
        f"http://{arguments.host}:{arguments.port}/v1/models/{options.name} ({batching}).",
        file=sys.stderr,
        flush=True,
    )
    run(model, options, host=arguments.host, port=arguments.port)
    return EXIT_OK


def export_triton(arguments: argparse.Namespace) -> int:
    target = packaging.export_triton(
        arguments.artifact,
        arguments.repository,
        name=arguments.name,
        max_batch_size=arguments.max_batch_size,
        max_queue_delay_us=arguments.max_queue_delay_us,
        instances=arguments.instances,
        force=arguments.force,
    )
    print(f"Wrote the Triton model {target} (config.pbtxt, 1/model.onnx).", file=sys.stderr)
    return EXIT_OK


def export_tfserving(arguments: argparse.Namespace) -> int:
    target = packaging.export_tfserving(
        arguments.artifact,
        arguments.repository,
        name=arguments.name,
        version=arguments.version,
        force=arguments.force,
    )
    print(f"Wrote the TF Serving model version {target}.", file=sys.stderr)
    return EXIT_OK


def _read_batch(path: Path, names: list[str]) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"Input file {path} does not exist.")
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle user files
    except ValueError as error:
        raise ValueError(
            f"Input file {path} could not be read without unpickling ({error})."
        ) from None
    if isinstance(data, np.ndarray):
        return data
    with data:
        arrays = {key: data[key] for key in data.files}
    if len(names) == 1 and len(arrays) == 1:
        return next(iter(arrays.values()))
    return arrays
