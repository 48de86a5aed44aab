"""Members: what a saved model is, how it is found, and how many load at once.

A member is given as a path (``.keras``, legacy ``.h5``, a SavedModel directory),
as ``name=path``, as a ``(name, path)`` pair, or as a ``(name, keras.Model)`` pair for
a model already in memory (which is never modified). Loading runs in a thread pool:
threads beat processes here because a loaded Keras model cannot cross a process
boundary without being serialised and loaded a second time (see README, "Loading").
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import math
import os
import re
import struct
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fuser._tf import tensorflow
from fuser.errors import FuseError
from runtime.custom_objects import explain_load_error, keyed_by_registered_name
from runtime.manifest import TensorSpec

FORMATS = ("keras", "h5", "savedmodel", "memory")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Model files of other frameworks, recognised by suffix to say so instead of "not a model".
_FOREIGN_FORMATS = {".onnx": "an ONNX model", ".tflite": "a TensorFlow Lite model"}

# What a member may expand to in memory, checked before Keras or TensorFlow reads it: the
# uncompressed sizes of a .keras zip's entries, the declared sizes of HDF5 datasets (gzip
# inside HDF5 expands too) and of a SavedModel's variables. Keras stores zip entries
# uncompressed and HDF5 weights unfiltered, so a real member expands to about its size on
# disk, and no less memory would hold its weights anyway; 4x that leaves room for files
# recompressed by other tools (deflate shrinks trained float32 weights by about a tenth,
# zero-initialised ones far more), and any member may expand to 4 GiB, which a machine
# that builds ensembles has. A zip bomb expands 1000 times (1 MB to 1 GiB).
# ``max_member_bytes`` replaces the whole default.
DEFAULT_MAX_MEMBER_BYTES = 4 * 2**30
_EXPANSION = 4
# Keras and TensorFlow parse a model's config (config.json, an .h5's model_config, a
# SavedModel's fingerprint and keras metadata) whole, into Python objects up to ten times
# its size, and real ones take a few MB: they may take 1/64 of the limit (64 MiB by
# default). A SavedModel's graph (saved_model.pb, protobuf, parsed whole too) is larger,
# holding every function: 1/4 (1 GiB).
_CONFIG_SHARE, _GRAPH_SHARE = 64, 4
# Python's zipfile reads every entry of the central directory into an object ten times
# its size; a .keras file has a handful (config.json, metadata.json, model.weights.h5 and
# its assets).
MAX_ZIP_ENTRIES = 100_000
_SIZE_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class MemberSpec:
    """A member as the user named it, before loading."""

    name: str
    source: Path | None
    model: Any = None  # an in-memory keras.Model, when given one

    def describe(self) -> str:
        where = self.source.name if self.source is not None else "in memory"
        return f'Member "{self.name}" ({where})'


@dataclasses.dataclass
class Member:
    """A loaded member: its signature, provenance and the object that computes it."""

    name: str
    source: Path | None
    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: int
    sha256: str | None
    load_seconds: float
    model: Any  # keras.Model, or a layer calling a SavedModel signature

    def describe(self) -> str:
        where = self.source.name if self.source is not None else "in memory"
        return f'Member "{self.name}" ({where})'

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source.name if self.source is not None else None,
            "format": self.format,
            "sha256": self.sha256,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "parameters": self.parameters,
        }

    def call(self, tensors: Sequence[Any]) -> list[Any]:
        """Apply the member to tensors in the order of ``self.inputs``; return its flat outputs."""
        if self.format == "savedmodel":
            named = dict(zip((spec.name for spec in self.inputs), tensors))
            outputs = self.model(named)
            return [outputs[spec.name] for spec in self.outputs]
        import keras

        structure = getattr(self.model, "_inputs_struct", None)
        if structure is not None:
            arguments = keras.tree.pack_sequence_as(structure, list(tensors))
        else:
            arguments = tensors[0] if len(tensors) == 1 else list(tensors)
        return keras.tree.flatten(self.model(arguments, training=False))


def parse_specs(members: Sequence[Any]) -> list[MemberSpec]:
    """Turn what the user passed into named member specs (no I/O beyond ``Path``)."""
    specs = []
    for item in members:
        if isinstance(item, (str, os.PathLike)):
            text = os.fspath(item)
            name, _, rest = text.partition("=")
            if rest and name and os.sep not in name and "/" not in name:
                specs.append(MemberSpec(name=name, source=Path(rest)))
            else:
                path = Path(text)
                specs.append(MemberSpec(name=_stem(path), source=path))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, target = item
            if isinstance(target, (str, os.PathLike)):
                specs.append(MemberSpec(name=name, source=Path(target)))
            else:
                specs.append(MemberSpec(name=name, source=None, model=target))
        else:
            raise FuseError(
                f"A member must be a path, 'name=path', or a (name, path or keras.Model) pair; "
                f"received {type(item).__name__}."
            )
    return specs


def check_names(specs: Sequence[MemberSpec]) -> list[str]:
    """Problems with the member names: empty list, bad characters, duplicates."""
    if not specs:
        return ["No members were given; an ensemble needs at least one member."]
    problems = []
    seen: dict[str, MemberSpec] = {}
    for spec in specs:
        if not _NAME_PATTERN.match(spec.name):
            problems.append(
                f"{spec.describe()} has an invalid name {spec.name!r}: use letters, digits, "
                "'_', '-' and '.', starting with a letter or digit (name it with name=path)."
            )
        elif spec.name in seen:
            problems.append(
                f"{spec.describe()} has the same name as {seen[spec.name].describe()}; member "
                "names must be unique (name them with name=path)."
            )
        else:
            seen[spec.name] = spec
    return problems


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
        return _refuse(spec, f"{path} does not exist; {expected}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            _check_savedmodel_files(spec, path, Limits.of(path, max_member_bytes))
            return "savedmodel"
        if not any(path.iterdir()):
            return _refuse(spec, f"{path} is an empty directory; {expected}")
        if (path / "variables").is_dir() or (path / "assets").is_dir():
            return _refuse(spec, f"{path} looks like a SavedModel but has no saved_model.pb")
        return _refuse(spec, f"{path} is a directory without saved_model.pb; {expected}")
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return _refuse(spec, f"{path} cannot be read ({error.strerror})")
    if not head:
        return _refuse(spec, f"{path} is an empty file; {expected}")
    if path.name.endswith(".weights.h5"):
        return _refuse(
            spec,
            f"{path} is a weights-only file (.weights.h5) without the architecture; "
            "save the whole model with model.save('model.keras')",
        )
    if head.startswith(_ZIP_MAGIC):
        limits = Limits.of(path, max_member_bytes)
        _check_zip(spec, path, limits)  # before anything decompresses it
        _damaged_zip(spec, path)
        _check_zip_weights(spec, path, limits)  # after its CRCs: h5py parses only good bytes
        return "keras"
    if head.startswith(_HDF5_MAGIC):
        _check_h5(spec, path, path, Limits.of(path, max_member_bytes))
        return "h5"
    if path.name == "saved_model.pb":
        return _refuse(
            spec, f"{path} is the graph file of a SavedModel; give its directory {path.parent}"
        )
    if path.suffix.lower() in _FOREIGN_FORMATS:
        return _refuse(
            spec,
            f"{path} is named as {_FOREIGN_FORMATS[path.suffix.lower()]}, and fuser does not "
            "take those as members; give the Keras or TensorFlow model it came from (a .keras "
            "file, a legacy .h5 file or a SavedModel directory)",
        )
    if path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        kind = "zip archive" if path.suffix.lower() == ".keras" else "HDF5 file"
        return _refuse(spec, f"{path} is not a {kind}, so it is not a {path.suffix} model")
    return _refuse(spec, f"{path} is not a model file; {expected}")


def _damaged_zip(spec: MemberSpec, path: Path) -> None:
    """Refuse a zip that is truncated or fails a CRC, before Keras says something vaguer."""
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
        bad = ""
    if bad is not None:
        where = f" (entry {bad!r} fails its CRC check)" if bad else ""
        _refuse(
            spec,
            f"{path} is a damaged zip archive{where}: truncated or corrupted, so it cannot be "
            "read as a .keras model",
        )


def _refuse(spec: MemberSpec, what: str) -> NoReturn:
    raise FuseError(f'Member "{spec.name}": {what}.')


# How much a member may expand to ---------------------------------------------------------


def parse_byte_size(text: str) -> int:
    """``"8G"`` -> 8 GiB: a whole number of bytes, optionally with a suffix K, M, G or T
    (powers of 1024, also written KiB, MiB, ...), for ``--max-member-bytes``.

    Raises:
        ValueError: one sentence saying what was expected.
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:([KMGT])(?:i?B)?)?\s*", str(text), re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise ValueError(
            f"Expected a positive number of bytes, optionally with a suffix K, M, G or T "
            f"(powers of 1024), such as 8G; received {text!r}."
        )
    return int(match.group(1)) * _SIZE_SUFFIXES[(match.group(2) or "").upper()]


def check_max_member_bytes(value: Any) -> list[str]:
    """Problems with the ``max_member_bytes`` option (empty when it is None or valid)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return []
    return [f"max_member_bytes must be a positive integer number of bytes or None, got {value!r}."]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one member may expand to in memory: in all, a model config, a SavedModel graph."""

    total: int
    config: int
    graph: int
    given: bool  # from max_member_bytes, not the default

    @classmethod
    def of(cls, path: Path, max_member_bytes: int | None) -> Limits:
        if max_member_bytes is not None:
            base, total = max_member_bytes, max_member_bytes
        else:
            base = DEFAULT_MAX_MEMBER_BYTES
            total = max(base, _EXPANSION * _size_on_disk(path))
        return cls(total, base // _CONFIG_SHARE, base // _GRAPH_SHARE, max_member_bytes is not None)

    def refuse(self, spec: MemberSpec, what: str, size: int, kind: str = "total") -> NoReturn:
        """Refuse ``what`` (``... would expand to``), ``size`` bytes, over the ``kind`` limit."""
        limit = getattr(self, kind)
        option = "max_member_bytes" if self.given else "the default"
        share = {
            "total": (
                "for a member (max_member_bytes)"
                if self.given
                else f"for a member (the default: {_bytes(DEFAULT_MAX_MEMBER_BYTES)}, or "
                f"{_EXPANSION}x its size on disk if larger)"
            ),
            "config": f"for a model config (1/{_CONFIG_SHARE} of {option}, {_bytes(limit * _CONFIG_SHARE)})",
            "graph": f"for a SavedModel graph (1/{_GRAPH_SHARE} of {option}, {_bytes(limit * _GRAPH_SHARE)})",
        }[kind]
        _refuse(
            spec,
            f"{what} would expand to {_bytes(size)} in memory, over the limit of "
            f"{_bytes(limit)} {share}; if you trust the file, raise the limit with "
            "--max-member-bytes (max_member_bytes=)",
        )


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def _bytes(size: int) -> str:
    """``1.5 GiB``, ``300.0 MiB``, ``512 bytes``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _check_zip(spec: MemberSpec, path: Path, limits: Limits) -> None:
    """Refuse a .keras zip whose central directory says it expands beyond ``limits``,
    before anything decompresses it. (Python's zipfile never yields more than an entry's
    recorded size, so the directory is what memory is bound by.)"""
    entries = _zip_entry_count(path)
    if entries is not None and entries > MAX_ZIP_ENTRIES:
        _refuse(
            spec,
            f"{path} is a zip archive of {entries:,} entries, more than the {MAX_ZIP_ENTRIES:,} "
            "fuser reads; a .keras model holds a few (config.json, metadata.json, "
            "model.weights.h5 and its assets)",
        )
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, struct.error):
        return  # damaged: _damaged_zip says so
    total = sum(info.file_size for info in infos)
    if total > limits.total:
        largest = max(infos, key=lambda info: info.file_size)
        limits.refuse(
            spec,
            f"the {len(infos)} zip entries of {path} (the largest {largest.filename!r}, "
            f"{_bytes(largest.file_size)})",
            total,
        )
    for info in infos:
        if info.filename.endswith(".json") and info.file_size > limits.config:
            limits.refuse(
                spec, f"the zip entry {info.filename!r} of {path}", info.file_size, "config"
            )


def _check_zip_weights(spec: MemberSpec, path: Path, limits: Limits) -> None:
    """``_check_h5`` for the HDF5 weights in a .keras zip. Keras stores them uncompressed,
    so h5py reads them in place; weights compressed by another tool are left to Keras'
    own limits (reading them here would mean decompressing them again at every seek)."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    for info in infos:
        if info.filename.endswith(".h5") and info.compress_type == zipfile.ZIP_STORED:
            try:
                entry = _StoredEntry(path, info)
            except (zipfile.BadZipFile, OSError):
                return
            with entry:
                _check_h5(spec, entry, f"the zip entry {info.filename!r} of {path}", limits)


def _zip_entry_count(path: Path) -> int | None:
    """The entries a zip's end record announces, read before ``zipfile`` reads them all."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        tail_size = min(size, 22 + 0xFFFF)  # the end record, and a comment of up to 64 KiB
        handle.seek(size - tail_size)
        tail = handle.read(tail_size)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            return None
        (entries,) = struct.unpack_from("<H", tail, at + 10)
        locator = at - 20
        if entries == 0xFFFF and locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
            (record_at,) = struct.unpack_from("<Q", tail, locator + 8)  # zip64: more entries
            handle.seek(record_at)
            record = handle.read(56)
            if len(record) == 56 and record.startswith(b"PK\x06\x06"):
                (entries,) = struct.unpack_from("<Q", record, 32)
        return entries


class _StoredEntry(io.RawIOBase):
    """An uncompressed zip entry as a file, read in place (``ZipFile.open`` would rewind
    and re-read from the entry's start at every backward seek)."""

    def __init__(self, path: Path, info: zipfile.ZipInfo) -> None:
        super().__init__()
        self._handle = path.open("rb")
        self._handle.seek(info.header_offset)
        header = self._handle.read(30)
        if len(header) < 30 or not header.startswith(_ZIP_MAGIC):
            self._handle.close()
            raise zipfile.BadZipFile(f"no local header for {info.filename!r}")
        name_size, extra_size = struct.unpack_from("<HH", header, 26)
        self._start = info.header_offset + 30 + name_size + extra_size
        self._size, self._position = info.file_size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        self._handle.seek(self._start + self._position)
        count = self._handle.readinto(memoryview(buffer)[:count])
        self._position += count
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._handle.close()
        super().close()


def _check_h5(spec: MemberSpec, source: Path | io.RawIOBase, where: object, limits: Limits) -> None:
    """Refuse an HDF5 file (a .h5 member, or a .keras member's weights) whose datasets
    declare more than ``limits.total`` (chunks compressed inside HDF5 expand too), whose
    model config is larger than ``limits.config``, or that reads other files."""
    import h5py

    config_shape, config_size = None, 0
    declared: dict[str, int] = {}
    outside: list[str] = []

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            if item.external or item.is_virtual:
                outside.append(name)
            declared[name] = math.prod(item.shape or ()) * item.dtype.itemsize

    def visit_link(name: str, link: Any) -> None:
        if isinstance(link, h5py.ExternalLink):
            outside.append(name)

    try:
        with h5py.File(source, "r") as file:
            if "model_config" in file.attrs:
                config_shape = file.attrs.get_id("model_config").shape
                if config_shape in ((), (1,)):  # one string, no larger than the file
                    config_size = len(file.attrs["model_config"])
            file.visititems(visit)
            if hasattr(file, "visititems_links"):  # h5py 3.11 and later
                file.visititems_links(visit_link)
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        return  # not readable as HDF5: Keras says what is wrong with it
    if config_shape not in (None, (), (1,)):
        _refuse(
            spec,
            f"{where} holds a model config (HDF5 attribute 'model_config') of shape "
            f"{config_shape}; expected one JSON string",
        )
    if config_size > limits.config:
        limits.refuse(spec, f"the HDF5 attribute 'model_config' of {where}", config_size, "config")
    if outside:
        _refuse(
            spec,
            f"{where} has HDF5 data stored in other files ({', '.join(sorted(outside)[:3])}), "
            "which fuser does not read; save the model again with Keras",
        )
    total = sum(declared.values())
    if total > limits.total:
        largest = max(declared, key=declared.__getitem__)
        limits.refuse(
            spec,
            f"the {len(declared)} HDF5 datasets of {where} (the largest {largest!r}, "
            f"{_bytes(declared[largest])})",
            total,
        )


# SavedModel files parsed whole, and the limit each takes.
_SAVEDMODEL_PARSED = {
    "saved_model.pb": "graph",
    "saved_model.pbtxt": "graph",
    "fingerprint.pb": "config",
    "keras_metadata.pb": "config",
}


def _check_savedmodel_files(spec: MemberSpec, path: Path, limits: Limits) -> None:
    """Refuse a SavedModel whose files TensorFlow parses whole are too large, or (below a
    given max_member_bytes) whose files are; its variables are checked when it loads."""
    for name, kind in _SAVEDMODEL_PARSED.items():
        file = path / name
        if file.is_file() and file.stat().st_size > getattr(limits, kind):
            limits.refuse(spec, f"{file}", file.stat().st_size, kind)
    if limits.given:
        size = _size_on_disk(path)
        if size > limits.total:
            limits.refuse(spec, f"the files of {path}", size)


def _check_savedmodel_variables(spec: MemberSpec, path: Path, limits: Limits, tf: Any) -> None:
    """Refuse a SavedModel whose checkpoint declares variables larger than ``limits.total``:
    TensorFlow allocates each before it reads its bytes. Reads the index only."""
    index = path / "variables" / "variables.index"
    if not index.is_file():
        return
    try:
        reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except Exception:  # TensorFlow says what is wrong when it loads the member
        return
    declared = {
        name: math.prod(shape) * (dtypes[name].size or 32)  # strings: per element
        for name, shape in shapes.items()
    }
    total = sum(declared.values())
    if total > limits.total:
        largest = max(declared, key=declared.__getitem__)
        limits.refuse(
            spec,
            f"the {len(declared)} variables in the checkpoint of {path} (the largest "
            f"{largest!r}, {_bytes(declared[largest])})",
            total,
        )


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
        sha256=sha256_of(spec.source) if spec.source is not None else None,
        load_seconds=time.perf_counter() - started,
        model=model,
    )


def _load_keras(spec: MemberSpec, safe_mode: bool, custom_objects: dict[str, Any] | None) -> Any:
    import keras

    import runtime._switch  # noqa: F401 - a fused ensemble built by fuser can be a member

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
    _check_savedmodel_variables(spec, path, Limits.of(path, max_member_bytes), tf)
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
    from fuser._savedmodel_layer import SavedModelBranch

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


def _stem(path: Path) -> str:
    name = path.name.rstrip("/") or path.resolve().name
    for suffix in (".keras", ".hdf5", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a directory's relative paths and contents in sorted order."""
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
        return digest.hexdigest()
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        _hash_file(file, digest)
    return digest.hexdigest()


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
