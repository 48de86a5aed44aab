"""Integrity: every artifact is sealed with SHA-256 digests; a damaged one is refused at load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import member_mean

import fuser
import runtime
from fuser.cli import main
from runtime import ArtifactError, IntegrityError, ManifestError, integrity, readers
from runtime import manifest as manifest_lib

PATHS = ["a.keras", "b.h5"]


@pytest.fixture(scope="module")
def ensemble(members_dir):
    return fuser.build([members_dir / name for name in PATHS])


@pytest.fixture(scope="module")
def artifacts(ensemble, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sealed")
    return {
        kind: ensemble.save(directory / name)
        for kind, name in (("onnx", "e.onnx"), ("savedmodel", "e_sm"), ("keras", "e.keras"))
    }


def _flip(data: bytes, position: int, mask: int) -> bytes:
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :]


@pytest.mark.parametrize("kind", ["onnx", "savedmodel", "keras"])
def test_every_artifact_is_sealed_and_loads_verified(artifacts, members_dir, features, kind):
    model = runtime.load(artifacts[kind])
    record = model.manifest["integrity"]
    assert record["algorithm"] == "sha256" and len(record["manifest"]) == 64
    assert record["content"] and all(len(digest) == 64 for digest in record["content"].values())
    if kind == "onnx":
        assert list(record["content"]) == ["model"]
    elif kind == "savedmodel":
        assert "saved_model.pb" in record["content"]
        assert any(name.startswith("variables/") for name in record["content"])
        assert manifest_lib.SAVEDMODEL_ASSET not in record["content"]
    else:
        assert "model.weights.h5" in record["content"]
        assert manifest_lib.KERAS_ZIP_ENTRY not in record["content"]
    expected = member_mean([members_dir / name for name in PATHS], features)
    np.testing.assert_allclose(model.predict(features), expected, atol=1e-5)


def test_onnx_seal_covers_every_byte_but_the_seal_itself(artifacts):
    data = artifacts["onnx"].read_bytes()
    text, pieces = readers.split_onnx(data)
    manifest = json.loads(text)
    assert readers.onnx_content(pieces) == manifest["integrity"]["content"]
    payload = b"".join(bytes(piece) for piece in pieces)
    assert len(data) - len(payload) > len(text)  # the whole metadata entry is cut out
    assert data.startswith(payload[:100])
    text_again, whole = readers.split_onnx(payload)
    assert text_again is None and bytes(whole[0]) == payload


def test_a_flipped_byte_anywhere_in_an_onnx_artifact_is_refused(artifacts, tmp_path):
    """Weights, graph, the manifest's text and its protobuf framing: nothing loads damaged."""
    import onnx
    from onnx import numpy_helper

    data = artifacts["onnx"].read_bytes()
    text, _ = readers.split_onnx(data)
    weights = max(
        onnx.load(str(artifacts["onnx"])).graph.initializer,
        key=lambda tensor: numpy_helper.to_array(tensor).size,
    )
    raw = numpy_helper.to_array(weights).tobytes()
    weights_at = data.find(raw)
    manifest_at = data.find(text.encode())
    assert weights_at > 0 and manifest_at > 0
    rng = np.random.default_rng(0)
    positions = {
        *range(0, 24),  # the model header
        *range(manifest_at - 24, manifest_at + 64),  # framing, key and start of the manifest
        *range(manifest_at + len(text) - 16, len(data)),  # end of the manifest and after
        *(weights_at + rng.integers(0, len(raw), 40)).tolist(),
        *rng.integers(0, len(data), 120).tolist(),
    }
    damaged = tmp_path / "damaged.onnx"
    for position in sorted(positions):
        for mask in (0x01, 0xFF):
            damaged.write_bytes(_flip(data, position, mask))
            with pytest.raises(ArtifactError):
                runtime.load(damaged)
    damaged.write_bytes(_flip(data, weights_at + len(raw) // 2, 0x40))
    with pytest.raises(
        IntegrityError,
        match=r"damaged\.onnx failed its integrity check: the graph and weights do not match",
    ):
        runtime.load(damaged)


@pytest.mark.parametrize("length", [0, 1, 100, 0.5, 0.99])
def test_a_truncated_onnx_artifact_is_refused(artifacts, tmp_path, length):
    data = artifacts["onnx"].read_bytes()
    cut = int(len(data) * length) if isinstance(length, float) else length
    (tmp_path / "cut.onnx").write_bytes(data[:cut])
    with pytest.raises(ArtifactError, match=r"cut\.onnx"):
        runtime.load(tmp_path / "cut.onnx")


def test_verify_false_skips_the_check_and_serves_what_is_there(artifacts, tmp_path, features):
    import onnx
    from onnx import numpy_helper

    data = artifacts["onnx"].read_bytes()
    kernel = max(
        (
            numpy_helper.to_array(tensor)
            for tensor in onnx.load(str(artifacts["onnx"])).graph.initializer
        ),
        key=np.size,
    )
    raw, changed = kernel.tobytes(), (kernel + 1.0).astype(np.float32).tobytes()
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(data.replace(raw, changed, 1))
    with pytest.raises(IntegrityError, match=r"tampered\.onnx failed its integrity check"):
        runtime.load(tampered)
    loaded = runtime.load(tampered, verify=False)
    assert not np.allclose(
        loaded.predict(features), runtime.load(artifacts["onnx"]).predict(features)
    )


def test_a_modified_manifest_is_refused(ensemble, artifacts, tmp_path):
    import onnx

    model = onnx.load(str(artifacts["onnx"]))
    entry = next(e for e in model.metadata_props if e.key == manifest_lib.ONNX_METADATA_KEY)
    manifest = json.loads(entry.value)
    manifest["verification"]["artifact"]["max_abs_error"] = 0.0
    entry.value = manifest_lib.dumps(manifest)
    onnx.save(model, str(tmp_path / "edited.onnx"))
    with pytest.raises(IntegrityError, match=r"edited\.onnx: its manifest does not match"):
        runtime.load(tmp_path / "edited.onnx")
    del manifest["integrity"]
    entry.value = manifest_lib.dumps(manifest)
    onnx.save(model, str(tmp_path / "unsealed.onnx"))
    with pytest.raises(IntegrityError, match=r"unsealed\.onnx carries no integrity record"):
        runtime.load(tmp_path / "unsealed.onnx")
    assert runtime.load(tmp_path / "unsealed.onnx", verify=False).manifest == manifest


def test_savedmodel_damage_names_the_file(artifacts, tmp_path):
    original = artifacts["savedmodel"]
    data_file = next((original / "variables").glob("variables.data-*"))
    relative = data_file.relative_to(original).as_posix()

    flipped = shutil.copytree(original, tmp_path / "flipped")
    target = flipped / relative
    target.write_bytes(_flip(target.read_bytes(), target.stat().st_size // 2, 0x01))
    with pytest.raises(IntegrityError, match=rf"flipped failed .*'{relative}' does not match"):
        runtime.load(flipped)

    missing = shutil.copytree(original, tmp_path / "missing")
    (missing / "variables" / "variables.index").unlink()
    with pytest.raises(IntegrityError, match=r"'variables/variables\.index' is missing"):
        runtime.load(missing)

    added = shutil.copytree(original, tmp_path / "added")
    (added / "assets" / "extra.txt").write_text("x")
    with pytest.raises(IntegrityError, match=r"'assets/extra\.txt' was added"):
        runtime.load(added)


def test_keras_artifact_damage_is_refused(artifacts, tmp_path):
    import io
    import zipfile

    data = artifacts["keras"].read_bytes()
    # Bytes nothing reads: a local header's version, flags, method, time, date, checksum
    # and sizes (bytes 4 to 25: zip readers take them from the central directory) and a
    # central header's time and date (12 to 15); where they fall moves with the manifest's
    # length.
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        times = set()
        central = archive.start_dir
        for entry in archive.infolist():
            times.update(entry.header_offset + offset for offset in range(4, 26))
            times.update(central + offset for offset in range(12, 16))
            central += 46 + len(entry.orig_filename.encode()) + len(entry.extra)
            central += len(entry.comment)
    rng = np.random.default_rng(1)
    damaged = tmp_path / "damaged.keras"
    positions = [p for p in rng.integers(0, len(data), 30).tolist() if p not in times][:25]
    for position in positions:
        damaged.write_bytes(_flip(data, position, 0xFF))
        with pytest.raises(ArtifactError, match=r"damaged\.keras"):
            runtime.load(damaged)


def test_cli_refuses_a_damaged_artifact_with_one_sentence(artifacts, features, tmp_path, capsys):
    data = artifacts["onnx"].read_bytes()
    (tmp_path / "bad.onnx").write_bytes(_flip(data, len(data) // 3, 0x01))
    np.save(tmp_path / "x.npy", features)
    arguments = ["--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]
    assert main(["predict", str(tmp_path / "bad.onnx"), *arguments]) == 2
    error = capsys.readouterr().err
    assert "bad.onnx" in error and "integrity" in error and "Traceback" not in error
    assert not (tmp_path / "y.npy").exists()


def test_inspect_checks_the_seal_unless_told_not_to(artifacts, tmp_path, capsys):
    assert main(["inspect", str(artifacts["onnx"])]) == 0
    assert "integrity  sha256 verified: 1 piece(s) and the manifest" in capsys.readouterr().out
    import onnx
    from onnx import numpy_helper

    data = artifacts["onnx"].read_bytes()
    kernel = max(
        (numpy_helper.to_array(t) for t in onnx.load(str(artifacts["onnx"])).graph.initializer),
        key=np.size,
    )
    (tmp_path / "bad.onnx").write_bytes(
        data.replace(kernel.tobytes(), (kernel * 2).astype(np.float32).tobytes(), 1)
    )
    assert main(["inspect", str(tmp_path / "bad.onnx")]) == 2
    assert "the graph and weights do not match" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "bad.onnx"), "--no-verify"]) == 0
    assert "integrity  sha256 not checked (--no-verify)" in capsys.readouterr().out


def _resealed(manifest: dict, edit) -> str:
    """``manifest`` edited and sealed again (its content digests unchanged), as JSON."""
    manifest = json.loads(json.dumps(manifest))
    edit(manifest)
    integrity.seal(manifest, manifest["integrity"]["content"])
    return manifest_lib.dumps(manifest)


def test_a_resealed_savedmodel_manifest_must_describe_its_signature(artifacts, tmp_path):
    copy = shutil.copytree(artifacts["savedmodel"], tmp_path / "renamed")
    asset = copy / manifest_lib.SAVEDMODEL_ASSET
    manifest = json.loads(asset.read_text())
    asset.write_text(_resealed(manifest, lambda m: m["inputs"][0].update(name="pixels")))
    with pytest.raises(
        ManifestError,
        match=r"renamed does not describe its model: manifest field inputs\[0\]\.name is "
        r"'pixels', but the serving_default signature's inputs are \['features'\]\.$",
    ):
        runtime.load(copy)
    asset.write_text(_resealed(manifest, lambda m: m["outputs"][0].update(dtype="float16")))
    with pytest.raises(
        ManifestError,
        match=r"manifest field outputs\[0\]\.dtype is 'float16', but the serving_default "
        r"signature's output 'prediction' is float32\.$",
    ):
        runtime.load(copy)
    asset.write_text(_resealed(manifest, lambda m: m["artifact"].update(format="onnx")))
    with pytest.raises(
        ManifestError, match=r"artifact\.format is 'onnx', but the artifact is a SavedModel"
    ):
        runtime.load(copy)


def test_a_resealed_keras_manifest_must_name_its_kind(artifacts, tmp_path):
    import zipfile

    source = artifacts["keras"]
    with zipfile.ZipFile(source) as archive:
        manifest = json.loads(archive.read(manifest_lib.KERAS_ZIP_ENTRY))
        copy = tmp_path / "kind.keras"
        with zipfile.ZipFile(copy, "w") as out:
            for info in archive.infolist():
                if info.filename != manifest_lib.KERAS_ZIP_ENTRY:
                    out.writestr(info, archive.read(info))
            edited = _resealed(manifest, lambda m: m["artifact"].update(format="savedmodel"))
            out.writestr(manifest_lib.KERAS_ZIP_ENTRY, edited)
    with pytest.raises(
        ManifestError,
        match=r"kind\.keras is malformed: manifest field artifact\.format is 'savedmodel', but "
        r"the artifact is a \.keras file \('keras'\)\.$",
    ):
        runtime.load(copy)
