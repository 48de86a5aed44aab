"""Model repositories for serving systems: Triton for ONNX, TF Serving for SavedModel.

``fuser export triton ARTIFACT.onnx REPO`` writes ``REPO/<name>/1/model.onnx`` and
``REPO/<name>/config.pbtxt`` (inputs, outputs, max batch size and dynamic batching from
the manifest); ``fuser export tfserving ARTIFACT_DIR REPO`` writes
``REPO/<name>/<version>/`` as TF Serving's model server expects. The artifact is checked
against its seal first and copied byte for byte, so the copy stays verifiable. Each model
directory is assembled under a hidden temporary name and placed with one rename
(``fuser.formats.placement``): ``--force`` replaces only what fuser exported there before.

A model name is one path component inside the repository, as Triton and TF Serving
name models by their folder: letters, digits, ``_``, ``.`` and ``-``, not starting with
a dot (so never ``.``, ``..`` or a hidden folder), at most 255 characters.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from fuser.errors import FuseError
from fuser.formats import placement
from runtime import ArtifactError, readers
from runtime.readers import artifact_format

TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}
_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}$")
# TF Serving reads version folders as int64.
_MAX_VERSION = 2**63 - 1


def _checked_manifest(artifact: Path, kind: str) -> dict[str, Any]:
    try:
        found = artifact_format(artifact)
        if found != kind:
            labels = {"onnx": "an ONNX", "savedmodel": "a SavedModel", "keras": "a .keras"}
            raise FuseError(
                f"{artifact} is {labels[found]} artifact; this export takes "
                f"{'an .onnx file' if kind == 'onnx' else 'a SavedModel directory'}."
            )
        return readers.read_manifest(kind, artifact)
    except ArtifactError as error:
        raise FuseError(str(error)) from None


def _model_directory(repository: Path, name: str) -> Path:
    if not isinstance(name, str) or not _NAME.match(name):
        raise FuseError(
            f"The model name {name!r} must be one folder name inside the repository: letters, "
            "digits, '_', '.' and '-', not starting with '.', at most 255 characters."
        )
    return repository / name


def triton_config(
    manifest: dict[str, Any],
    name: str,
    *,
    max_batch_size: int,
    max_queue_delay_us: int,
    instances: int,
) -> str:
    """Triton's ``config.pbtxt`` (protobuf text format of ``ModelConfig``) for an ONNX artifact."""

    def tensors(key: str) -> str:
        entries = []
        for spec in manifest[key]:
            dtype = TRITON_DTYPES.get(spec["dtype"])
            if dtype is None:
                raise FuseError(
                    f"Triton has no data type for {key[:-1]} {spec['name']!r} ({spec['dtype']})."
                )
            dims = ", ".join(str(-1 if dim is None else dim) for dim in spec["shape"][1:])
            entries.append(
                f'  {{\n    name: "{spec["name"]}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'
            )
        return ",\n".join(entries)

    seal = manifest.get("integrity", {}).get("manifest", "")
    members = ",".join(member["name"] for member in manifest["members"])
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{tensors('inputs')}\n]\n"
        f"output [\n{tensors('outputs')}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        "instance_group [\n"
        f"  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n"
        "]\n"
        'parameters {\n  key: "fuser_manifest_sha256"\n'
        f'  value {{ string_value: "{seal}" }}\n}}\n'
        'parameters {\n  key: "fuser_members"\n'
        f'  value {{ string_value: "{members}" }}\n}}\n'
    )


def export_triton(
    artifact: str | os.PathLike,
    repository: str | os.PathLike,
    *,
    name: str | None = None,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    force: bool = False,
) -> Path:
    """Write a Triton model repository entry for an ONNX artifact; returns the model directory."""
    artifact, repository = Path(artifact), Path(repository)
    problems = []
    if (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or max_batch_size < 1
    ):
        problems.append(f"--max-batch-size must be a positive integer, got {max_batch_size!r}.")
    if not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
        problems.append(
            f"--max-queue-delay-us must be a non-negative integer, got {max_queue_delay_us!r}."
        )
    if not isinstance(instances, int) or instances < 1:
        problems.append(f"--instances must be a positive integer, got {instances!r}.")
    if problems:
        raise FuseError(problems)
    manifest = _checked_manifest(artifact, "onnx")
    name = artifact.stem if name is None else name
    target = _model_directory(repository, name)
    config = triton_config(
        manifest,
        name,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
    )
    repository.mkdir(parents=True, exist_ok=True)
    placement.check_destination(target, "triton", force=force)
    with placement.staged(target, "triton", force=force) as staging:
        (staging / "1").mkdir(parents=True)
        shutil.copyfile(artifact, staging / "1" / "model.onnx")
        # Weights over 2 GB live beside the model, found by their (unchanged) names.
        for data in manifest["artifact"].get("external_data", []):
            shutil.copyfile(artifact.resolve().parent / data, staging / "1" / data)
        (staging / "config.pbtxt").write_text(config)
    return target


def export_tfserving(
    artifact: str | os.PathLike,
    repository: str | os.PathLike,
    *,
    name: str | None = None,
    version: int = 1,
    force: bool = False,
) -> Path:
    """Copy a SavedModel artifact to ``repository/<name>/<version>/``; returns that directory."""
    artifact, repository = Path(artifact), Path(repository)
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 1 <= version <= _MAX_VERSION
    ):
        raise FuseError(
            f"--version must be an integer from 1 to {_MAX_VERSION} (TF Serving reads version "
            f"folders as int64), got {version!r}."
        )
    _checked_manifest(artifact, "savedmodel")
    name = artifact.name if name is None else name
    model = _model_directory(repository, name)
    target = model / str(version)
    if model.exists() and not model.is_dir():
        raise FuseError(f"{model} exists and is not a folder; TF Serving needs a folder there.")
    model.mkdir(parents=True, exist_ok=True)
    placement.check_destination(target, "tfserving", force=force)
    with placement.staged(target, "tfserving", force=force) as staging:
        shutil.copytree(artifact, staging)
    return target
