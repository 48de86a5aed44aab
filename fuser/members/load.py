"""Loading members, in parallel: Keras files in safe mode, SavedModels by their signature.

Loading runs in a thread pool: threads beat processes here because a loaded Keras model
cannot cross a process boundary without being serialised and loaded a second time.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fuser._tf import tensorflow
from fuser.errors import FuseError
from fuser.members.detect import detect_format
from fuser.members.limits import Limits, check_max_member_bytes, check_savedmodel_variables
from fuser.members.spec import Member, MemberSpec, check_names, sha256_of
from runtime.custom_objects import explain_load_error, keyed_by_registered_name
from runtime.manifest import TensorSpec


def load_members(
    specs: Sequence[MemberSpec],
    *,
    jobs: int | None = None,
    safe_mode: bool = True,
    custom_objects: dict[str, Any] | None = None,
    on_loaded: Callable[[Member], None] | None = None,
    max_member_bytes: int | None = None,
) -> tuple[list[Member], float]:
    """Load all members, ``jobs`` at a time, and report every failure at once.

    Args:
        max_member_bytes: the most one member may expand to in memory (zip entries,
            HDF5 datasets, SavedModel variables), checked before it is parsed; None for
            ``DEFAULT_MAX_MEMBER_BYTES`` or 4x the member's size on disk, if larger.

    Returns:
        The members in the order given, and the wall time of loading (TensorFlow's
        import excluded).

    Raises:
        FuseError: one sentence per member that could not be loaded.
    """
    option_problems = check_max_member_bytes(max_member_bytes)
    if option_problems:
        raise FuseError(option_problems)
    problems = check_names(specs)
    formats: dict[str, str] = {}
    for spec in specs:
        try:
            formats[spec.name] = detect_format(spec, max_member_bytes=max_member_bytes)
        except FuseError as error:
            problems.extend(error.problems)
    if problems:
        raise FuseError(problems)

    tensorflow()  # import once here, not racing in the worker threads
    started = time.perf_counter()
    jobs = jobs or min(len(specs), os.cpu_count() or 1)
    loaded: dict[str, Member] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(
                _load_one, spec, formats[spec.name], safe_mode, custom_objects, max_member_bytes
            ): spec
            for spec in specs
        }
        for future in concurrent.futures.as_completed(futures):
            try:
                member = future.result()
            except FuseError as error:
                problems.extend(error.problems)
                continue
            loaded[member.name] = member
            if on_loaded is not None:
                on_loaded(member)
    if problems:
        raise FuseError(problems)
    return [loaded[spec.name] for spec in specs], time.perf_counter() - started


def _load_one(
    spec: MemberSpec,
    member_format: str,
    safe_mode: bool,
    custom_objects: dict[str, Any] | None,
    max_member_bytes: int | None = None,
) -> Member:
    started = time.perf_counter()
    if member_format == "savedmodel":
        inputs, outputs, model = _load_savedmodel(spec, max_member_bytes)
        parameters = int(sum(int(weight.numpy().size) for weight in model.weights))
    else:
        model = (
            spec.model
            if member_format == "memory"
            else _load_keras(spec, safe_mode, custom_objects)
        )
        inputs, outputs = _keras_signature(spec, model)
        parameters = int(model.count_params())
    return Member(
        name=spec.name,
        source=spec.source,
        format=member_format,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        sha256=(spec.sha256 or sha256_of(spec.source)) if spec.source is not None else None,
        load_seconds=time.perf_counter() - started,
        model=model,
    )


def _load_keras(spec: MemberSpec, safe_mode: bool, custom_objects: dict[str, Any] | None) -> Any:
    import keras

    import runtime.switch  # noqa: F401 - a fused ensemble built by fuser can be a member

    try:
        return keras.models.load_model(
            spec.source,
            compile=False,
            safe_mode=safe_mode,
            custom_objects=keyed_by_registered_name(spec.source, custom_objects),
        )
    except Exception as error:
        reason = _explain_load_error(error, spec.source, custom_objects)
        raise FuseError(f"{spec.describe()} could not be loaded: {reason}") from None


def _explain_load_error(
    error: BaseException, path: Path, custom_objects: dict[str, Any] | None = None
) -> str:
    """Why a member at ``path`` could not be loaded, and what to do, in one sentence."""
    text = " ".join(str(error).split())
    if "safe_mode" in text or "unsafe_deserialization" in text or "Lambda" in text:
        return (
            "it contains a Lambda layer or other arbitrary code, which safe mode refuses to "
            "run; if you trust this file, rebuild with --unsafe (safe_mode=False)."
        )
    # The classes the file names, not Keras' message ("Could not locate class 'Scale'",
    # wrapped in the model's own "could not be deserialized"), which omits the package.
    missing = explain_load_error(path, error, custom_objects)
    if missing is not None:
        return missing
    if "custom_objects" in text:
        return (
            "it uses a custom Keras class not registered in this process; import the module "
            "that defines it, or pass --custom-objects MODULE:NAME (custom_objects=) for "
            "classes you trust."
        )
    first = text.split(". ")[0]
    return first[:300] + ("…" if len(first) > 300 else "")


def _keras_signature(
    spec: MemberSpec, model: Any
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    try:
        input_tensors = list(model.inputs)
        output_tensors = list(model.outputs)
    except (AttributeError, ValueError):
        raise FuseError(
            f"{spec.describe()} is a subclassed model without a known input signature; "
            "save it as a functional or Sequential model, or export it as a SavedModel."
        ) from None
    output_names = list(getattr(model, "output_names", None) or [])
    if len(output_names) != len(output_tensors):
        output_names = [f"output_{index}" for index in range(len(output_tensors))]
    inputs = tuple(
        TensorSpec(_tensor_name(tensor.name), tuple(tensor.shape), str(tensor.dtype))
        for tensor in input_tensors
    )
    outputs = tuple(
        TensorSpec(name, tuple(tensor.shape), str(tensor.dtype))
        for name, tensor in zip(output_names, output_tensors)
    )
    return inputs, outputs


def _load_savedmodel(
    spec: MemberSpec, max_member_bytes: int | None = None
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], Any]:
    """Read the ``serving_default`` signature from the protobuf, then load the graph once."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    path = spec.source
    check_savedmodel_variables(spec, path, Limits.of(path, max_member_bytes), tf)
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception:
        raise FuseError(f"{spec.describe()} has a saved_model.pb that cannot be parsed.") from None
    signatures: dict[str, Any] = {}
    for meta_graph in proto.meta_graphs:
        signatures.update(
            # "__saved_model_init_op" and the like are TensorFlow's own, not callable ones.
            (name, signature)
            for name, signature in meta_graph.signature_def.items()
            if not name.startswith("__")
        )
    if "serving_default" not in signatures:
        found = ", ".join(sorted(signatures)) or "none"
        raise FuseError(
            f"{spec.describe()} is a SavedModel without a 'serving_default' signature "
            f"(signatures found: {found}); export it with model.export() or give "
            "tf.saved_model.save a serving_default signature."
        )
    signature = signatures["serving_default"]
    inputs = tuple(
        _spec_from_tensor_info(spec, name, info, tf)
        for name, info in sorted(signature.inputs.items())
    )
    outputs = tuple(
        _spec_from_tensor_info(spec, name, info, tf)
        for name, info in sorted(signature.outputs.items(), key=lambda item: _natural_key(item[0]))
    )
    from fuser.members.savedmodel_layer import SavedModelBranch

    try:
        layer = SavedModelBranch(str(path), call_endpoint="serving_default")
    except Exception as error:
        raise FuseError(
            f"{spec.describe()} could not be loaded as a SavedModel: "
            f"{_explain_load_error(error, path)}"
        ) from None
    return inputs, outputs, layer


def _spec_from_tensor_info(spec: MemberSpec, name: str, info: Any, tf: Any) -> TensorSpec:
    if info.tensor_shape.unknown_rank:
        raise FuseError(
            f"{spec.describe()} has a signature tensor {name!r} of unknown rank; export the "
            "model with a fixed input signature."
        )
    try:
        dtype = tf.dtypes.as_dtype(info.dtype).name
    except TypeError:  # DT_INVALID: a sparse or composite tensor, not a plain one
        raise FuseError(
            f"{spec.describe()} has a signature tensor {name!r} without a known dtype (it is "
            "not a plain tensor); export the model with a signature of plain tensors."
        ) from None
    shape = tuple(dim.size if dim.size >= 0 else None for dim in info.tensor_shape.dim)
    return TensorSpec(name, shape, dtype)


def _tensor_name(name: str) -> str:
    return name.split(":")[0]


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
