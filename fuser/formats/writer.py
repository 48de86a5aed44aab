"""Writing an artifact, whatever its format: write beside, verify, seal, place.

Every write goes the same way: write to a hidden temporary beside the destination
(``fuser.formats.placement``), open it with the runtime's own backend and compare it with
the members on the probe batch, seal the manifest (that verification plus SHA-256
digests of everything else in the artifact, ``runtime.integrity``), embed it, check the
seal as the runtime will, then move it into place with one rename. With several
artifacts (``write_all``), a SavedModel joined from units is opened and run in a fresh
process (``fuser.formats._check``) while the next artifact is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fuser.built import Built
from fuser.conversion import workers
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
    return write_all(ensemble, [destination], opset=opset)[0]


def write_all(
    ensemble: Built, destinations: Sequence[Output], *, opset: int | None = None
) -> list[Path]:
    """Write, verify and place artifacts of ``ensemble``, one per destination; their paths,
    in the order given.

    A SavedModel joined from units (``fuser.conversion.graph_units``) is written first and,
    when other artifacts follow, verified in a fresh process while they are written:
    loading it and TensorFlow's graph optimizations at its first call take most of its
    write, in C++, beside the next artifact's Python. Whatever fails, no artifact that was
    not placed is left behind.
    """
    problems = [
        problem
        for destination in destinations
        for problem in format_problems(destination.path, ensemble.members)
    ]
    problems += check_opset(opset)
    if problems:
        raise FuseError(problems)
    order = sorted(destinations, key=lambda each: each.kind != "savedmodel")
    writes = [_Write(ensemble, destination, opset or DEFAULT_OPSET) for destination in order]
    try:
        for number, each in enumerate(writes):
            each.write(background=number < len(writes) - 1)
        for each in writes:
            each.finish()
    finally:
        for each in writes:
            each.discard()
    placed = {each.path: each.path for each in writes}
    return [placed[destination.path] for destination in destinations]


class _Write:
    """One artifact's write: the temporary beside its destination, its verification (here,
    or in a fresh process), then the seal and the rename (``finish``)."""

    def __init__(self, ensemble: Built, destination: Output, opset: int) -> None:
        self.ensemble = ensemble
        self.path, self.kind, self.force = destination.path, destination.kind, destination.force
        self.opset = opset
        self.format = format_of(self.path)
        self.temporary: Path | None = None
        self.data_file: Path | None = None
        self.details: dict = {}
        self.error: float | None = None
        self.verifying: BackgroundCheck | None = None
        self.memory = 0.0
        self.placed = False

    @property
    def subject(self) -> str:
        return f"the {self.kind} artifact {self.path}"

    def write(self, *, background: bool) -> None:
        """Write the temporary; verify it here, or start its check in a fresh process when
        ``background`` and the artifact allows it (a SavedModel joined from units)."""
        path = self.path
        placement.remove_stale_temporaries(path.parent)
        self.temporary = placement.temporary_beside(path)
        # Named now: whatever fails after the writer made it, an external data file goes too.
        self.data_file = path.parent / data_file_name(self.temporary)
        reporter = self.ensemble.reporter
        with reporter.task(f"Writing {path}"):
            with stage(self.format.stage, self.subject):
                self.details = self.format.write(self.ensemble, self.temporary, self.opset)
            conversion = self.details.get(CONVERSION) or {}
            if background and self.kind == "savedmodel" and conversion.get("by") == "units":
                # Its files go beside the artifact, hidden: a build that dies leaves
                # them to the next one's clean-up of stale temporaries.
                folder = placement.temporary_beside(path.with_name(f"{path.name}-check"))
                self.verifying = BackgroundCheck(self.temporary, self.ensemble.probe, folder)
                reporter.note(
                    f"Verifying {path} in another process while the next artifact is written."
                )
                return
            with stage("verifying", self.subject):
                backend = open_backend(self.temporary, read_manifest=False)
                self.error = self.ensemble.verify(backend.run, self.what)
                del backend
            self._place()
        self._wrote()

    @property
    def what(self) -> str:
        return f"The {self.kind} artifact {self.path}"

    def finish(self) -> None:
        """For a check in another process: wait for it, then seal, embed and place."""
        if self.verifying is None:
            return
        with self.ensemble.reporter.task(f"Verifying {self.path}"):
            with stage("verifying", self.subject):
                outputs = self.verifying.outputs()
            self.verifying = None
            probe = self.ensemble.probe

            def run(feeds: dict) -> dict:
                assert feeds is probe, "a SavedModel by units is checked on the probe alone"
                return outputs

            self.error = self.ensemble.verify(run, self.what)
            self._place()
        self._wrote()

    def _place(self) -> None:
        ensemble, path, kind = self.ensemble, self.path, self.kind
        details = dict(self.details)
        manifest = ensemble.manifest
        conversion = details.pop(CONVERSION, None)
        if conversion is not None:
            manifest["build"][f"{kind}_conversion"] = conversion
        manifest["artifact"] = {"format": kind, **details}
        memory = peak_memory_mb()
        manifest["build"]["peak_memory_mb"] = memory
        manifest["verification"]["artifact"] = {
            "probe_batch": ensemble.verification["probe_batch"],
            "tolerance": ensemble.tolerance,
            "max_abs_error": self.error,
        }
        external = details.get("external_data", [])
        temporary = self.temporary
        integrity.seal(manifest, readers.content_of(kind, temporary, external))
        self.format.embed(temporary, manifest_lib.dumps(manifest))
        _check_seal(kind, temporary, path)
        for item in [temporary, *(path.parent / name for name in external)]:
            _sync(item)
        # External data files already have their final, hidden, build-unique names:
        # the one rename of the model below switches to them.
        placement.place(temporary, path, kind, force=self.force)
        self.placed = True
        self.memory = memory
        self.discard()
        self.format.placed(path, details)

    def _wrote(self) -> None:
        self.ensemble.reporter.note(
            f"Wrote {self.path} ({self.kind}, max abs error {self.error:.2e} against the "
            f"members; peak memory of the build so far {self.memory:,.0f} MB)."
        )

    def discard(self) -> None:
        """Stop a check still running; remove the temporary (and, unless the artifact was
        placed, its external data file)."""
        if self.verifying is not None:
            self.verifying.stop()
            self.verifying = None
        if self.temporary is not None:
            placement.remove(self.temporary)
        if not self.placed and self.data_file is not None:
            placement.remove(self.data_file)


class BackgroundCheck:
    """An artifact run on the probe batch in a fresh process (``fuser.formats._check``),
    with its probe and answers in ``folder`` (made here, removed by ``stop``)."""

    def __init__(self, artifact: Path, probe: dict, folder: Path) -> None:
        import subprocess
        import sys

        import numpy as np

        self.folder = folder
        folder.mkdir()
        np.savez(folder / "probe.npz", **probe)
        self.answers = folder / "answers.npz"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fuser.formats._check",
                str(artifact),
                str(folder / "probe.npz"),
                str(self.answers),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=workers.environment(),
        )

    def outputs(self) -> dict:
        """The artifact's outputs on the probe batch.

        Raises:
            ArtifactError: the artifact could not be loaded or run (the process's last line).
        """
        import numpy as np

        from runtime.errors import ArtifactError

        _, stderr = self.process.communicate()
        if self.process.returncode != 0:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            raise ArtifactError(lines[-1] if lines else f"exit status {self.process.returncode}")
        with np.load(self.answers, allow_pickle=False) as stored:
            answers = {name: stored[name] for name in stored.files}
        self.stop()
        return answers

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        placement.remove(self.folder)


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
