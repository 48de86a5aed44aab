"""The ``fuser`` command: a thin argparse layer over ``fuser.build`` and ``runtime.load``.

Heavy imports (TensorFlow, onnxruntime) happen inside the commands, so ``fuser --help``
answers at once. Exit status: 0 ok, 1 the work failed, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuser.errors import FuseError, VerificationError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return arguments.handler(arguments)
    except KeyboardInterrupt:
        print("fuser: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:  # one sentence for the user; the traceback with --debug
        if arguments.debug:
            traceback.print_exc()
        status = EXIT_BAD_INPUT if _is_bad_input(error) else EXIT_FAILED
        print(f"fuser: error: {_message(error)}", file=sys.stderr)
        if status == EXIT_FAILED and not arguments.debug:
            print("fuser: run again with --debug for the traceback.", file=sys.stderr)
        return status


def _is_bad_input(error: BaseException) -> bool:
    from runtime.errors import ArtifactError  # cheap: no onnxruntime, no TensorFlow

    if isinstance(error, VerificationError):
        return False
    return isinstance(error, (FuseError, ArtifactError, ValueError, TypeError, FileNotFoundError))


def _message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    return lines[0] if len(lines) == 1 else "\n".join(["", *(f"  {line}" for line in lines)])


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="fuser",
        description="Compile N saved Keras/TensorFlow models into ONE fused, verified artifact.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    build = commands.add_parser(
        "build",
        parents=[common],
        help="fuse members into one artifact",
        description="Load the members in parallel, check they fit together, fuse them into one "
        "model with a combining head, verify it, and write each -o artifact.",
    )
    build.add_argument(
        "members",
        nargs="+",
        metavar="MEMBER",
        help="a .keras file, a legacy .h5 file or a SavedModel directory; NAME=PATH names it",
    )
    build.add_argument(
        "-o",
        "--output",
        action="append",
        required=True,
        type=Path,
        metavar="OUT",
        help="artifact to write (repeatable): *.onnx, *.keras, or any other path for a SavedModel",
    )
    build.add_argument(
        "--head",
        default="mean",
        help="combining head: mean (default), weighted, median, geometric, vote, stack",
    )
    build.add_argument(
        "--weights", metavar="W1,W2,...", help="the weighted head's weights, one per member"
    )
    build.add_argument(
        "--task",
        action="append",
        metavar="[OUTPUT=]TASK",
        help="probabilities, logits or regression, for every output or one (default: inferred)",
    )
    build.add_argument(
        "--fit-data",
        type=Path,
        metavar="VAL.npz",
        help="validation data: arrays x and y (x_<input>, y_<output> when several); "
        "needed by --head stack and --select",
    )
    build.add_argument(
        "--select", metavar="top:K|greedy:K", help="keep the K best members, or greedy selection"
    )
    build.add_argument(
        "--metric", help="selection metric: log_loss (classifiers), accuracy, mse (regressors), mae"
    )
    build.add_argument(
        "--uncertainty",
        action="store_true",
        help="add std outputs, and entropy and mutual_info for classifiers",
    )
    build.add_argument(
        "--expose-members", action="store_true", help="add a members output (batch, members, ...)"
    )
    build.add_argument(
        "--fusion",
        choices=("auto", "off", "stack"),
        default="auto",
        help="stack same-architecture members into one computation: auto (where measured "
        "faster at every batch size), stack (wherever possible), off (default: auto)",
    )
    build.add_argument("--jobs", type=int, help="members loaded at once (default: one per core)")
    build.add_argument("--xla", action="store_true", help="compile the fused function with XLA")
    build.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    build.add_argument("--input-name", help="name of the fused input (members with one input)")
    build.add_argument("--force", action="store_true", help="replace existing outputs")
    build.add_argument(
        "--unsafe",
        action="store_true",
        help="allow members that carry arbitrary code (Lambda layers); only for trusted files",
    )
    build.add_argument(
        "--custom-objects",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help="a registered Keras class members use (repeatable)",
    )
    build.add_argument("--probe-batch", type=int, default=8, help="rows to verify on (default 8)")
    build.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest allowed error (default 1e-4)"
    )
    build.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="build even when members give NaN or inf on the probe batch (recorded in the "
        "manifest)",
    )
    build.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    build.set_defaults(handler=_build)

    inspect = commands.add_parser("inspect", parents=[common], help="show an artifact's manifest")
    inspect.add_argument("artifact", type=Path, metavar="ARTIFACT")
    inspect.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    inspect.set_defaults(handler=_inspect)

    predict = commands.add_parser(
        "predict", parents=[common], help="run an artifact on a .npy/.npz batch"
    )
    predict.add_argument("artifact", type=Path, metavar="ARTIFACT")
    predict.add_argument(
        "--input", required=True, type=Path, help=".npy (one input) or .npz keyed by input name"
    )
    predict.add_argument(
        "--output", required=True, type=Path, help=".npy (one output) or .npz (all outputs)"
    )
    predict.add_argument("--batch-size", type=int, help="rows per forward pass")
    predict.add_argument(
        "--threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)"
    )
    predict.set_defaults(handler=_predict)
    return parser


def _build(arguments: argparse.Namespace) -> int:
    from fuser import export

    problems = export.destination_problems(arguments.output, force=arguments.force)
    problems += export.check_opset(arguments.opset)
    custom_objects = _custom_objects(arguments.custom_objects, problems)
    problems += _early_format_problems(arguments.members, arguments.output)
    weights = _weights(arguments.weights, problems)
    if problems:
        raise FuseError(problems)

    from fuser.ensemble import build

    ensemble = build(
        arguments.members,
        arguments.head,
        weights=weights,
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
        probe_batch=arguments.probe_batch,
        tolerance=arguments.tolerance,
        allow_nonfinite=arguments.allow_nonfinite,
        progress=not arguments.quiet,
    )
    # Refuse a format that cannot hold a member before writing any artifact.
    problems = [
        problem
        for path in arguments.output
        for problem in export.format_problems(path, ensemble.members)
    ]
    if problems:
        raise FuseError(problems)
    for path in arguments.output:
        ensemble.save(path, force=arguments.force, opset=arguments.opset)
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
    from types import SimpleNamespace

    from fuser import export
    from fuser.members import detect_format, parse_specs

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
    return [problem for path in outputs for problem in export.format_problems(path, detected)]


def _custom_objects(specs: list[str], problems: list[str]) -> dict[str, Any] | None:
    objects = {}
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            problems.append(f"--custom-objects expects MODULE:NAME, received {spec!r}.")
            continue
        try:
            objects[attribute] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            problems.append(f"--custom-objects {spec!r} could not be imported ({error}).")
    return objects or None


def _inspect(arguments: argparse.Namespace) -> int:
    manifest = _read_manifest(arguments.artifact)
    if arguments.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return EXIT_OK
    print(describe_manifest(manifest, str(arguments.artifact)))
    return EXIT_OK


def _read_manifest(path: Path) -> dict[str, Any]:
    """Read only the manifest: no session, no TensorFlow."""
    import zipfile

    from runtime import manifest as manifest_lib
    from runtime.backends import artifact_format
    from runtime.errors import ArtifactError

    kind = artifact_format(path)
    if kind == "savedmodel":
        asset = path / manifest_lib.SAVEDMODEL_ASSET
        if not asset.is_file():
            raise ArtifactError(
                f"Artifact {path} has no fuser manifest ({manifest_lib.SAVEDMODEL_ASSET})."
            )
        return manifest_lib.loads(asset.read_bytes(), str(asset))
    if kind == "keras":
        try:
            with zipfile.ZipFile(path) as archive:
                return manifest_lib.loads(archive.read(manifest_lib.KERAS_ZIP_ENTRY), str(path))
        except (zipfile.BadZipFile, KeyError):
            raise ArtifactError(
                f"Artifact {path} is not a .keras file with a fuser manifest."
            ) from None
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise ArtifactError(f"Artifact {path} is not a readable ONNX model.") from None
    for entry in model.metadata_props:
        if entry.key == manifest_lib.ONNX_METADATA_KEY:
            return manifest_lib.loads(entry.value, str(path))
    raise ArtifactError(f"Artifact {path} is an ONNX model without a fuser manifest.")


def describe_manifest(manifest: dict[str, Any], source: str) -> str:
    """A human-readable summary of a manifest."""
    from runtime.manifest import specs

    artifact = manifest["artifact"]
    details = ", ".join(
        f"{key} {value}" for key, value in sorted(artifact.items()) if key != "format"
    )
    lines = [f"artifact   {source} ({artifact['format']}{', ' + details if details else ''})"]
    lines.append(f"created    {manifest.get('created', '?')}")
    head = manifest["head"]
    params = _head_params(head.get("params", {}))
    lines.append(f"head       {head.get('name')}{' (' + params + ')' if params else ''}")
    lines.append("inputs     " + "; ".join(spec.describe() for spec in specs(manifest, "inputs")))
    lines.append("outputs    " + "; ".join(spec.describe() for spec in specs(manifest, "outputs")))
    for output, task in (manifest.get("tasks") or {}).items():
        lines.append(f"task       {output}: {task['task']} ({task['reason']})")
    fusion = manifest.get("fusion") or {}
    for group in fusion.get("groups", []):
        lines.append(
            f"stacked    {len(group['members'])} members ({', '.join(group['members'])}), "
            f"fusion {fusion.get('mode', '?')}"
        )
        for layer in group["layers"]:
            lines.append(f"             {layer['layer']} ({layer['type']}): {layer['lowering']}")
    for name, reason in (fusion.get("plain") or {}).items():
        if fusion.get("groups") or fusion.get("mode") != "off":
            lines.append(f"plain      {name}: {reason}")
    validation = manifest.get("validation") or {}
    for output, record in validation.get("outputs", {}).items():
        members_text = ", ".join(
            f"{name} {_score(value)}" for name, value in record["members"].items()
        )
        in_sample = " in sample" if record.get("ensemble_is_in_sample") else ""
        lines.append(
            f"validation {output} {record['metric']} on {validation['source']} "
            f"({validation['rows']} rows): ensemble {_score(record['ensemble'])}{in_sample}; "
            f"members {members_text}"
        )
    selection = validation.get("selection")
    if selection:
        picks = ", ".join(f"{name}={count}" for name, count in selection["picks"].items())
        lines.append(
            f"selection  {selection['strategy']}:{selection['size']} by {selection['metric']}: "
            f"kept {', '.join(selection['kept'])} (picks {picks})"
        )
    members = manifest["members"]
    lines.append(f"members    {len(members)}")
    width = max((len(str(member.get("name"))) for member in members), default=4)
    for member in members:
        sha = (member.get("sha256") or "-")[:12]
        lines.append(
            f"  {member.get('name')!s:<{width}}  {member.get('format')!s:<10} "
            f"{member.get('parameters', 0):>12,} params  sha256 {sha}  {member.get('source')}"
        )
    verification = manifest.get("verification", {})
    for what, record in sorted(verification.items()):
        if isinstance(record, dict) and "max_abs_error" in record:
            lines.append(
                f"verified   {what}: max abs error {record['max_abs_error']:.2e} on "
                f"{record['probe_batch']} probe rows (tolerance {record['tolerance']:g})"
            )
    if verification.get("nonfinite_allowed"):
        counts = verification.get("nonfinite_values") or {}
        found = ", ".join(
            f"{member} {sum(record['nan'] + record['inf'] for record in outputs.values())}"
            for member, outputs in counts.items()
        )
        lines.append(
            "nonfinite  allowed (--allow-nonfinite); NaN or inf on the probe batch: "
            + (found or "none")
        )
    versions = manifest.get("versions", {})
    lines.append(
        "versions   " + ", ".join(f"{key} {value}" for key, value in sorted(versions.items()))
    )
    return "\n".join(lines)


def _score(value: float | None) -> str:
    """A validation score; null in the manifest is a non-finite one."""
    return "non-finite" if value is None else f"{value:.4g}"


def _head_params(params: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(params.items()):
        if isinstance(value, dict):  # a fitted head: per output, the model in brief
            brief = {
                k: v for k, v in value.items() if k in ("model", "member_weights", "l2", "alpha")
            }
            value = ", ".join(f"{k} {v}" for k, v in brief.items())
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def _predict(arguments: argparse.Namespace) -> int:
    import numpy as np

    import runtime

    model = runtime.load(arguments.artifact, threads=arguments.threads)
    batch = _read_batch(arguments.input, [spec.name for spec in model.inputs])
    result = model.predict(batch, batch_size=arguments.batch_size)
    outputs = result if isinstance(result, dict) else {model.outputs[0].name: result}
    path = arguments.output
    if path.suffix.lower() == ".npz":
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(temporary, **outputs)
    elif path.suffix.lower() == ".npy":
        if len(outputs) > 1:
            raise ValueError(
                f"This ensemble has {len(outputs)} outputs ({', '.join(outputs)}); write them "
                f"to an .npz file, not {path}."
            )
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
        np.save(temporary, next(iter(outputs.values())))
    else:
        raise ValueError(f"--output must end in .npy or .npz, received {path}.")
    os.replace(temporary, path)
    rows = next(iter(outputs.values())).shape[0]
    print(f"Wrote {rows} rows of {', '.join(outputs)} to {path}.", file=sys.stderr)
    return EXIT_OK


def _read_batch(path: Path, names: list[str]) -> Any:
    import numpy as np

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
