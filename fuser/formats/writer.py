"""Writing an artifact, whatever its format: write beside, verify, seal, place.

Every write goes the same way: write to a hidden temporary beside the destination
(``fuser.formats.placement``), open it with the runtime's own backend and compare it with
the members on the probe batch, seal the manifest (that verification plus SHA-256
digests of everything else in the artifact, ``runtime.integrity``), embed it, check the
seal as the runtime will, then move it into place with one rename.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fuser.built import Built
from fuser.errors import FuseError, stage
from fuser.formats import placement
from fuser.formats.onnx import CONVERSION, DEFAULT_OPSET, check_opset, data_file_name
from fuser.formats.registry import REFUSED_SUFFIXES, format_of, format_problems, output_format
from runtime import integrity, readers
from runtime import manifest as manifest_lib
from runtime.backends import open_backend


@dataclass(frozen=True)
class Output:
    """Where an artifact goes, checked (``output``): its path, format, and ``--force``."""

    path: Path
    kind: str
    force: bool


def output(path: str | os.PathLike, *, force: bool = False) -> Output:
    """An output checked before any work: its folder exists and is writable, and what is
    there may be replaced (``fuser.formats.placement``).

    Raises:
        FuseError: every problem with it.
    """
    path = Path(path)
    problems = output_problems([path], force=force)
    if problems:
        raise FuseError(problems)
    return Output(path, output_format(path), force)


def output_problems(paths: Sequence[Path], *, force: bool) -> list[str]:
    """Problems with where artifacts would go, found before any work is done."""
    problems = []
    seen = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            problems.append(f"The output {path} is given twice.")
        seen.add(resolved)
        if path.suffix.lower() in REFUSED_SUFFIXES:
            problems.append(
                f"The output {path} has suffix {path.suffix}; fuser writes .onnx files, .keras "
                "files, or SavedModel directories (any other path)."
            )
        else:
            problems += placement.destination_problems(path, output_format(path), force=force)
    return problems


def write(ensemble: Built, destination: Output, *, opset: int | None = None) -> Path:
    """Write, verify and atomically place one artifact of ``ensemble`` at ``destination``
    (checked already, by ``output``)."""
    path, kind, force = destination.path, destination.kind, destination.force
    problems = format_problems(path, ensemble.members) + check_opset(opset)
    if problems:
        raise FuseError(problems)
    artifact_format = format_of(path)
    placement.remove_stale_temporaries(path.parent)
    temporary = placement.temporary_beside(path)
    # Named now: whatever fails after the writer made it, an external data file goes too.
    data_file = path.parent / data_file_name(temporary)
    external: list[str] = []
    placed = False
    try:
        with ensemble.reporter.task(f"Writing {path}"):
            subject = f"the {kind} artifact {path}"
            with stage(artifact_format.stage, subject):
                details = artifact_format.write(ensemble, temporary, opset or DEFAULT_OPSET)
            with stage("verifying", subject):
                backend = open_backend(temporary, read_manifest=False)
                error = ensemble.verify(backend.run, f"The {kind} artifact {path}")
                del backend
            manifest = ensemble.manifest
            conversion = details.pop(CONVERSION, None)
            if conversion is not None:
                manifest["build"]["onnx_conversion"] = conversion
            manifest["artifact"] = {"format": kind, **details}
            memory = peak_memory_mb()
            manifest["build"]["peak_memory_mb"] = memory
            manifest["verification"]["artifact"] = {
                "probe_batch": ensemble.verification["probe_batch"],
                "tolerance": ensemble.tolerance,
                "max_abs_error": error,
            }
            external = details.get("external_data", [])
            integrity.seal(manifest, readers.content_of(kind, temporary, external))
            artifact_format.embed(temporary, manifest_lib.dumps(manifest))
            _check_seal(kind, temporary, path)
            for item in [temporary, *(path.parent / name for name in external)]:
                _sync(item)
            # External data files already have their final, hidden, build-unique names:
            # the one rename of the model below switches to them.
            placement.place(temporary, path, kind, force=force)
            placed = True
    finally:
        placement.remove(temporary)
        if not placed:
            placement.remove(data_file)
    artifact_format.placed(path, details)
    ensemble.reporter.note(
        f"Wrote {path} ({kind}, max abs error {error:.2e} against the members; peak memory "
        f"of the build so far {memory:,.0f} MB)."
    )
    return path


def peak_memory_mb() -> float:
    """The largest resident memory this process has had, in MB (Linux reports kB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _check_seal(kind: str, temporary: Path, path: Path) -> None:
    """Read the sealed artifact back as the runtime will, so a seal that cannot hold never lands."""
    try:
        readers.read_manifest(kind, temporary)
    except integrity.IntegrityError as error:
        raise FuseError(
            f"The {kind} artifact {path} did not pass its own integrity check after sealing "
            f"({error}); this is a bug in fuser, please report it."
        ) from None


def _sync(path: Path) -> None:
    """Flush the artifact's files to disk before the rename makes them visible."""
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
