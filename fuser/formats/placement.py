"""Where artifacts land: checked before the build, written beside, placed in one rename.

Every write of fuser (artifacts, Triton and TF Serving model directories) goes the same
way: it is assembled under a hidden temporary name beside its destination
(``.fuser-tmp-<pid>-<token>-<name>``), then placed with one rename:

- without ``force``, a rename that never replaces anything (``renameat2`` with
  ``RENAME_NOREPLACE``, else a hard link for files): of two builds writing the same
  output at once, exactly one places its artifact, and the other says why;
- with ``force``, only a fuser artifact of the same kind may be replaced, and it is
  swapped atomically (``RENAME_EXCHANGE``); anything else at the path (a user's folder,
  a file of another kind) is refused, never deleted.

Temporaries left by killed builds are removed by later builds writing beside them, but
only entries whose name has the exact temporary form and whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fuser.errors import FuseError
from runtime import manifest, readers

TEMPORARY_PREFIX = ".fuser-tmp-"
# .fuser-tmp-<pid>-<8 hex digits>-<name>: nothing else is ever removed as stale.
_TEMPORARY = re.compile(rf"^{re.escape(TEMPORARY_PREFIX)}(\d+)-[0-9a-f]{{8}}-.+$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
KINDS = ("onnx", "keras", "savedmodel", "triton", "tfserving")
_LABELS = {
    "onnx": "a fuser ONNX artifact",
    "keras": "a fuser .keras artifact",
    "savedmodel": "a fuser SavedModel artifact",
    "triton": "a Triton model directory written by fuser",
    "tfserving": "a TF Serving model version written by fuser",
}


class DestinationTaken(FuseError):
    """Something appeared at the destination while the artifact was being written."""


def temporary_beside(destination: Path) -> Path:
    """A new hidden name beside ``destination`` for its artifact in the making."""
    token = uuid.uuid4().hex[:8]
    return destination.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{token}-{destination.name}"


def destination_problems(destination: Path, kind: str, *, force: bool) -> list[str]:
    """Why an artifact of ``kind`` cannot be written at ``destination``, found before any
    work: its folder must exist and be writable; an existing entry is refused without
    ``force``, and with it unless it is a fuser artifact of the same kind."""
    problems = []
    folder = destination.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        problems.append(f"The folder {folder} of output {destination} {what}; create it first.")
    elif not _writable(folder):
        problems.append(
            f"The folder {folder} of output {destination} is not writable by this user."
        )
    if destination.exists() or destination.is_symlink():
        if not force:
            problems.append(
                f"The output {destination} already exists; pass --force (force=True) to replace it."
            )
        elif not is_artifact(destination, kind):
            problems.append(
                f"The output {destination} exists and is not {_LABELS[kind]}; --force "
                "replaces only those, never other files or folders: remove or move it "
                "yourself, or choose another path."
            )
    return problems


def check_destination(destination: Path, kind: str, *, force: bool) -> None:
    problems = destination_problems(destination, kind, force=force)
    if problems:
        raise FuseError(problems)


def is_artifact(path: Path, kind: str) -> bool:
    """Whether ``path`` holds what fuser writes as ``kind`` (looked at, never trusted)."""
    try:
        if kind == "onnx":
            return path.is_file() and _onnx_has_manifest(path)
        if kind == "keras":
            with zipfile.ZipFile(path) as archive:
                return _manifest_entry() in archive.namelist()
        if kind in ("savedmodel", "tfserving"):
            return (path / "saved_model.pb").is_file() and (path / _savedmodel_asset()).is_file()
        if kind == "triton":
            config = path / "config.pbtxt"
            return config.is_file() and '"fuser_manifest_sha256"' in config.read_text(
                errors="replace"
            )
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _onnx_has_manifest(path: Path) -> bool:
    text, _ = readers.split_onnx(path.read_bytes())
    return text is not None


def _manifest_entry() -> str:
    return manifest.KERAS_ZIP_ENTRY


def _savedmodel_asset() -> str:
    return manifest.SAVEDMODEL_ASSET


def _writable(folder: Path) -> bool:
    """Whether this process can create and remove an entry in ``folder`` (a probe: access
    bits can say yes on a read-only file system)."""
    probe = temporary_beside(folder / "probe")
    try:
        probe.touch(exist_ok=False)
    except OSError:
        return False
    probe.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def staged(destination: Path, kind: str, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``destination`` to write into; place it there when
    the block ends without error, remove it in any case.

    Raises:
        DestinationTaken: without ``force``, something appeared at ``destination``
            meanwhile; it is left as it is.
        FuseError: with ``force``, what is at ``destination`` is not an artifact of
            ``kind`` (checked again at the moment of placing).
    """
    remove_stale_temporaries(destination.parent)
    temporary = temporary_beside(destination)
    try:
        yield temporary
        place(temporary, destination, kind, force=force)
    finally:
        remove(temporary)


def place(temporary: Path, destination: Path, kind: str, *, force: bool) -> None:
    """Move ``temporary`` to ``destination`` in one step (see the module's docstring)."""
    if not force or not (destination.exists() or destination.is_symlink()):
        _place_new(temporary, destination)
    else:
        if not is_artifact(destination, kind):
            raise FuseError(
                f"The output {destination} is not {_LABELS[kind]} any more; --force replaces "
                "only those. Nothing was replaced."
            )
        if _renameat2(temporary, destination, _RENAME_EXCHANGE):
            remove(temporary)  # now holds the previous artifact
        else:  # no atomic exchange here: move the old artifact aside first
            aside = temporary_beside(destination)
            os.replace(destination, aside)
            os.replace(temporary, destination)
            remove(aside)
    _sync_folder(destination.parent)


def _place_new(temporary: Path, destination: Path) -> None:
    taken = DestinationTaken(
        f"The output {destination} appeared while this build was writing it (another "
        "build or program wrote it); it was left as it is and this artifact discarded. "
        "Pass --force to replace it."
    )
    if _renameat2(temporary, destination, _RENAME_NOREPLACE):
        return
    error = ctypes.get_errno()
    if error == errno.EEXIST:
        raise taken
    if temporary.is_dir() and not temporary.is_symlink():
        # No no-replace rename on this file system: a rename onto an existing folder
        # fails unless it is empty, which is as close as POSIX gets.
        if destination.exists() or destination.is_symlink():
            raise taken
        try:
            os.rename(temporary, destination)
        except OSError as failure:
            if failure.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise taken from None
            raise
        return
    try:
        os.link(temporary, destination)  # fails if anything is there
    except FileExistsError:
        raise taken from None


_libc: Callable | None = None


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux ``renameat2``; False (``errno`` set) when it failed or is unavailable."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        library = ctypes.CDLL(name, use_errno=True) if name else None
        _libc = getattr(library, "renameat2", None) or (lambda *arguments: -1)
    ctypes.set_errno(errno.ENOSYS)
    at_fdcwd = -100
    result = _libc(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), flags)
    return result == 0


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove temporaries that builds which died left in ``folder``: only names of the
    exact temporary form (``.fuser-tmp-<pid>-<8 hex>-<name>``) whose process is gone."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and not alive(int(match.group(1))):
            remove(entry)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Remove a file, link or folder this module created; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
