"""How much a member may expand to in memory, checked before anything parses it.

Zip bombs (a 1 MB ``.keras`` holding a 1 GiB config), HDF5 shape bombs, oversized
SavedModel graphs: each is refused in one sentence, naming the member and the limit.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, NoReturn

from fuser.members.spec import MemberSpec, refuse

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

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
# How much a member may expand to ---------------------------------------------------------


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

    def check_total(self, spec: MemberSpec, sizes: dict[str, int], what: str) -> None:
        """Refuse a member whose parts (``sizes``: name -> bytes, ``what`` they are) expand
        beyond the total limit, naming the largest."""
        total = sum(sizes.values())
        if total > self.total:
            largest = max(sizes, key=sizes.__getitem__)
            self.refuse(
                spec,
                f"the {len(sizes)} {what} (the largest {largest!r}, {_bytes(sizes[largest])})",
                total,
            )

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
        refuse(
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


def check_zip(spec: MemberSpec, path: Path, limits: Limits) -> None:
    """Refuse a .keras zip whose central directory says it expands beyond ``limits``,
    before anything decompresses it. (Python's zipfile never yields more than an entry's
    recorded size, so the directory is what memory is bound by.)"""
    entries = _zip_entry_count(path)
    if entries is not None and entries > MAX_ZIP_ENTRIES:
        refuse(
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
    limits.check_total(
        spec, {info.filename: info.file_size for info in infos}, f"zip entries of {path}"
    )
    for info in infos:
        if info.filename.endswith(".json") and info.file_size > limits.config:
            limits.refuse(
                spec, f"the zip entry {info.filename!r} of {path}", info.file_size, "config"
            )


def check_zip_weights(spec: MemberSpec, path: Path, limits: Limits) -> None:
    """``check_h5`` for the HDF5 weights in a .keras zip. Keras stores them uncompressed,
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
                check_h5(spec, entry, f"the zip entry {info.filename!r} of {path}", limits)


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
        if len(header) < 30 or not header.startswith(ZIP_MAGIC):
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


def check_h5(spec: MemberSpec, source: Path | io.RawIOBase, where: object, limits: Limits) -> None:
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
        refuse(
            spec,
            f"{where} holds a model config (HDF5 attribute 'model_config') of shape "
            f"{config_shape}; expected one JSON string",
        )
    if config_size > limits.config:
        limits.refuse(spec, f"the HDF5 attribute 'model_config' of {where}", config_size, "config")
    if outside:
        refuse(
            spec,
            f"{where} has HDF5 data stored in other files ({', '.join(sorted(outside)[:3])}), "
            "which fuser does not read; save the model again with Keras",
        )
    limits.check_total(spec, declared, f"HDF5 datasets of {where}")


# SavedModel files parsed whole, and the limit each takes.
_SAVEDMODEL_PARSED = {
    "saved_model.pb": "graph",
    "saved_model.pbtxt": "graph",
    "fingerprint.pb": "config",
    "keras_metadata.pb": "config",
}


def check_savedmodel_files(spec: MemberSpec, path: Path, limits: Limits) -> None:
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


def check_savedmodel_variables(spec: MemberSpec, path: Path, limits: Limits, tf: Any) -> None:
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
    limits.check_total(spec, declared, f"variables in the checkpoint of {path}")
