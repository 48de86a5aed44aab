"""A member may expand in memory only so far: zip bombs, HDF5 shape bombs and oversized
configs are refused from their headers, before Keras or TensorFlow parses them."""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fuser import FuseError
from fuser.members import MemberSpec, detect_format, load_members, parse_byte_size, parse_specs
from fuser.members import limits as limits_lib

GIB, MIB = 2**30, 2**20
RAISE = r"; if you trust the file, raise the limit with --max-member-bytes \(max_member_bytes=\)\.$"


def _rezip(source: Path, target: Path, replace: dict[str, bytes], add: dict[str, bytes] = ()):
    """``source`` (a .keras zip) again, with some entries' bytes replaced and others added,
    deflated (as a zip bomb would be) unless they are HDF5."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = replace.get(info.filename, archive.read(info))
            method = zipfile.ZIP_STORED if info.filename.endswith(".h5") else zipfile.ZIP_DEFLATED
            out.writestr(info.filename, data, compress_type=method)
        for name, data in dict(add).items():
            out.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    return target


def _claim(path: Path, sizes: dict[str, int]) -> None:
    """Make the zip's central directory claim ``sizes`` (uncompressed) for some entries."""
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<L", data, at + 16)
    while data[offset : offset + 4] == b"PK\x01\x02":
        name_size, extra_size, comment_size = struct.unpack_from("<HHH", data, offset + 28)
        name = data[offset + 46 : offset + 46 + name_size].decode()
        if name in sizes:
            struct.pack_into("<L", data, offset + 24, sizes[name])
        offset += 46 + name_size + extra_size + comment_size
    path.write_bytes(bytes(data))


def _spec(path: Path) -> MemberSpec:
    return MemberSpec(name="bomb", source=path)


@pytest.fixture
def keras_must_not_open(monkeypatch):
    """Fail the test if anything decompresses the member or Keras opens it."""
    import keras

    def never(*args, **kwargs):
        raise AssertionError("the member was read before its size was checked")

    monkeypatch.setattr(keras.models, "load_model", never)
    monkeypatch.setattr(zipfile.ZipFile, "testzip", never)


def test_a_zip_bomb_config_is_refused_before_keras_opens_it(
    members_dir, tmp_path, keras_must_not_open
):
    # 8 MiB of spaces deflate to 8 kB: still a valid config, one JSON value padded out.
    with zipfile.ZipFile(members_dir / "a.keras") as archive:
        config = archive.read("config.json")
    padded = config[:-1] + b" " * (8 * MIB) + config[-1:]
    bomb = _rezip(members_dir / "a.keras", tmp_path / "bomb.keras", {"config.json": padded})
    assert bomb.stat().st_size < 100_000
    with pytest.raises(
        FuseError,
        match=r'^Member "bomb": the zip entry \'config\.json\' of \S*bomb\.keras would expand to '
        r"8\.0 MiB in memory, over the limit of 1\.0 MiB for a model config \(1/64 of "
        r"max_member_bytes, 64\.0 MiB\)" + RAISE,
    ):
        load_members([_spec(bomb)], max_member_bytes=64 * MIB)
    # By default a config may take 64 MiB: one claiming 1 GiB (deflate reaches 1032:1, so
    # 1 MB would do) is refused just the same.
    _claim(bomb, {"config.json": GIB})
    with pytest.raises(
        FuseError,
        match=r"the zip entry 'config\.json' of \S*bomb\.keras would expand to 1\.0 GiB in memory, "
        r"over the limit of 64\.0 MiB for a model config \(1/64 of the default, 4\.0 GiB\)" + RAISE,
    ):
        load_members([_spec(bomb)])


def test_a_lowered_limit_refuses_what_the_entries_add_up_to(
    members_dir, tmp_path, keras_must_not_open
):
    padding = {"assets/padding.bin": bytes(8 * MIB)}
    bomb = _rezip(members_dir / "a.keras", tmp_path / "bomb.keras", {}, padding)
    with pytest.raises(
        FuseError,
        match=r"the 4 zip entries of \S*bomb\.keras \(the largest 'assets/padding\.bin', 8\.0 MiB\) would "
        r"expand to 8\.0 MiB in memory, over the limit of 4\.0 MiB for a member "
        r"\(max_member_bytes\)" + RAISE,
    ):
        load_members([_spec(bomb)], max_member_bytes=4 * MIB)


def test_a_raised_limit_loads_the_same_member(members_dir, tmp_path, features):
    import keras

    source = _rezip(members_dir / "a.keras", tmp_path / "a.keras", {})
    with pytest.raises(
        FuseError, match=r"the 3 zip entries of \S*a\.keras .* over the limit of 1\.0 KiB"
    ):
        load_members(parse_specs([source]), max_member_bytes=1024)
    (member,), _ = load_members(parse_specs([source]), max_member_bytes=64 * MIB)
    expected = keras.models.load_model(members_dir / "a.keras")(features)
    np.testing.assert_allclose(member.model(features), expected, atol=1e-6)


def test_the_default_limit_refuses_a_central_directory_claiming_6_gib(
    members_dir, tmp_path, keras_must_not_open
):
    claimed = _rezip(
        members_dir / "a.keras", tmp_path / "claims.keras", {}, {"assets/a": b"a", "assets/b": b"b"}
    )
    _claim(claimed, {"assets/a": 3 * GIB, "assets/b": 3 * GIB})
    with zipfile.ZipFile(claimed) as archive:  # what zipfile (and so Keras) would trust
        assert archive.getinfo("assets/b").file_size == 3 * GIB
    with pytest.raises(
        FuseError,
        match=r"the 5 zip entries of \S*claims\.keras \(the largest 'assets/[ab]', 3\.0 GiB\) would "
        r"expand to "
        r"6\.0 GiB in memory, over the limit of 4\.0 GiB for a member \(the default: 4\.0 GiB, or "
        r"4x its size on disk if larger\)" + RAISE,
    ):
        detect_format(_spec(claimed))


def test_too_many_zip_entries_are_refused_before_zipfile_reads_them(
    members_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(limits_lib, "MAX_ZIP_ENTRIES", 10)
    many = _rezip(
        members_dir / "a.keras", tmp_path / "many.keras", {}, {f"assets/{i}": b"" for i in range(8)}
    )
    monkeypatch.setattr(zipfile.ZipFile, "__init__", None)  # never reached
    with pytest.raises(
        FuseError, match=r"many\.keras is a zip archive of 11 entries, more than the 10 fuser reads"
    ):
        detect_format(_spec(many))


def _h5_copy(members_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(members_dir / "b.h5", tmp_path / "bomb.h5"))


def _add_shape_bomb(path: Path, rows: int) -> None:
    """A dataset of ``rows`` x 1024 float32 that stores nothing (chunked, gzip, fill value)."""
    import h5py

    with h5py.File(path, "a") as file:
        file.create_dataset(
            "model_weights/dense/huge", shape=(rows, 1024), dtype="f4", chunks=(64, 1024),
            compression="gzip",
        )  # fmt: skip


def test_an_h5_shape_bomb_is_refused_by_the_default_limit(members_dir, tmp_path):
    bomb = _h5_copy(members_dir, tmp_path)
    _add_shape_bomb(bomb, 2 * 2**20)  # 8 GiB declared
    assert bomb.stat().st_size < MIB
    with pytest.raises(
        FuseError,
        match=r"the \d+ HDF5 datasets of \S*bomb\.h5 \(the largest 'model_weights/dense/huge', 8\.0 GiB\) "
        r"would expand to 8\.0 GiB in memory, over the limit of 4\.0 GiB for a member"
        ".*" + RAISE,
    ):
        detect_format(_spec(bomb))


def test_an_h5_model_config_beyond_its_share_is_refused(members_dir, tmp_path):
    import h5py

    bomb = _h5_copy(members_dir, tmp_path)
    with h5py.File(bomb, "a") as file:
        file.attrs["model_config"] = file.attrs["model_config"] + " " * MIB
    with pytest.raises(
        FuseError,
        match=r"the HDF5 attribute 'model_config' of \S*bomb\.h5 would expand to 1\.0 MiB in memory, "
        r"over the limit of 512\.0 KiB for a model config \(1/64 of max_member_bytes, 32\.0 MiB\)",
    ):
        detect_format(_spec(bomb), max_member_bytes=32 * MIB)
    assert detect_format(_spec(bomb)) == "h5"  # within the default 64 MiB


@pytest.mark.parametrize("how", ["external-link", "external-storage"])
def test_h5_data_in_other_files_is_refused(members_dir, tmp_path, how):
    import h5py

    bomb = _h5_copy(members_dir, tmp_path)
    with h5py.File(bomb, "a") as file:
        if how == "external-link":
            file["model_weights/linked"] = h5py.ExternalLink("/etc/passwd", "/x")
        else:
            file.create_dataset("model_weights/zero", (10,), "f4", external=[("/dev/zero", 0, 40)])
    with pytest.raises(FuseError, match=r"bomb\.h5 has HDF5 data stored in other files"):
        detect_format(_spec(bomb))


def test_a_shape_bomb_in_a_keras_members_weights_is_refused(members_dir, tmp_path):
    with zipfile.ZipFile(members_dir / "a.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    _add_shape_bomb(tmp_path / "model.weights.h5", 2 * 2**20)
    weights = (tmp_path / "model.weights.h5").read_bytes()
    bomb = _rezip(members_dir / "a.keras", tmp_path / "bomb.keras", {"model.weights.h5": weights})
    with pytest.raises(
        FuseError,
        match=r"the \d+ HDF5 datasets of the zip entry 'model\.weights\.h5' of \S*bomb\.keras \(the "
        r"largest 'model_weights/dense/huge', 8\.0 GiB\) would expand to 8\.0 GiB",
    ):
        detect_format(_spec(bomb))


def test_savedmodel_files_parsed_whole_are_refused_beyond_their_share(members_dir, tmp_path):
    graph = shutil.copytree(members_dir / "c_export", tmp_path / "graph")
    os.truncate(graph / "saved_model.pb", 3 * GIB // 2)  # sparse: no disk, no time
    with pytest.raises(
        FuseError,
        match=r"graph/saved_model\.pb would expand to 1\.5 GiB in memory, over the limit of "
        r"1\.0 GiB for a SavedModel graph \(1/4 of the default, 4\.0 GiB\)" + RAISE,
    ):
        detect_format(_spec(graph))
    assert detect_format(_spec(graph), max_member_bytes=8 * GIB) == "savedmodel"
    fingerprint = shutil.copytree(members_dir / "c_export", tmp_path / "fingerprint")
    os.truncate(fingerprint / "fingerprint.pb", 65 * MIB)
    with pytest.raises(
        FuseError,
        match=r"fingerprint/fingerprint\.pb would expand to 65\.0 MiB in memory, over the limit of "
        r"64\.0 MiB for a model config",
    ):
        detect_format(_spec(fingerprint))
    variables = shutil.copytree(members_dir / "c_export", tmp_path / "variables")
    (data,) = (variables / "variables").glob("variables.data-*")
    os.truncate(data, MIB)
    with pytest.raises(
        FuseError,
        match=r"the files of \S*variables would expand to 1\.\d MiB in memory, over the limit of "
        r"256\.0 KiB for a member \(max_member_bytes\)" + RAISE,
    ):
        detect_format(_spec(variables), max_member_bytes=256 * 2**10)


def test_savedmodel_variables_are_checked_from_the_checkpoint_index(members_dir):
    import tensorflow as tf

    path = members_dir / "c_export"
    limits = limits_lib.Limits(total=1000, config=100, graph=250, given=True)
    with pytest.raises(
        FuseError,
        match=r"the \d+ variables in the checkpoint of \S*c_export \(the largest '.+', [\d.]+ KiB\) "
        r"would expand to [\d.]+ KiB in memory, over the limit of 1000 bytes for a member",
    ):
        limits_lib.check_savedmodel_variables(_spec(path), path, limits, tf)
    limits_lib.check_savedmodel_variables(_spec(path), path, limits_lib.Limits.of(path, None), tf)


@pytest.mark.parametrize("name", ["a.keras", "b.h5", "c_export", "d_tfsave", "multi_c_export"])
def test_real_members_are_within_the_default_limit(members_dir, name):
    assert detect_format(_spec(members_dir / name)) in ("keras", "h5", "savedmodel")


@pytest.mark.parametrize(
    ("text", "size"),
    [("1", 1), ("4096", 4096), ("64K", 64 * 2**10), ("8G", 8 * GIB), ("8 GiB", 8 * GIB),
     ("512mb", 512 * MIB), ("2T", 2 * 2**40)],
)  # fmt: skip
def test_byte_sizes_are_read_with_binary_suffixes(text, size):
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5G", "8X", "G", "8 G B"])
def test_bad_byte_sizes_are_refused_saying_what_is_expected(text):
    with pytest.raises(ValueError, match=r"^Expected a positive number of bytes, optionally with"):
        parse_byte_size(text)


@pytest.mark.parametrize("value", [0, -5, 1.5, "8G", True])
def test_a_bad_max_member_bytes_is_refused(members_dir, value):
    with pytest.raises(
        FuseError, match=r"max_member_bytes must be a positive integer number of bytes or None"
    ):
        load_members(parse_specs([members_dir / "a.keras"]), max_member_bytes=value)
