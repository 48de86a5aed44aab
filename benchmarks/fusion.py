"""Horizontal fusion, measured: the fused form against the plain form and against one member.

``python -m benchmarks.fusion [--quick] [--out DIR]`` builds 32 same-architecture MLPs
(20 -> 64 -> 64 -> 5, softmax) and 8 small CNNs (two Conv2D + BatchNormalization +
pooling) on 32x32x3 images and 8 on 8x8x3 (the issue names both sizes), each with its
own random weights and biases. For each family it
writes one member alone, the plain form (``--fusion off``), the fused form (``--fusion
on``, ``stacked`` in the results, its first name) and what ``--fusion auto`` picks, checks
that fused and plain
agree within 1e-5, and times every artifact through ``runtime.load(...).predict`` (ONNX
Runtime, default session options) at several batch sizes: median of repeated calls
after a warm-up. The plain and stacked ensembles are also written as SavedModels and
timed in TensorFlow (the form TensorFlow Serving runs: grouped convolutions kept apart
from their bias, so that they run with oneDNN on or off). It writes ``DIR/fusion.json``
and ``DIR/FUSION.md`` with the ratios the horizontal-fusion issue is judged on; run it
once with ``TF_ENABLE_ONEDNN_OPTS=0`` and once with ``=1`` (``--out`` apart) to see both
kinds of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe_machine, describe_onednn
from benchmarks.measure import Budget, timed_calls
from benchmarks.members import FAMILIES, cnn_family, random_inputs, workdir_or_temporary

# The suite's families and the same CNN on 8x8 images, 16x fewer convolution steps:
# there a member's call is mostly ONNX Runtime's per-call and per-node cost.
FUSION_FAMILIES = {**FAMILIES, "cnn8x8": cnn_family("cnn8x8", 8)}
CASES = {"mlp": 32, "cnn": 8, "cnn8x8": 8}
BATCHES = {"mlp": (1, 256, 4096), "cnn": (1, 64, 1024), "cnn8x8": (1, 64, 4096)}
FULL = Budget(seconds=2.0, min_calls=5, max_calls=20000, warmup_calls=50, warmup_seconds=1.0)
QUICK = Budget(seconds=0.4, min_calls=3, max_calls=5000, warmup_calls=10, warmup_seconds=0.3)


def _with_random_biases(model: Any, seed: int) -> Any:
    """Trained models have non-zero biases; zero ones let converters drop the additions."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
            weights = layer.get_weights()
            weights[1] = rng.normal(0, 0.1, weights[1].shape).astype("float32")
            layer.set_weights(weights)
    return model


def write_members(family: str, count: int, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"{family}_{index:02d}.keras"
        if not path.exists():
            seed = 5000 + index
            _with_random_biases(FUSION_FAMILIES[family].build(seed), seed).save(path)
        paths.append(path)
    return paths


def build_artifacts(family: str, paths: list[Path], directory: Path) -> dict[str, Any]:
    import fuser

    artifacts: dict[str, Any] = {}
    for label, members, fusion in (
        ("one_member", paths[:1], "off"),
        ("plain", paths, "off"),
        ("stacked", paths, "on"),  # the fused form; "stacked" is its key in the results
        ("auto", paths, "auto"),
    ):
        started = time.perf_counter()
        ensemble = fuser.build(members, fusion=fusion)
        path = ensemble.save(directory / f"{family}_{label}.onnx", force=True)
        if label in ("plain", "stacked"):  # the same ensemble in TensorFlow
            artifacts[f"tf_{label}"] = {
                "path": ensemble.save(directory / f"{family}_{label}_savedmodel", force=True)
            }
        artifacts[label] = {
            "path": path,
            "build_seconds": round(time.perf_counter() - started, 2),
            "stacked_groups": [len(group.members) for group in ensemble.fusion.groups],
            "fusion": ensemble.manifest["fusion"],
            "notes": ensemble.fusion.notes(),
        }
    return artifacts


def run(
    out: Path,
    *,
    quick: bool,
    workdir: Path,
    cases: dict[str, int] = CASES,
    batches: dict[str, tuple[int, ...]] = BATCHES,
    budget: Budget | None = None,
) -> dict[str, Any]:
    import fuser
    import runtime

    fuser.import_tensorflow()
    budget = budget or (QUICK if quick else FULL)
    results: dict[str, Any] = {"machine": describe_machine(), "quick": quick, "families": {}}
    for family, count in cases.items():
        if quick:
            count = min(count, 4)
        paths = write_members(family, count, workdir / family)
        artifacts = build_artifacts(family, paths, workdir)
        models = {label: runtime.load(entry["path"]) for label, entry in artifacts.items()}
        # One intra-op thread, as deployed one process per core: small batches gain most.
        for label in ("one_member", "stacked"):
            models[f"{label}_1t"] = runtime.load(artifacts[label]["path"], threads=1)
        check = random_inputs(FUSION_FAMILIES[family], 64, seed=1)
        difference = float(
            np.abs(models["stacked"].predict(check) - models["plain"].predict(check)).max()
        )
        if difference > 1e-5:
            raise SystemExit(f"{family}: stacked and plain differ by {difference:.3g} (> 1e-5)")
        rows = []
        for batch in batches[family]:
            x = random_inputs(FUSION_FAMILIES[family], batch, seed=2)
            row: dict[str, Any] = {"batch": batch}
            for label, model in models.items():
                seconds = timed_calls(model.predict, x, budget)
                row[f"{label}_ms"] = round(float(np.median(seconds)) * 1000, 4)
                row[f"{label}_calls"] = len(seconds)
            row["stacked_over_plain"] = round(row["stacked_ms"] / row["plain_ms"], 3)
            row["auto_over_plain"] = round(row["auto_ms"] / row["plain_ms"], 3)
            row["stacked_over_one_member"] = round(row["stacked_ms"] / row["one_member_ms"], 3)
            row["plain_over_one_member"] = round(row["plain_ms"] / row["one_member_ms"], 3)
            row["stacked_over_one_member_1t"] = round(
                row["stacked_1t_ms"] / row["one_member_1t_ms"], 3
            )
            row["tf_stacked_over_tf_plain"] = round(row["tf_stacked_ms"] / row["tf_plain_ms"], 3)
            rows.append(row)
            print(
                f"{family} N={count} batch {batch}: one member {row['one_member_ms']:.4f} ms, "
                f"plain {row['plain_ms']:.4f} ms, stacked {row['stacked_ms']:.4f} ms "
                f"(x{row['stacked_over_plain']} of plain, x{row['stacked_over_one_member']} of "
                f"one member), auto x{row['auto_over_plain']} of plain; one thread: one member "
                f"{row['one_member_1t_ms']:.4f} ms, stacked {row['stacked_1t_ms']:.4f} ms "
                f"(x{row['stacked_over_one_member_1t']}); TensorFlow SavedModel: plain "
                f"{row['tf_plain_ms']:.4f} ms, stacked {row['tf_stacked_ms']:.4f} ms",
                flush=True,
            )
        results["families"][family] = {
            "members": count,
            "max_abs_difference_stacked_vs_plain": difference,
            "auto_stacked_groups": artifacts["auto"]["stacked_groups"],
            "auto_reasons": sorted(set(artifacts["auto"]["fusion"]["plain"].values())),
            "auto_notes": artifacts["auto"]["notes"],
            "stacked_layers": artifacts["stacked"]["fusion"]["groups"][0]["layers"],
            "build_seconds": {
                label: entry["build_seconds"]
                for label, entry in artifacts.items()
                if "build_seconds" in entry
            },
            "rows": rows,
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "FUSION.md").write_text(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "# Horizontal fusion: fused form vs plain form vs one member",
        "",
        "`python -m benchmarks.fusion` — every artifact through `runtime.load(...).predict` "
        "(ONNX Runtime, default session options). Median latency in ms of repeated calls after "
        "a warm-up. *stacked* is the fused form (`--fusion on`), *plain* the plain form "
        "(`--fusion off`), *auto* the default. "
        "The last three columns load the one-member and stacked artifacts with "
        "`runtime.load(path, threads=1)` (one ONNX Runtime intra-op thread, as one deploys "
        "one process per core).",
        "",
        "Machine: {cpu_model}, {cores_logical} logical cores, {memory_gb} GB, Python {python}, "
        "load average at start {load_average_at_start}.".format(**results["machine"])
        + f" TensorFlow: {describe_onednn(results['machine'])}; the TensorFlow columns time "
        "the SavedModel artifacts, everything else ONNX Runtime, which oneDNN does not affect.",
        "",
    ]
    for family, data in results["families"].items():
        lines += [
            f"## {family}, {data['members']} members",
            "",
            f"Stacked vs plain outputs: max abs difference "
            f"{data['max_abs_difference_stacked_vs_plain']:.2e}. "
            f"`--fusion auto` stacked groups: {data['auto_stacked_groups'] or 'none'}. "
            + " ".join(data["auto_notes"]),
            "",
            "| batch | one member | plain | stacked | auto | stacked / plain | "
            "stacked / one member | plain / one member | one member, 1 thread | "
            "stacked, 1 thread | stacked / one member, 1 thread | TensorFlow plain | "
            "TensorFlow stacked | TensorFlow stacked / plain |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in data["rows"]:
            lines.append(
                f"| {row['batch']} | {row['one_member_ms']:.4f} | {row['plain_ms']:.4f} | "
                f"{row['stacked_ms']:.4f} | {row['auto_ms']:.4f} | {row['stacked_over_plain']:.2f} | "
                f"{row['stacked_over_one_member']:.2f} | {row['plain_over_one_member']:.2f} | "
                f"{row['one_member_1t_ms']:.4f} | {row['stacked_1t_ms']:.4f} | "
                f"{row['stacked_over_one_member_1t']:.2f} | {row['tf_plain_ms']:.4f} | "
                f"{row['tf_stacked_ms']:.4f} | {row['tf_stacked_over_tf_plain']:.2f} |"
            )
        lines += ["", "Lowering per layer (stacked):", ""]
        for layer in data["stacked_layers"]:
            lines.append(f"- `{layer['layer']}` ({layer['type']}): {layer['lowering']}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 members per family, short timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where members and artifacts go")
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with workdir_or_temporary(arguments.workdir, "fuser-fusion-") as workdir:
        run(arguments.out, quick=arguments.quick, workdir=workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
