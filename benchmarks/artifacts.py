"""Fuser builds: the fused artifacts of a member set, and each member alone as ONNX.

The per-member ONNX files come from one-member fuser builds, so the per-member and the
fused ONNX graphs are converted by the same exporter with the same settings; the
comparison is then between one session per member and one session for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.members import MemberSet


def export_member_onnx(member_path: Path, directory: Path) -> Path:
    """``member_path`` alone as an ONNX file in ``directory`` (reused if already there)."""
    import fuser

    path = directory / f"{member_path.stem}.onnx"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fuser.build([member_path]).save(path)
    return path


def build_member_set(
    family: str,
    member_paths: Sequence[Path],
    member_onnx_paths: Sequence[Path],
    directory: Path,
) -> tuple[MemberSet, dict[str, Any]]:
    """Fuse the members into ``directory/fused.onnx`` and ``fused.keras``, timing each step.

    Returns:
        The member set, and the build figures: ``build_seconds`` (``fuser.build``: load,
        validate, fuse, compile, verify; TensorFlow already imported),
        ``onnx_export_seconds`` (conversion, check, verification and write of the ONNX
        artifact), and the load times the build itself recorded in its manifest.
    """
    import fuser

    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ensemble = fuser.build(list(member_paths), fusion="off")
    built = time.perf_counter()
    onnx_path = ensemble.save(directory / "fused.onnx", force=True)
    exported = time.perf_counter()
    keras_path = ensemble.save(directory / "fused.keras", force=True)
    keras_exported = time.perf_counter()
    stacked_path = fuser.build(list(member_paths), fusion="on").save(
        directory / "fused_stacked.onnx", force=True
    )
    build_info = ensemble.manifest["build"]
    figures = {
        "build_seconds": built - started,
        "onnx_export_seconds": exported - built,
        "build_and_onnx_export_seconds": exported - started,
        "keras_export_seconds": keras_exported - exported,
        "stacked_build_and_onnx_export_seconds": time.perf_counter() - keras_exported,
        "build_load_seconds_wall": build_info.get("load_seconds"),
        "build_load_seconds_sum": build_info.get("load_seconds_sum"),
        "onnx_bytes": onnx_path.stat().st_size,
    }
    member_set = MemberSet(
        family=family,
        member_paths=tuple(member_paths),
        member_onnx_paths=tuple(member_onnx_paths),
        fused_onnx_path=onnx_path,
        fused_keras_path=keras_path,
        fused_stacked_onnx_path=stacked_path,
    )
    return member_set, figures
