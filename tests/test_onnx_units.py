"""ONNX by units: members converted on their own (in workers, cached), joined under the head.

The joined artifact must answer exactly like the whole model converted at once; a rebuild
after one member changed converts only that member; a cached unit that is damaged or
wrong is converted again, never shipped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    member_mean,
    mlp,
    reference_outputs,
    save_keras,
    two_in_two_out,
    wide,
)

import fuser
import runtime
from fuser.conversion import units as onnx_units
from fuser.conversion import workers

pytestmark = pytest.mark.fusion


def _conversion(path) -> dict:
    return runtime.load(path).manifest["build"]["onnx_conversion"]


def test_units_answer_like_the_whole_model_converted_at_once(
    tmp_path, cache, features, monkeypatch
):
    # A plain member first, then a fused group of two, then another plain one: the
    # group's members come out of member order and are put back.
    paths = save_keras(
        tmp_path,
        [("w1", wide(1)), ("a", mlp(1)), ("w2", wide(2, width=8)), ("b", mlp(2))],
    )
    ensemble = fuser.build(paths, fusion="on", uncertainty=True)
    assert [len(group.members) for group in ensemble.fusion.groups] == [2]
    by_units = ensemble.save(tmp_path / "units.onnx")
    conversion = _conversion(by_units)
    assert conversion["by"] == "units"
    assert sorted(unit["kind"] for unit in conversion["units"]) == ["group", "member", "member"]
    monkeypatch.setattr(onnx_units, "why_whole", lambda *arguments: "forced by the test")
    whole = ensemble.save(tmp_path / "whole.onnx")
    assert _conversion(whole) == {"by": "whole", "why": "forced by the test"}
    units_answer = runtime.load(by_units).predict(features)
    whole_answer = runtime.load(whole).predict(features)
    assert units_answer.keys() == whole_answer.keys()
    for name in units_answer:
        np.testing.assert_allclose(units_answer[name], whole_answer[name], atol=1e-6)
    np.testing.assert_allclose(units_answer["prediction"], member_mean(paths, features), atol=1e-5)


def test_several_inputs_and_outputs_join_by_name(tmp_path, cache):
    paths = save_keras(
        tmp_path, [("m1", two_in_two_out(1)), ("m2", two_in_two_out(2, swap_inputs=True))]
    )
    x = {
        "num": np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32),
        "cat": np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32),
    }
    ensemble = fuser.build(paths, fusion="off")
    answer = runtime.load(ensemble.save(tmp_path / "multi.onnx")).predict(x)
    outputs = reference_outputs(paths, x)
    np.testing.assert_allclose(answer["score"], np.mean([o[0] for o in outputs], 0), atol=1e-5)
    np.testing.assert_allclose(answer["probs"], np.mean([o[1] for o in outputs], 0), atol=1e-5)


def test_a_rebuild_converts_only_the_member_that_changed(tmp_path, cache, features):
    paths = save_keras(tmp_path, [("w1", wide(1)), ("w2", wide(2, width=8)), ("a", mlp(3))])
    first = fuser.build(paths).save(tmp_path / "first.onnx")
    assert {unit["converted"] for unit in _conversion(first)["units"]} == {"this process"}
    again = fuser.build(paths).save(tmp_path / "again.onnx")
    assert {unit["converted"] for unit in _conversion(again)["units"]} == {"cache"}
    wide(7, width=8).save(paths[1])  # w2 retrained
    rebuilt = fuser.build(paths).save(tmp_path / "rebuilt.onnx")
    converted = {unit["members"][0]: unit["converted"] for unit in _conversion(rebuilt)["units"]}
    assert converted == {"w1": "cache", "w2": "this process", "a": "cache"}
    np.testing.assert_allclose(
        runtime.load(rebuilt).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_a_damaged_or_wrong_cached_unit_is_converted_again(tmp_path, cache, features):
    paths = save_keras(tmp_path, [("w1", wide(1)), ("w2", wide(2, width=8))])
    fuser.build(paths).save(tmp_path / "first.onnx")
    entries = sorted((cache / "onnx-units").glob("*.onnx"))
    assert len(entries) == 2
    # One entry damaged, the other replaced by a valid model computing something else.
    entries[0].write_bytes(b"not an onnx model")
    other = tmp_path / "other"
    other.mkdir()
    other_paths = save_keras(other, [("w1", wide(11)), ("w2", wide(12, width=8))])
    wrong = fuser.build(other_paths, cache_dir=tmp_path / "other_cache").save(other / "o.onnx")
    assert _conversion(wrong)["units"]
    donor = sorted((tmp_path / "other_cache" / "onnx-units").glob("*.onnx"))
    entries[1].write_bytes(next(d for d in donor).read_bytes())
    rebuilt = fuser.build(paths).save(tmp_path / "rebuilt.onnx")
    # Converted again: here, or in workers for members taken from their records.
    assert "cache" not in {unit["converted"] for unit in _conversion(rebuilt)["units"]}
    np.testing.assert_allclose(
        runtime.load(rebuilt).predict(features), member_mean(paths, features), atol=1e-5
    )


def test_large_members_are_converted_in_worker_processes(tmp_path, cache, features, monkeypatch):
    monkeypatch.setattr(workers, "WORKER_MIN_BYTES", 0)
    paths = save_keras(tmp_path, [("w1", wide(1)), ("w2", wide(2, width=8))])
    in_memory = ("memory", wide(3, width=4))
    ensemble = fuser.build([*map(str, paths), in_memory], jobs=2)
    conversion = _conversion(ensemble.save(tmp_path / "e.onnx"))
    converted = {unit["members"][0]: unit["converted"] for unit in conversion["units"]}
    assert converted == {"w1": "worker", "w2": "worker", "memory": "this process"}
    assert conversion["workers"] == 2 and conversion["worker_peak_memory_mb"] > 100
    expected = np.mean(
        [*(outputs[0] for outputs in reference_outputs(paths, features)), in_memory[1](features)],
        axis=0,
    )
    np.testing.assert_allclose(
        runtime.load(tmp_path / "e.onnx").predict(features), expected, atol=1e-5
    )


def test_a_worker_that_fails_is_one_sentence_naming_the_member(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(workers, "WORKER_MIN_BYTES", 0)
    paths = save_keras(tmp_path, [("w1", wide(1)), ("w2", wide(2, width=8))])
    ensemble = fuser.build(paths)
    paths[1].write_bytes(b"replaced by something that is not a model")
    with pytest.raises(
        fuser.FuseError,
        match=r'^Converting Member "w2" \(w2\.keras\) to ONNX in a worker process failed: ',
    ):
        ensemble.save(tmp_path / "e.onnx")
    assert not (tmp_path / "e.onnx").exists()


def test_without_the_cache_nothing_is_kept(tmp_path, cache):
    paths = save_keras(tmp_path, [("w1", wide(1)), ("w2", wide(2, width=8))])
    fuser.build(paths, cache=False).save(tmp_path / "e.onnx")
    assert not cache.exists()
    folder = tmp_path / "elsewhere"
    fuser.build(paths, cache_dir=folder).save(tmp_path / "f.onnx")
    assert len(list((folder / "onnx-units").glob("*.onnx"))) == 2
    assert not cache.exists()


def test_the_cache_keeps_the_most_recently_used_within_its_size(tmp_path, cache, monkeypatch):
    paths = save_keras(tmp_path, [("w1", wide(1)), ("w2", wide(2, width=8))])
    fuser.build(paths).save(tmp_path / "e.onnx")
    entries = sorted((cache / "onnx-units").glob("*.onnx"), key=lambda e: e.stat().st_size)
    monkeypatch.setenv("FUSER_CACHE_BYTES", str(entries[-1].stat().st_size))
    fuser.build(paths).save(tmp_path / "f.onnx")  # both used again: one must go
    assert len(list((cache / "onnx-units").glob("*.onnx"))) == 1


def test_switched_groups_are_converted_whole(tmp_path, cache, monkeypatch):
    from fuser.fusion import costs

    paths = save_keras(tmp_path, [("a", mlp(1)), ("b", mlp(2))])
    measured = costs.Measurement([1, 256, 4096], [1.0, 1.0, 1.0], [0.5, 2.0, 2.0])
    monkeypatch.setattr(costs, "measure", lambda group: measured)
    monkeypatch.setattr(
        costs,
        "measure_switch",
        lambda group, timed: costs.SwitchTiming(timed.fused_limit, [1.0] * 3, [0.5, 1.0, 1.0]),
    )
    ensemble = fuser.build(paths)
    assert ensemble.switch_batch == 1
    conversion = _conversion(ensemble.save(tmp_path / "switched.onnx"))
    assert conversion == {"by": "whole", "why": "a group is switched on the batch size"}


def test_the_cli_takes_a_cache_folder_or_none(tmp_path, cache, capsys):
    from fuser.cli import main

    paths = [
        str(path) for path in save_keras(tmp_path, [("w1", wide(1)), ("w2", wide(2, width=8))])
    ]
    folder = tmp_path / "cli_cache"
    assert main(["build", *paths, "-o", str(tmp_path / "a.onnx"), "--cache", str(folder)]) == 0
    assert len(list((folder / "onnx-units").glob("*.onnx"))) == 2
    assert main(["build", *paths, "-o", str(tmp_path / "b.onnx"), "--no-cache", "-q"]) == 0
    assert not cache.exists()
    assert json.loads(json.dumps(_conversion(tmp_path / "b.onnx")))["by"] == "units"
