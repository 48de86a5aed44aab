"""What ``fuser inspect`` prints: a manifest described for people, one line per fact.

Reads only the manifest (already checked against ``runtime.manifest``'s schema), so that
inspecting an artifact imports neither the compiler nor TensorFlow nor ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

from runtime.manifest import specs


def timings(record: dict[str, Any]) -> str:
    """``batch 1: 0.0266 vs 0.0954 ms, ...``: a fused group's timing as the manifest keeps
    it (``fusion.groups[].measured``): fused vs plain, and the switch's run if any."""
    batches = record["batches"]
    text = _pairs(batches, record["stacked_ms"], record["plain_ms"])
    switch = record.get("switch")
    if switch:
        text += (
            f"; fused up to batch {switch['max_stacked_batch']}, plain above, vs plain: "
            + _pairs(batches, switch["switch_ms"], switch["plain_ms"])
        )
    return text


def _pairs(batches: list[int], times: list[float], plain: list[float]) -> str:
    return ", ".join(f"batch {b}: {t:.3g} vs {p:.3g} ms" for b, t, p in zip(batches, times, plain))


def describe(manifest: dict[str, Any], source: str, *, verified: bool = False) -> str:
    """A human-readable summary of a manifest (``verified``: its seal was checked)."""
    artifact = manifest["artifact"]
    details = ", ".join(
        f"{key} {value}" for key, value in sorted(artifact.items()) if key != "format"
    )
    lines = [f"artifact   {source} ({artifact['format']}{', ' + details if details else ''})"]
    lines.append(f"created    {manifest.get('created', '?')}")
    build = manifest.get("build") or {}
    figures = [
        f"{label} {build[key]:,.{digits}f}{unit}"
        for key, label, unit, digits in (
            ("load_seconds", "members loaded in", " s", 2),
            ("peak_memory_mb", "peak memory", " MB", 0),
        )
        if isinstance(build.get(key), (int, float)) and not isinstance(build.get(key), bool)
    ]
    recorded = build.get("members_from_records")
    if isinstance(recorded, list) and recorded:
        figures.append(f"{len(recorded)} from their records ({', '.join(map(str, recorded))})")
    conversion = build.get("onnx_conversion")
    if isinstance(conversion, dict) and conversion.get("by") == "units":
        units = [unit for unit in conversion.get("units") or [] if isinstance(unit, dict)]
        counts: dict[str, int] = {}
        for unit in units:
            counts[str(unit.get("converted"))] = counts.get(str(unit.get("converted")), 0) + 1
        places = {"cache": "from the cache", "worker": "in workers", "this process": "here"}
        done = ", ".join(
            f"{count} {places.get(where, where)}" for where, count in sorted(counts.items())
        )
        figures.append(f"ONNX converted by units ({done})")
    elif isinstance(conversion, dict) and conversion.get("by") == "whole":
        figures.append(f"ONNX converted whole ({conversion.get('why')})")
    conversion = build.get("savedmodel_conversion")
    if isinstance(conversion, dict) and conversion.get("by") == "units":
        units = [unit for unit in conversion.get("units") or [] if isinstance(unit, dict)]
        cached = sum(1 for unit in units if unit.get("traced") == "cache")
        figures.append(
            f"SavedModel joined from units ({cached} from the cache, {len(units) - cached} "
            "traced here)"
        )
    elif isinstance(conversion, dict) and conversion.get("by") == "whole":
        figures.append(f"SavedModel saved whole ({conversion.get('why')})")
    if figures:
        lines.append("build      " + ", ".join(figures))
    head = manifest["head"]
    cascade = head.get("name") == "cascade"
    params = "" if cascade else _head_params(head.get("params", {}))
    lines.append(f"head       {head.get('name')}{' (' + params + ')' if params else ''}")
    if cascade:
        lines += _cascade_lines(head.get("params") or {})
    lines.append("inputs     " + "; ".join(spec.describe() for spec in specs(manifest, "inputs")))
    lines.append("outputs    " + "; ".join(spec.describe() for spec in specs(manifest, "outputs")))
    for output, task in (manifest.get("tasks") or {}).items():
        lines.append(f"task       {output}: {task['task']} ({task['reason']})")
    fusion = manifest.get("fusion") or {}
    for group in fusion.get("groups", []):
        lines.append(
            f"fused      {len(group['members'])} members ({', '.join(group['members'])}), "
            f"fusion {fusion.get('mode', '?')}"
        )
        measured = group.get("measured")
        if measured:
            lines.append(f"             timed, fused vs plain: {timings(measured)}")
        limit = group.get("max_stacked_batch")
        if limit is not None:
            line = f"             fused up to batch {limit}, plain branches above"
            onnx_limit = artifact.get("switch_batch")
            if onnx_limit is not None and onnx_limit != limit:
                line += (
                    f" (this ONNX artifact: up to batch {onnx_limit}, the smallest limit of "
                    "its switched groups)"
                )
            lines.append(line)
        for layer in group["layers"]:
            lines.append(f"             {layer['layer']} ({layer['type']}): {layer['lowering']}")
    for name, reason in (fusion.get("plain") or {}).items():
        if fusion.get("groups") or fusion.get("mode") != "off":
            lines.append(f"plain      {name}: {reason}")
    validation = manifest.get("validation") or {}
    for output, record in validation.get("outputs", {}).items():
        members_text = ", ".join(
            f"{name} {_score(value)}" for name, value in record["members"].items()
        )
        in_sample = " in sample" if record.get("ensemble_is_in_sample") else ""
        if "full_ensemble" in record:  # a cascade: and every member on every row
            in_sample += f" (full ensemble {_score(record['full_ensemble'])})"
        lines.append(
            f"validation {output} {record['metric']} on {validation['source']} "
            f"({validation['rows']} rows): ensemble {_score(record['ensemble'])}{in_sample}; "
            f"members {members_text}"
        )
    selection = validation.get("selection")
    if selection:
        picks = ", ".join(f"{name}={count}" for name, count in selection["picks"].items())
        lines.append(
            f"selection  {selection['strategy']}:{selection['size']} by {selection['metric']}: "
            f"kept {', '.join(selection['kept'])} (picks {picks})"
        )
    members = manifest["members"]
    lines.append(f"members    {len(members)}")
    width = max((len(str(member.get("name"))) for member in members), default=4)
    for member in members:
        sha = (member.get("sha256") or "-")[:12]
        lines.append(
            f"  {member.get('name')!s:<{width}}  {member.get('format')!s:<10} "
            f"{member.get('parameters', 0):>12,} params  sha256 {sha}  {member.get('source')}"
        )
    verification = manifest.get("verification", {})
    for what, record in sorted(verification.items()):
        if isinstance(record, dict) and "max_abs_error" in record:
            lines.append(
                f"verified   {what}: max abs error {record['max_abs_error']:.2e} on "
                f"{record['probe_batch']} probe rows (tolerance {record['tolerance']:g})"
            )
    for what, record in sorted((verification.get("routing") or {}).items()):
        lines.append(
            f"routing    {what}: exit stages {record['exit_stages']}: as the NumPy reference "
            f"routes them on all {record['fit_rows']} validation rows "
            f"({record['fit_rows_routed_otherwise']} otherwise) and {record['probe_rows']} "
            f"probe rows ({record['probe_rows_routed_otherwise']} otherwise, "
            f"{record['probe_rows_near_a_threshold']} within float error of a threshold)"
        )
    if verification.get("nonfinite_allowed"):
        counts = verification.get("nonfinite_values") or {}
        found = ", ".join(
            f"{member} {sum(record['nan'] + record['inf'] for record in outputs.values())}"
            for member, outputs in counts.items()
        )
        lines.append(
            "nonfinite  allowed (--allow-nonfinite); NaN or inf on the probe batch: "
            + (found or "none")
        )
    seal = manifest.get("integrity") or {}
    if seal:
        state = "verified" if verified else "not checked (--no-verify)"
        lines.append(
            f"integrity  {seal.get('algorithm')} {state}: {len(seal.get('content', {}))} "
            f"piece(s) and the manifest, seal {str(seal.get('manifest'))[:12]}"
        )
    versions = manifest.get("versions", {})
    lines.append(
        "versions   " + ", ".join(f"{key} {value}" for key, value in sorted(versions.items()))
    )
    return "\n".join(lines)


def _cascade_lines(params: dict[str, Any]) -> list[str]:
    """The cascade's stages, thresholds, exit rates and costs, and its validation figures."""
    stages = params.get("stages") or []
    unit = params.get("cost_unit", "")
    fit = params.get("fit") or {}
    lines = [
        f"cascade    {len(stages)} stages, {params.get('confidence')} confidence, "
        f"{params.get('order')}; {params.get('metric')} within {params.get('tolerance'):g} of "
        "the full ensemble"
    ]
    for number, stage in enumerate(stages, 1):
        if number == len(stages):
            threshold = "last"
        elif stage.get("threshold") is None:
            threshold = "no early exit"
        else:
            threshold = f"threshold {stage['threshold']:.6g}"
        lines.append(
            f"stage {number:<4} {'+'.join(stage['members'])}: {threshold}, cost "
            f"{stage['cost_per_row']:.4g} {unit} per row, leaves {stage['exit_rate']:.1%} "
            f"(reaches {stage['reach_rate']:.1%})"
        )
    expected, full = params.get("expected_cost_per_row"), params.get("full_cost_per_row")
    if expected and full:
        lines.append(
            f"expected   cost per row {expected:.4g} {unit} against {full:.4g} for the full "
            f"ensemble ({full / expected:.2f}x less); {params.get('metric')} "
            f"{fit.get('cascade', float('nan')):.4f} against {fit.get('full', float('nan')):.4f} "
            f"on {fit.get('source')} ({fit.get('rows')} rows)"
        )
    lines.append(f"costs      {params.get('cost_source')}")
    return lines


def _score(value: float | None) -> str:
    """A validation score; null in the manifest is a non-finite one."""
    return "non-finite" if value is None else f"{value:.4g}"


def _head_params(params: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(params.items()):
        if isinstance(value, dict):  # a fitted head: per output, the model in brief
            brief = {
                k: v for k, v in value.items() if k in ("model", "member_weights", "l2", "alpha")
            }
            value = ", ".join(f"{k} {v}" for k, v in brief.items())
        parts.append(f"{key}: {value}")
    return "; ".join(parts)
