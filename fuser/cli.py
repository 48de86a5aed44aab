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

from fuser.errors import FuseError, StageError, VerificationError

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
    except BrokenPipeError:  # the reader of our output went away (| head): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
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

    if isinstance(error, (VerificationError, StageError)):
        return False
    return isinstance(error, (FuseError, ArtifactError, ValueError, TypeError, FileNotFoundError))


def _message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    return lines[0] if len(lines) == 1 else "\n".join(["", *(f"  {line}" for line in lines)])


def _parser() -> argparse.ArgumentParser:
    # --debug is read before or after the subcommand: the subcommands' copy has no default,
    # so it never resets what the main parser read (argparse's defaults would).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    parser = argparse.ArgumentParser(
        prog="fuser",
        description="Compile N saved Keras/TensorFlow models into ONE fused, verified artifact.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
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
        help="combining head: mean (default), weighted, median, geometric, vote, stack, cascade",
    )
    build.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="the weighted head's weights, one per member (also the cascade's combination)",
    )
    build.add_argument(
        "--cascade-order",
        metavar="A,B,...",
        help="the cascade's stages by member name (default: cheapest first, timed on this "
        "machine); a stacked group is one stage",
    )
    build.add_argument(
        "--cascade-tolerance",
        type=float,
        metavar="T",
        help="how much worse than the full ensemble the cascade may score on --fit-data, in "
        "the metric's units (default 0.001: one accuracy error per thousand rows)",
    )
    build.add_argument(
        "--cascade-confidence",
        metavar="max|margin",
        help="what the cascade's thresholds compare: the largest probability (max, default) "
        "or the largest minus the second largest (margin)",
    )
    build.add_argument(
        "--cascade-exit-stage",
        action="store_true",
        help="add an output exit_stage: the stage each row left the cascade at",
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
        help="stack same-architecture members into one computation: auto (where timed on "
        "this machine not slower at any batch size), stack (wherever possible), off "
        "(default: auto)",
    )
    build.add_argument(
        "--jobs",
        type=int,
        help="members loaded at once (default: one per core), and converted to ONNX at once in "
        "worker processes (default: one per core)",
    )
    build.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="where members converted to ONNX are kept for the next build (default: "
        "$FUSER_CACHE_DIR, else ~/.cache/fuser)",
    )
    build.add_argument(
        "--no-cache", action="store_true", help="convert every member again; keep nothing"
    )
    build.add_argument(
        "--max-member-bytes",
        type=_byte_size,
        metavar="BYTES",
        help="the most one member may expand to in memory, e.g. 8G (default: 4G, or 4x its "
        "size on disk if larger); refuses zip bombs before anything parses them",
    )
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
    inspect.add_argument(
        "--no-verify", action="store_true", help="skip the check against the SHA-256 seal"
    )
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
    predict.add_argument("--force", action="store_true", help="replace an existing --output")
    predict.add_argument(
        "--threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)"
    )
    predict.add_argument(
        "--no-verify", action="store_true", help="skip the check against the SHA-256 seal"
    )
    predict.add_argument(
        "--custom-objects",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help="a registered Keras class a .keras artifact's members use (repeatable); "
        "imports MODULE",
    )
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve an artifact over TF Serving's REST API (needs fuser[serve])",
        description="Serve ARTIFACT over TensorFlow Serving's REST API: POST "
        "/v1/models/NAME:predict, GET /v1/models/NAME and /v1/models/NAME/metadata, plus "
        "/healthz and /metrics. Concurrent requests are batched dynamically.",
    )
    serve.add_argument("artifact", type=Path, metavar="ARTIFACT")
    serve.add_argument("--name", help="model name in the URLs (default: the artifact's stem)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=8501, help="port (default 8501, TF Serving's REST port)"
    )
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="rows per coalesced forward pass (default 64)",
    )
    serve.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=2.0,
        help="longest wait for more requests once one is queued (default 2)",
    )
    serve.add_argument("--no-batching", action="store_true", help="run every request on its own")
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=64 * 2**20,
        help="largest request body (default 64 MiB)",
    )
    serve.add_argument(
        "--request-timeout-s",
        type=float,
        default=60.0,
        help="seconds a client has to send a whole request, headers and body (default 60)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at most; past it, the one waiting longest for a request is "
        "closed (default 512)",
    )
    serve.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    serve.add_argument(
        "--no-verify", action="store_true", help="skip the check against the SHA-256 seal"
    )
    serve.add_argument(
        "--custom-objects",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help="a registered Keras class a .keras artifact's members use (repeatable); "
        "imports MODULE",
    )
    serve.set_defaults(handler=_serve)

    export = commands.add_parser(
        "export", parents=[common], help="package an artifact for Triton or TF Serving"
    )
    targets = export.add_subparsers(dest="target", metavar="TARGET", required=True)
    triton = targets.add_parser(
        "triton",
        parents=[common],
        help="write REPO/NAME/1/model.onnx and REPO/NAME/config.pbtxt",
    )
    triton.add_argument("artifact", type=Path, metavar="ARTIFACT.onnx")
    triton.add_argument("repository", type=Path, metavar="REPO")
    triton.add_argument("--name", help="model name (default: the artifact's stem)")
    triton.add_argument("--max-batch-size", type=int, default=64, help="default 64")
    triton.add_argument(
        "--max-queue-delay-us", type=int, default=2000, help="dynamic batcher delay (default 2000)"
    )
    triton.add_argument("--instances", type=int, default=1, help="CPU instances (default 1)")
    triton.add_argument("--force", action="store_true", help="replace an existing model")
    triton.set_defaults(handler=_export_triton)
    tfserving = targets.add_parser(
        "tfserving", parents=[common], help="write REPO/NAME/VERSION/ from a SavedModel artifact"
    )
    tfserving.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    tfserving.add_argument("repository", type=Path, metavar="REPO")
    tfserving.add_argument("--name", help="model name (default: the directory's name)")
    tfserving.add_argument("--version", type=int, default=1, help="version directory (default 1)")
    tfserving.add_argument("--force", action="store_true", help="replace an existing version")
    tfserving.set_defaults(handler=_export_tfserving)
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


def _byte_size(text: str) -> int:
    from fuser.members import parse_byte_size

    try:
        return parse_byte_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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


def _inspect(arguments: argparse.Namespace) -> int:
    from runtime import integrity
    from runtime.backends import artifact_format

    path = arguments.artifact
    manifest = integrity.read_manifest(artifact_format(path), path, verify=not arguments.no_verify)
    if arguments.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return EXIT_OK
    print(describe_manifest(manifest, str(path), verified=not arguments.no_verify))
    return EXIT_OK


def describe_manifest(manifest: dict[str, Any], source: str, *, verified: bool = False) -> str:
    """A human-readable summary of a manifest (``verified``: its seal was checked)."""
    from runtime.manifest import specs

    artifact = manifest["artifact"]
    details = ", ".join(
        f"{key} {value}" for key, value in sorted(artifact.items()) if key != "format"
    )
    lines = [f"artifact   {source} ({artifact['format']}{', ' + details if details else ''})"]
    lines.append(f"created    {manifest.get('created', '?')}")
    build = manifest.get("build") or {}
    figures = [
        f"{label} {build[key]:,.{digits}f}{unit}"
        for key, label, unit, digits in (
            ("load_seconds", "members loaded in", " s", 2),
            ("peak_memory_mb", "peak memory", " MB", 0),
        )
        if isinstance(build.get(key), (int, float)) and not isinstance(build.get(key), bool)
    ]
    conversion = build.get("onnx_conversion")
    if isinstance(conversion, dict) and conversion.get("by") == "units":
        units = [unit for unit in conversion.get("units") or [] if isinstance(unit, dict)]
        counts: dict[str, int] = {}
        for unit in units:
            counts[str(unit.get("converted"))] = counts.get(str(unit.get("converted")), 0) + 1
        places = {"cache": "from the cache", "worker": "in workers", "this process": "here"}
        done = ", ".join(
            f"{count} {places.get(where, where)}" for where, count in sorted(counts.items())
        )
        figures.append(f"ONNX converted by units ({done})")
    elif isinstance(conversion, dict) and conversion.get("by") == "whole":
        figures.append(f"ONNX converted whole ({conversion.get('why')})")
    if figures:
        lines.append("build      " + ", ".join(figures))
    head = manifest["head"]
    cascade = head.get("name") == "cascade"
    params = "" if cascade else _head_params(head.get("params", {}))
    lines.append(f"head       {head.get('name')}{' (' + params + ')' if params else ''}")
    if cascade:
        lines += _cascade_lines(head.get("params") or {})
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
        measured = group.get("measured")
        if measured:
            from fuser.costs import Measurement  # standard library only: --help stays fast

            timed = Measurement.from_manifest(measured)
            lines.append(f"             timed, stacked vs plain: {timed.describe()}")
        limit = group.get("max_stacked_batch")
        if limit is not None:
            line = f"             stacked up to batch {limit}, plain branches above"
            onnx_limit = artifact.get("switch_batch")
            if onnx_limit is not None and onnx_limit != limit:
                line += (
                    f" (this ONNX artifact: up to batch {onnx_limit}, the smallest limit of "
                    "its switched groups)"
                )
            lines.append(line)
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
        if "full_ensemble" in record:  # a cascade: and every member on every row
            in_sample += f" (full ensemble {_score(record['full_ensemble'])})"
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
    for what, record in sorted((verification.get("routing") or {}).items()):
        lines.append(
            f"routing    {what}: exit stages {record['exit_stages']}: as the NumPy reference "
            f"routes them on all {record['fit_rows']} validation rows "
            f"({record['fit_rows_routed_otherwise']} otherwise) and {record['probe_rows']} "
            f"probe rows ({record['probe_rows_routed_otherwise']} otherwise, "
            f"{record['probe_rows_near_a_threshold']} within float error of a threshold)"
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
    seal = manifest.get("integrity") or {}
    if seal:
        state = "verified" if verified else "not checked (--no-verify)"
        lines.append(
            f"integrity  {seal.get('algorithm')} {state}: {len(seal.get('content', {}))} "
            f"piece(s) and the manifest, seal {str(seal.get('manifest'))[:12]}"
        )
    versions = manifest.get("versions", {})
    lines.append(
        "versions   " + ", ".join(f"{key} {value}" for key, value in sorted(versions.items()))
    )
    return "\n".join(lines)


def _cascade_lines(params: dict[str, Any]) -> list[str]:
    """The cascade's stages, thresholds, exit rates and costs, and its validation figures."""
    stages = params.get("stages") or []
    unit = params.get("cost_unit", "")
    fit = params.get("fit") or {}
    lines = [
        f"cascade    {len(stages)} stages, {params.get('confidence')} confidence, "
        f"{params.get('order')}; {params.get('metric')} within {params.get('tolerance'):g} of "
        "the full ensemble"
    ]
    for number, stage in enumerate(stages, 1):
        if number == len(stages):
            threshold = "last"
        elif stage.get("threshold") is None:
            threshold = "no early exit"
        else:
            threshold = f"threshold {stage['threshold']:.6g}"
        lines.append(
            f"stage {number:<4} {'+'.join(stage['members'])}: {threshold}, cost "
            f"{stage['cost_per_row']:.4g} {unit} per row, leaves {stage['exit_rate']:.1%} "
            f"(reaches {stage['reach_rate']:.1%})"
        )
    expected, full = params.get("expected_cost_per_row"), params.get("full_cost_per_row")
    if expected and full:
        lines.append(
            f"expected   cost per row {expected:.4g} {unit} against {full:.4g} for the full "
            f"ensemble ({full / expected:.2f}x less); {params.get('metric')} "
            f"{fit.get('cascade', float('nan')):.4f} against {fit.get('full', float('nan')):.4f} "
            f"on {fit.get('source')} ({fit.get('rows')} rows)"
        )
    lines.append(f"costs      {params.get('cost_source')}")
    return lines


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
    import runtime

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
    import numpy as np

    from fuser import placement

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


def _serve(arguments: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise FuseError(
            'fuser serve needs the serve extra: pip install "fuser[serve]" (starlette, uvicorn).'
        ) from None
    import runtime
    from runtime.server import ServeOptions, run

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


def _export_triton(arguments: argparse.Namespace) -> int:
    from fuser.packaging import export_triton

    target = export_triton(
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


def _export_tfserving(arguments: argparse.Namespace) -> int:
    from fuser.packaging import export_tfserving

    target = export_tfserving(
        arguments.artifact,
        arguments.repository,
        name=arguments.name,
        version=arguments.version,
        force=arguments.force,
    )
    print(f"Wrote the TF Serving model version {target}.", file=sys.stderr)
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
