"""Which format a member is in, found by looking at its files (before anything loads it)."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

from fuser.members.limits import (
    HDF5_MAGIC,
    ZIP_MAGIC,
    Limits,
    check_h5,
    check_savedmodel_files,
    check_zip,
    check_zip_weights,
)
from fuser.members.spec import MemberSpec, refuse

# Model files of other frameworks, recognised by suffix to say so instead of "not a model".
_FOREIGN_FORMATS = {".onnx": "an ONNX model", ".tflite": "a TensorFlow Lite model"}


def detect_format(spec: MemberSpec, *, max_member_bytes: int | None = None) -> str:
    """The member format of ``spec.source`` by looking at it, refusing a member that is
    damaged or would expand in memory beyond ``max_member_bytes`` (``None``: the default,
    see ``DEFAULT_MAX_MEMBER_BYTES``) before anything parses it.

    Raises:
        FuseError: one sentence naming the member, what was expected and what was found.
    """
    path = spec.source
    if path is None:
        return "memory"
    expected = "expected a .keras file, a legacy .h5 file or a SavedModel directory"
    if not path.exists():
        return refuse(spec, f"{path} does not exist; {expected}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            check_savedmodel_files(spec, path, Limits.of(path, max_member_bytes))
            return "savedmodel"
        if not any(path.iterdir()):
            return refuse(spec, f"{path} is an empty directory; {expected}")
        if (path / "variables").is_dir() or (path / "assets").is_dir():
            return refuse(spec, f"{path} looks like a SavedModel but has no saved_model.pb")
        return refuse(spec, f"{path} is a directory without saved_model.pb; {expected}")
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return refuse(spec, f"{path} cannot be read ({error.strerror})")
    if not head:
        return refuse(spec, f"{path} is an empty file; {expected}")
    if path.name.endswith(".weights.h5"):
        return refuse(
            spec,
            f"{path} is a weights-only file (.weights.h5) without the architecture; "
            "save the whole model with model.save('model.keras')",
        )
    if head.startswith(ZIP_MAGIC):
        limits = Limits.of(path, max_member_bytes)
        check_zip(spec, path, limits)  # before anything decompresses it
        _damaged_zip(spec, path)
        check_zip_weights(spec, path, limits)  # after its CRCs: h5py parses only good bytes
        return "keras"
    if head.startswith(HDF5_MAGIC):
        check_h5(spec, path, path, Limits.of(path, max_member_bytes))
        return "h5"
    if path.name == "saved_model.pb":
        return refuse(
            spec, f"{path} is the graph file of a SavedModel; give its directory {path.parent}"
        )
    if path.suffix.lower() in _FOREIGN_FORMATS:
        return refuse(
            spec,
            f"{path} is named as {_FOREIGN_FORMATS[path.suffix.lower()]}, and fuser does not "
            "take those as members; give the Keras or TensorFlow model it came from (a .keras "
            "file, a legacy .h5 file or a SavedModel directory)",
        )
    if path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        kind = "zip archive" if path.suffix.lower() == ".keras" else "HDF5 file"
        return refuse(spec, f"{path} is not a {kind}, so it is not a {path.suffix} model")
    return refuse(spec, f"{path} is not a model file; {expected}")


def _damaged_zip(spec: MemberSpec, path: Path) -> None:
    """Refuse a zip that is truncated or fails a CRC, before Keras says something vaguer."""

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
        bad = ""
    if bad is not None:
        where = f" (entry {bad!r} fails its CRC check)" if bad else ""
        refuse(
            spec,
            f"{path} is a damaged zip archive{where}: truncated or corrupted, so it cannot be "
            "read as a .keras model",
        )
