"""The commands and their options, as ``fuser --help`` shows them."""

from __future__ import annotations

import argparse
from pathlib import Path

from fuser import __version__
from fuser.sizes import parse_byte_size


def parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--version", action="version", version=f"fuser {__version__}")
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
        "machine); a fused group is one stage",
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
        choices=("auto", "on", "off", "stack"),
        default="auto",
        metavar="auto|on|off",
        help="horizontal fusion: compute same-architecture members as one. The default, "
        "auto, fuses a group where timing on this machine finds it not slower; on fuses "
        "every group that can be ('stack' is its first name); off fuses none",
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
        help="where members converted to ONNX, and records of the members loaded, are kept so "
        "that the next build loads and converts only what changed (default: $FUSER_CACHE_DIR, "
        "else ~/.cache/fuser)",
    )
    build.add_argument(
        "--no-cache",
        action="store_true",
        help="load and convert every member again; keep nothing",
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
    build.set_defaults(handler="fuser.cli.commands:build")

    loading = argparse.ArgumentParser(add_help=False)  # what predict and serve share
    loading.add_argument(
        "--no-verify", action="store_true", help="skip the check against the SHA-256 seal"
    )
    loading.add_argument(
        "--custom-objects",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help="a registered Keras class a .keras artifact's members use (repeatable); "
        "imports MODULE",
    )

    inspect = commands.add_parser("inspect", parents=[common], help="show an artifact's manifest")
    inspect.add_argument("artifact", type=Path, metavar="ARTIFACT")
    inspect.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    inspect.add_argument(
        "--no-verify", action="store_true", help="skip the check against the SHA-256 seal"
    )
    inspect.set_defaults(handler="fuser.cli.inspect:inspect")

    predict = commands.add_parser(
        "predict", parents=[common, loading], help="run an artifact on a .npy/.npz batch"
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
    predict.set_defaults(handler="fuser.cli.commands:predict")

    serve = commands.add_parser(
        "serve",
        parents=[common, loading],
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
    serve.set_defaults(handler="fuser.cli.commands:serve")

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
    triton.set_defaults(handler="fuser.cli.commands:export_triton")
    tfserving = targets.add_parser(
        "tfserving", parents=[common], help="write REPO/NAME/VERSION/ from a SavedModel artifact"
    )
    tfserving.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    tfserving.add_argument("repository", type=Path, metavar="REPO")
    tfserving.add_argument("--name", help="model name (default: the directory's name)")
    tfserving.add_argument("--version", type=int, default=1, help="version directory (default 1)")
    tfserving.add_argument("--force", action="store_true", help="replace an existing version")
    tfserving.set_defaults(handler="fuser.cli.commands:export_tfserving")
    return parser


def _byte_size(text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
