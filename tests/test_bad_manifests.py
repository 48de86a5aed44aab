"""A manifest edited and sealed again passes the integrity check: its schema must still
hold. Each is refused at load with ``ManifestError`` naming the field, and ``fuser
inspect`` says so in one sentence (exit status 2) instead of crashing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuser
import runtime
from fuser.cli import main
from runtime import ManifestError, readers
from runtime import manifest as manifest_lib
from runtime.describe import describe

# Members a and b with the uncertainty outputs: four outputs, one input.
PATHS = ["a.keras", "b.h5"]
DEEP = 990  # the nesting that crashed `fuser inspect`
_PLACEHOLDER = "__nested__"


@pytest.fixture(scope="module")
def onnx_path(members_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_manifests") / "e.onnx"
    return fuser.build([members_dir / name for name in PATHS], uncertainty=True).save(path)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def reseal_onnx(
    source: Path, target: Path, edit: Callable[[dict], Any], *, nested: str | None = None
) -> Path:
    """Copy the ONNX artifact ``source`` to ``target`` with its manifest edited and sealed
    again, as someone who can write the file could: the integrity check passes.

    ``nested``: JSON text put where ``edit`` left the string ``_PLACEHOLDER`` (nesting too
    deep for ``json.dumps`` from a test's stack).
    """
    text, (before, after) = readers.split_onnx(source.read_bytes())
    manifest = json.loads(text)
    edit(manifest)
    manifest["integrity"].pop("manifest")
    placeholder, replacement = json.dumps(_PLACEHOLDER), nested or json.dumps(_PLACEHOLDER)
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    canonical = canonical.replace(placeholder, replacement)
    manifest["integrity"]["manifest"] = hashlib.sha256(canonical.encode()).hexdigest()
    value = manifest_lib.dumps(manifest).replace(placeholder, replacement).encode()
    key = manifest_lib.ONNX_METADATA_KEY.encode()
    entry = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value
    target.write_bytes(bytes(before) + b"\x72" + _varint(len(entry)) + entry + bytes(after))
    return target


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit setting the field at ``path`` (``members.0.name``) to ``value``."""
    *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]

    def edit(manifest: dict) -> None:
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = copy.deepcopy(value)

    return edit


def _delete(path: str) -> Callable[[dict], None]:
    *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]

    def edit(manifest: dict) -> None:
        node = manifest
        for key in parents:
            node = node[key]
        del node[last]

    return edit


def _group(**changes: Any) -> Callable[[dict], None]:
    """An edit adding a fused group (as ``--fusion`` writes one) with ``changes``."""
    group = {
        "members": ["a", "b"],
        "layers": [{"layer": "dense", "type": "Dense", "lowering": "grouped", "why": "-"}],
        "max_stacked_batch": 64,
        "measured": {
            "engine": "onnxruntime",
            "batches": [1, 64],
            "plain_ms": [0.1, 0.5],
            "stacked_ms": [0.05, 0.6],
            "switch": {"max_stacked_batch": 64, "plain_ms": [0.1, 0.5], "switch_ms": [0.05, 0.5]},
        },
    }
    for path, value in changes.items():
        _set(path, value)(group)
    return _set("fusion.groups", [group])


VALIDATION = {
    "source": "val.npz",
    "rows": 40,
    "outputs": {
        "prediction": {
            "metric": "log_loss",
            "members": {"a": 0.9, "b": None},
            "ensemble": 0.8,
            "ensemble_is_in_sample": False,
        }
    },
    "selection": {
        "strategy": "greedy",
        "size": 2,
        "metric": "log_loss",
        "picks": {"a": 2, "b": 0},
        "kept": ["a"],
    },
}


def _validation(path: str, value: Any) -> Callable[[dict], None]:
    record = copy.deepcopy(VALIDATION)
    _set(path, value)(record)
    return _set("validation", record)


# (edit, the field the message names and what it says)
RESEALED = [
    pytest.param(
        _set("members.0.name", 17),
        r"members\[0\]\.name must be a non-empty string, found 17",
        id="member-name-int",
    ),
    pytest.param(
        _set("members.1", "b"),
        r'members\[1\] must be a JSON object, found "b"',
        id="member-a-string",
    ),
    pytest.param(
        _set("members", {"a": 1}),
        r'members must be a list, found object \{"a": 1\}',
        id="members-an-object",
    ),
    pytest.param(
        _delete("members.0.format"),
        r"members\[0\] lacks the keys format",
        id="member-without-format",
    ),
    pytest.param(
        _set("members.0.format", "pickle"),
        r'members\[0\]\.format must be one of keras, h5, savedmodel, memory, found "pickle"',
        id="member-format-unknown",
    ),
    pytest.param(
        _set("members.0.parameters", "many"),
        r'members\[0\]\.parameters must be an integer of at least 0, found "many"',
        id="member-parameters-text",
    ),
    pytest.param(
        _set("members.0.sha256", 5),
        r"members\[0\]\.sha256 must be a SHA-256 digest in hexadecimal or null, found 5",
        id="member-sha256-int",
    ),
    pytest.param(
        _set("members.0.inputs.0.shape", "20"),
        r'members\[0\]\.inputs\[0\]\.shape must be a list of at most 32 items, found "20"',
        id="member-spec-shape",
    ),
    pytest.param(
        _set("head", "mean"), r'head must be a JSON object, found "mean"', id="head-a-string"
    ),
    pytest.param(
        _set("head.params", [1]),
        r"head\.params must be a JSON object, found list \[1\]",
        id="head-params-list",
    ),
    pytest.param(_delete("head.name"), r"head lacks the keys name", id="head-without-name"),
    pytest.param(
        _set("inputs", []), r"inputs must be a non-empty list, found list \[\]", id="no-inputs"
    ),
    pytest.param(
        _set("inputs.0.shape", [None, 0]),
        r"inputs\[0\]\.shape\[1\] must be a positive integer \(a 64-bit size\) or null, found 0",
        id="input-dimension-zero",
    ),
    pytest.param(
        _set("inputs.0.shape", [None, True]),
        r"inputs\[0\]\.shape\[1\] must be a positive integer .*found true",
        id="input-dimension-bool",
    ),
    pytest.param(
        _set("inputs.0.shape", []),
        r"inputs\[0\]\.shape must be a non-empty list of at most 32 items, found list \[\]",
        id="input-rank-0",
    ),
    pytest.param(
        _set("inputs.0.dtype", "complex64"),
        r'inputs\[0\]\.dtype must be one of bool, int8, .*, float64, found "complex64"',
        id="input-dtype-unknown",
    ),
    pytest.param(
        _set("outputs.0.name", ""),
        r'outputs\[0\]\.name must be a non-empty string, found ""',
        id="output-name-empty",
    ),
    pytest.param(
        _set("outputs.1.name", "prediction"),
        r"outputs\[1\]\.name repeats names in 'outputs' \('prediction' again\)",
        id="output-names-repeated",
    ),
    pytest.param(
        _set("artifact", ["onnx"]),
        r'artifact must be a JSON object, found list \["onnx"\]',
        id="artifact-a-list",
    ),
    pytest.param(
        _set("artifact.format", "keras"),
        r"artifact\.format is 'keras', but the artifact is an ONNX model \('onnx'\)",
        id="artifact-format-of-another-kind",
    ),
    pytest.param(
        _set("artifact.opset", "17"),
        r'artifact\.opset must be an integer of at least 1, found "17"',
        id="artifact-opset-text",
    ),
    pytest.param(
        _set("artifact.external_data", "w.data"),
        r'artifact\.external_data must be a list, found "w\.data"',
        id="external-data-a-string",
    ),
    pytest.param(
        _set("created", 2026),
        r"created must be a non-empty string, found 2026",
        id="created-a-number",
    ),
    pytest.param(
        _set("versions", ["1.0"]),
        r'versions must be a JSON object, found list \["1\.0"\]',
        id="versions-a-list",
    ),
    pytest.param(
        _set("tasks", ["probabilities"]),
        r"tasks must be a JSON object or null, found list",
        id="tasks-a-list",
    ),
    pytest.param(
        _set("tasks.prediction", {"task": "magic", "reason": "-"}),
        r'tasks\.prediction\.task must be one of probabilities, logits, regression, found "magic"',
        id="task-unknown",
    ),
    pytest.param(
        _set("fusion", "off"),
        r'fusion must be a JSON object or null, found "off"',
        id="fusion-a-string",
    ),
    pytest.param(
        _set("fusion.mode", "fast"),
        r'fusion\.mode must be one of auto, on, off, stack, found "fast"',
        id="fusion-mode-unknown",
    ),
    pytest.param(
        _set("fusion.plain", {"a": 3}),
        r"fusion\.plain\.a must be a string, found 3",
        id="fusion-plain-reason-int",
    ),
    pytest.param(
        _group(members=[1]),
        r"fusion\.groups\[0\]\.members\[0\] must be a non-empty string, found 1",
        id="group-member-int",
    ),
    pytest.param(
        _group(layers=[{"layer": "d"}]),
        r"fusion\.groups\[0\]\.layers\[0\] lacks the keys type, lowering",
        id="group-layer-incomplete",
    ),
    pytest.param(
        _group(**{"measured.plain_ms": ["fast"]}),
        r'fusion\.groups\[0\]\.measured\.plain_ms\[0\] must be a number, found "fast"',
        id="group-timing-text",
    ),
    pytest.param(
        _group(**{"measured.switch.speedup": 2}),
        r"fusion\.groups\[0\]\.measured\.switch\.speedup is not one of the keys max_stacked_batch, plain_ms, switch_ms",
        id="group-switch-unknown-key",
    ),
    pytest.param(
        _group(max_stacked_batch=0),
        r"fusion\.groups\[0\]\.max_stacked_batch must be an integer of at least 1 or null, found 0",
        id="group-switch-batch-zero",
    ),
    pytest.param(
        _validation("outputs.prediction.members.a", "good"),
        r'validation\.outputs\.prediction\.members\.a must be a number or null, found "good"',
        id="validation-score-text",
    ),
    pytest.param(
        _validation("outputs.prediction.ensemble_is_in_sample", "no"),
        r"ensemble_is_in_sample must be true or false",
        id="validation-flag-text",
    ),
    pytest.param(
        _validation("selection.picks.a", -1),
        r"validation\.selection\.picks\.a must be an integer of at least 0, found -1",
        id="selection-picks-negative",
    ),
    pytest.param(
        _validation("selection.strategy", "best"),
        r'validation\.selection\.strategy must be one of top, greedy, found "best"',
        id="selection-strategy-unknown",
    ),
    pytest.param(
        _set("verification", None),
        r"verification must be a JSON object, found null",
        id="verification-null",
    ),
    pytest.param(
        _set("verification.artifact.max_abs_error", "tiny"),
        r'verification\.artifact\.max_abs_error must be a number, found "tiny"',
        id="verification-error-text",
    ),
    pytest.param(
        _set("verification.other", {"max_abs_error": 0.1}),
        r"verification\.other lacks the keys probe_batch, tolerance",
        id="verification-record-incomplete",
    ),
    pytest.param(
        _set("verification.nonfinite_values", {"a": {"prediction": {"nan": "1", "inf": 0}}}),
        r'verification\.nonfinite_values\.a\.prediction\.nan must be an integer of at least 0, found "1"',
        id="nonfinite-count-text",
    ),
    pytest.param(
        _set("integrity.content", ["model"]),
        r'integrity\.content must be a JSON object, found list \["model"\]',
        id="integrity-content-list",
    ),
    pytest.param(
        _set("build", {"x": _PLACEHOLDER}),
        r"build\.x(\[0\]){6}… is nested more than 32 levels deep",
        id="nested-990-deep",
    ),
]
# Manifests that fit the schema but not the ONNX graph they travel with: its inputs' and
# outputs' names, dtypes, ranks and fixed sizes.
NOT_THE_GRAPHS = [
    pytest.param(
        _set("inputs.0.name", "pixels"),
        r"does not describe its model: manifest field inputs\[0\]\.name is 'pixels', but the ONNX graph's inputs are \['features'\]",
        id="input-name-not-the-graphs",
    ),
    pytest.param(
        _set("outputs.0.name", "scores"),
        r"manifest field outputs\[0\]\.name is 'scores', but the ONNX graph's outputs are \['entropy', 'mutual_info', 'prediction', 'std'\]",
        id="output-name-not-the-graphs",
    ),
    pytest.param(
        _set("inputs.0.dtype", "float64"),
        r"manifest field inputs\[0\]\.dtype is 'float64', but the ONNX graph's input 'features' is float32",
        id="input-dtype-not-the-graphs",
    ),
    pytest.param(
        _set("inputs.0.shape", [None, 7]),
        r"manifest field inputs\[0\]\.shape is \(None, 7\), but the ONNX graph's input 'features' has shape \(None, 20\)",
        id="input-size-not-the-graphs",
    ),
    pytest.param(
        _set("outputs.0.shape", [None, 5, 1]),
        r"manifest field outputs\[0\]\.shape is \(None, 5, 1\), but the ONNX graph's output 'prediction' has shape",
        id="output-rank-not-the-graphs",
    ),
    pytest.param(
        _delete("outputs.3"),
        r"manifest field outputs lacks the ONNX graph's outputs \['mutual_info'\]",
        id="graph-output-unlisted",
    ),
]


@pytest.mark.parametrize(("edit", "pattern"), RESEALED + NOT_THE_GRAPHS)
def test_a_resealed_manifest_that_breaks_the_schema_is_refused_at_load(
    onnx_path, tmp_path, edit, pattern
):
    bad = reseal_onnx(onnx_path, tmp_path / "bad.onnx", edit, nested="[" * DEEP + "]" * DEEP)
    with pytest.raises(ManifestError, match=r"^The manifest in \S*bad\.onnx .*" + pattern):
        runtime.load(bad)
    with pytest.raises(ManifestError, match=pattern):
        runtime.load(bad, verify=False)


@pytest.mark.parametrize(("edit", "pattern"), RESEALED)
def test_inspect_refuses_a_resealed_bad_manifest_in_one_sentence(
    onnx_path, tmp_path, capsys, edit, pattern
):
    bad = reseal_onnx(onnx_path, tmp_path / "bad.onnx", edit, nested="[" * DEEP + "]" * DEEP)
    for arguments in ([], ["--no-verify"], ["--json"]):
        assert main(["inspect", str(bad), *arguments]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        (line,) = captured.err.splitlines()
        assert line.startswith(f"fuser: error: The manifest in {bad} ") and line.endswith(".")
        assert re.search(pattern, line)


@pytest.mark.parametrize(("edit", "pattern"), NOT_THE_GRAPHS)
def test_predict_refuses_a_manifest_that_is_not_the_graphs_in_one_sentence(
    onnx_path, tmp_path, capsys, features, edit, pattern
):
    """``fuser inspect`` reads the manifest alone and shows it; what opens the model refuses."""
    bad = reseal_onnx(onnx_path, tmp_path / "bad.onnx", edit)
    np.save(tmp_path / "x.npy", features)
    output = tmp_path / "y.npz"
    status = main(
        ["predict", str(bad), "--input", str(tmp_path / "x.npy"), "--output", str(output)]
    )
    captured = capsys.readouterr()
    assert status == 2, captured
    (line,) = captured.err.splitlines()
    assert line.startswith(f"fuser: error: The manifest in {bad} does not describe its model: ")
    assert re.search(pattern, line)
    assert not output.exists()


def test_the_resealing_helper_makes_an_artifact_that_loads(onnx_path, tmp_path, features):
    """So the refusals above come from the schema, not from a broken seal."""
    same = reseal_onnx(onnx_path, tmp_path / "same.onnx", _set("created", "yesterday"))
    model = runtime.load(same)
    assert model.manifest["created"] == "yesterday"
    np.testing.assert_array_equal(
        model.predict(features)["prediction"],
        runtime.load(onnx_path).predict(features)["prediction"],
    )
    assert main(["inspect", str(same)]) == 0


def test_the_runtime_schema_lists_the_values_the_compiler_writes():
    from fuser import heads, members, selection
    from fuser.fusion import plan

    assert manifest_lib.MEMBER_FORMATS == members.FORMATS
    assert manifest_lib.TASKS == heads.TASKS
    assert set(manifest_lib.FUSION_MODES) == {*plan.MODES, *plan.ALIASES}
    assert manifest_lib.SELECTION_STRATEGIES == selection.STRATEGIES


# Every manifest that loads can be described -------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def rich_manifest(onnx_path) -> dict:
    """The real manifest with every part `fuser inspect` prints: a fused group behind a
    switch, validation with greedy selection, NaN counts."""
    manifest = readers.read_manifest("onnx", onnx_path)
    for edit in (
        _group(),
        _set("validation", VALIDATION),
        _set("verification.nonfinite_allowed", True),
        _set(
            "verification.nonfinite_values",
            {"a": {"prediction": {"nan": 1, "inf": 2, "values": 40}}},
        ),
        _set("head.params", {"prediction": {"model": "ridge regression", "alpha": 1.0}}),
        _set("artifact.switch_batch", 64),
    ):
        edit(manifest)
    manifest_lib.check(manifest, "rich")
    assert "switch_ms" in json.dumps(manifest)
    return manifest


def _paths(value, prefix=()):
    yield prefix
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        yield from _paths(child, (*prefix, key))


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(data=st.data())
def test_every_manifest_that_loads_can_be_inspected(rich_manifest, data):
    manifest = copy.deepcopy(rich_manifest)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(list(_paths(manifest))[1:]), label="path")
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans(), label="delete"):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    try:
        manifest_lib.check(manifest, "x", kind="onnx")
    except ManifestError:
        return
    assert describe(manifest, "x").startswith("artifact   x (onnx")
    assert len(manifest_lib.specs(manifest, "inputs")) == len(manifest["inputs"])


def test_float_constants_json_allows_are_refused(rich_manifest):
    text = manifest_lib.dumps(rich_manifest).replace('"tolerance": 0.0001', '"tolerance": NaN', 1)
    assert "NaN" in text
    with pytest.raises(ManifestError, match=r"is not valid JSON \(NaN is not a JSON number"):
        manifest_lib.loads(text, "x")
