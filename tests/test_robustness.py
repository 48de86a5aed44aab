"""Robustness of the serving side: fuzzed inputs and manifests, shared threads, flat memory.

Inputs of every rank, dtype and layout are fed to ``FusedModel.predict`` of one small
ONNX artifact: each either answers (then exactly what the float32 copy of the same rows
answers) or raises a ``ValueError``/``TypeError`` with one of the runtime's own messages.
Random text, random JSON and mutated real manifests are fed to ``manifest.loads``: each
is read or refused with ``ManifestError``, nothing else. Sixteen threads share one model;
RSS is measured over 100,000 predictions (``pytest -s`` prints the figures).
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from conftest import N_CLASSES, N_FEATURES
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fuser
import runtime
from runtime import ManifestError, TensorSpec
from runtime import manifest as manifest_lib
from runtime.inputs import prepare_feeds

PATHS = ["a.keras", "b.h5", "c_export"]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every message the runtime raises for a bad input of a one-input model, and for batch_size.
DOCUMENTED_INPUT_ERROR = re.compile(
    r"Input 'features' (could not be read as an array|expects )"
    r"|Expected the one input \['features'\], received keys "
    r"|batch_size must be a positive integer or None"
)


@pytest.fixture(scope="module")
def onnx_path(members_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("robustness") / "x.onnx"
    return fuser.build([members_dir / name for name in PATHS]).save(path)


@pytest.fixture(scope="module")
def model(onnx_path):
    return runtime.load(onnx_path)


@pytest.fixture(scope="module")
def manifest_text(model):
    return json.dumps(model.manifest)


# Inputs -------------------------------------------------------------------------------

NUMERIC_DTYPES = st.one_of(
    hnp.floating_dtypes(),
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
)
DTYPES = st.one_of(
    NUMERIC_DTYPES,
    hnp.complex_number_dtypes(),
    hnp.unicode_string_dtypes(max_len=3),
    hnp.byte_string_dtypes(max_len=3),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
)
SHAPES = st.one_of(
    st.tuples(st.integers(0, 6), st.just(N_FEATURES)),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    st.tuples(st.integers(0, 4), st.sampled_from([N_FEATURES - 1, N_FEATURES + 1])),
    st.tuples(st.integers(0, 3), st.just(N_FEATURES), st.integers(1, 2)),
)
SCALARS = st.one_of(
    st.floats(),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.none(),
    st.complex_numbers(),
    st.text(max_size=3),
    st.binary(max_size=3),
)


def _views(array: np.ndarray):
    """The same values in other memory layouts: steps, Fortran order, transposes."""
    return st.sampled_from(
        [
            array,
            np.asfortranarray(array),
            np.repeat(array, 2, axis=0)[::2] if array.ndim else array,
            np.ascontiguousarray(array.T).T,
            array[::-1].copy()[::-1] if array.ndim else array,
        ]
    )


# Inputs the model can answer: numbers of any width and byte order, (rows, 20), any layout.
ANSWERABLE_SHAPES = st.tuples(st.integers(0, 6), st.just(N_FEATURES))
WELL_FORMED = hnp.arrays(NUMERIC_DTYPES, ANSWERABLE_SHAPES).flatmap(_views)
ARRAYS = st.one_of(
    hnp.arrays(DTYPES, SHAPES).flatmap(_views),
    hnp.arrays(np.dtype(object), SHAPES, elements=SCALARS),
)
ANSWERABLE = st.one_of(
    WELL_FORMED,
    WELL_FORMED.map(lambda array: array.tolist()),
    st.builds(lambda array: {"features": array}, WELL_FORMED),
)
UNANSWERABLE_MOSTLY = st.one_of(
    ARRAYS,
    ARRAYS.map(lambda array: array.tolist()),
    st.builds(lambda array: {"features": array}, ARRAYS),
    # rows of about the right length, some ragged, some holding None, text or huge ints
    st.lists(st.lists(SCALARS, min_size=N_FEATURES - 1, max_size=N_FEATURES + 1), max_size=4),
    st.lists(st.lists(st.floats(width=32), min_size=N_FEATURES, max_size=N_FEATURES)),
    st.recursive(SCALARS, lambda children: st.lists(children, max_size=4), max_leaves=30),
    st.dictionaries(st.text(max_size=9) | st.integers() | st.none(), ARRAYS, max_size=3),
    SCALARS,
)
# half and half (a nested one_of would be flattened into equal odds for every branch)
INPUTS = st.booleans().flatmap(lambda answerable: ANSWERABLE if answerable else UNANSWERABLE_MOSTLY)


def _float32_rows(x) -> np.ndarray:
    """What the caller would pass after casting the same rows to float32 explicitly."""
    rows = x["features"] if isinstance(x, dict) else x
    return np.ascontiguousarray(np.asarray(rows), dtype=np.float32)


@FUZZ
@given(x=INPUTS, batch_size=st.none() | st.integers(-1, 4) | st.sampled_from([True, 1.5]))
@example(x={"features": np.zeros((1, N_FEATURES)), 1: None}, batch_size=None)
@example(x=[[2**64] * N_FEATURES], batch_size=None)
@example(x=np.full((2, N_FEATURES), 1e300), batch_size=None)  # refused: float32 would be inf
@example(x=np.full((2, N_FEATURES), np.inf), batch_size=None)  # answered: inf passes
def test_fuzzed_inputs_answer_like_float32_rows_or_raise_a_documented_error(model, x, batch_size):
    try:
        result = model.predict(x, batch_size=batch_size)
    except (ValueError, TypeError) as error:
        assert type(error) in (ValueError, TypeError), repr(error)
        assert DOCUMENTED_INPUT_ERROR.match(str(error)), repr(error)
        return
    reference = model.predict(_float32_rows(x))
    assert result.shape == (reference.shape[0], N_CLASSES)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, reference, rtol=0, atol=1e-6)


ROWS = st.integers(1, 8).flatmap(
    lambda rows: hnp.arrays(np.float32, (rows, N_FEATURES), elements=st.floats(-10, 10, width=32))
)


@FUZZ
@given(clean=ROWS, data=st.data())
def test_a_nan_or_inf_makes_its_own_row_nan_and_leaves_the_others_unchanged(model, clean, data):
    rows = clean.shape[0]
    bad_rows = data.draw(st.sets(st.integers(0, rows - 1), min_size=1), label="bad rows")
    poisoned = clean.copy()
    for row in bad_rows:
        columns = data.draw(st.sets(st.integers(0, N_FEATURES - 1), min_size=1, max_size=3))
        for column in columns:
            poisoned[row, column] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), "bad")
    expected = model.predict(clean)
    assert np.isfinite(expected).all()
    result = model.predict(poisoned)
    bad = sorted(bad_rows)
    good = [row for row in range(rows) if row not in bad_rows]
    assert np.isnan(result[bad]).all(), result[bad]
    np.testing.assert_array_equal(result[good], expected[good])


LAYOUTS = {
    "float64": lambda rows: rows.astype(np.float64),
    "float64-fortran": lambda rows: np.asfortranarray(rows.astype(np.float64)),
    "fortran": np.asfortranarray,
    "step": lambda rows: np.repeat(rows, 3, axis=0)[::3],
    "negative-step": lambda rows: rows[::-1].copy()[::-1],
    "transposed": lambda rows: np.ascontiguousarray(rows.T).T,
    "column-window": lambda rows: np.pad(rows, ((0, 0), (3, 2)))[:, 3:-2],
    "big-endian": lambda rows: rows.astype(">f4"),
    "broadcast-read-only": lambda rows: np.broadcast_to(rows[:1], rows.shape),
}
FLOAT64_ROWS = st.integers(2, 8).flatmap(
    lambda rows: hnp.arrays(
        np.float64,
        (rows, N_FEATURES),
        elements=st.floats(-1e3, 1e3) | st.sampled_from([np.nan, np.inf, 1e-40, -3e38]),
    )
)


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(FUZZ, max_examples=20)
@given(values=FLOAT64_ROWS)
def test_float64_and_non_contiguous_arrays_answer_like_the_contiguous_float32_copy(
    model, layout, values
):
    rows = values if layout.startswith("float64") else values.astype(np.float32)
    view = LAYOUTS[layout](rows)
    contiguous = np.ascontiguousarray(view, dtype=np.float32)
    # the layout is really one the runtime must convert
    assert not (view.flags.c_contiguous and view.dtype == np.dtype(np.float32))
    expected = model.predict(contiguous)
    np.testing.assert_allclose(model.predict(view), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.predict(view, batch_size=3), expected, rtol=0, atol=1e-6)


INT_SPEC = (TensorSpec("ids", (None, 3), "int32"),)
OUT_OF_RANGE_INTS = [
    pytest.param(np.array([[0, 1, 2**31]], np.int64), r"from 0 to 2147483648", id="int64-high"),
    pytest.param(
        np.array([[0, -(2**31) - 1, 5]], np.int64), r"from -2147483649 to 5", id="int64-low"
    ),
    pytest.param(np.array([[2**31, 0, 0]], np.uint32), r"uint32 values from 0 to", id="uint32"),
    pytest.param(np.array([[2**64 - 1, 0, 0]], np.uint64), r"to 18446744073709551615", id="uint64"),
]


@pytest.mark.parametrize(("x", "pattern"), OUT_OF_RANGE_INTS)
def test_integers_outside_an_int32_input_are_refused_not_wrapped(x, pattern):
    with pytest.raises(
        TypeError, match=r"Input 'ids' expects int32 values in \[-2147483648, 2147483647\], "
    ) as raised:
        prepare_feeds(INT_SPEC, x)
    assert re.search(pattern, str(raised.value))


@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.uint64, np.int8, np.bool_])
def test_integers_inside_an_int32_input_are_cast_exactly(dtype):
    x = np.array([[0, 1, 100], [1, 0, 1]]).astype(dtype)
    feed = prepare_feeds(INT_SPEC, x)["ids"]
    assert feed.dtype == np.int32 and feed.flags.c_contiguous
    np.testing.assert_array_equal(feed, x.astype(np.int32))


FLOAT32_MAX = float(np.finfo(np.float32).max)
# (values, dtype of the model's input, pattern of the refusal)
OVERFLOWING_FLOATS = [
    pytest.param(
        [1e39],
        "float32",
        r"float32 values, at most 3\.4028235e\+38 in magnitude, received float64 values up to 1e\+39",
        id="float64-high",
    ),
    pytest.param(
        [-1e300, np.nan, np.inf],
        "float32",
        r"float64 values up to 1e\+300;",
        id="float64-low-beside-nan-and-inf",
    ),
    pytest.param(
        [FLOAT32_MAX * 1.0001],
        "float32",
        r"float64 values up to 3\.4031637e\+38",
        id="float64-just-above",
    ),
    pytest.param(
        [7e4],
        "float16",
        r"float16 values, at most 65504 in magnitude, received float64 values up to 70000;",
        id="float64-into-float16",
    ),
    pytest.param(
        np.array([-1e5], np.float32),
        "float16",
        r"received float32 values up to 100000;",
        id="float32-into-float16",
    ),
    pytest.param(
        np.array([70_000], np.int32),
        "float16",
        r"received int32 values up to 70000;",
        id="int32-into-float16",
    ),
    pytest.param(
        np.array([65_535], np.uint16),
        "float16",
        r"received uint16 values up to 65535;",
        id="uint16-into-float16",
    ),
]


@pytest.mark.parametrize(("values", "dtype", "pattern"), OVERFLOWING_FLOATS)
def test_finite_values_beyond_the_float_range_are_refused_not_made_inf(values, dtype, pattern):
    x = np.zeros((2, 3), np.asarray(values).dtype)
    x[1, : len(values)] = values
    spec = (TensorSpec("h", (None, 3), dtype),)
    with pytest.raises(TypeError, match=rf"^Input 'h' expects {dtype} values, at most ") as raised:
        prepare_feeds(spec, x)
    assert re.search(pattern, str(raised.value)), str(raised.value)
    assert str(raised.value).endswith("; scale them first, since casting would make them inf.")


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([np.nan, np.inf, -np.inf], "float32"),  # already not finite: passed on
        ([FLOAT32_MAX, -FLOAT32_MAX, 1e-300], "float32"),  # the largest float32, an underflow
        ([FLOAT32_MAX * (1 + 2**-25), 0.0, 0.0], "float32"),  # rounds down to the largest
        ([65_519.0, -65_504.0, np.nan], "float16"),
        (np.array([65_504, -65_504, 7], np.int32), "float16"),
    ],
)
def test_values_the_float_dtype_can_hold_are_cast_as_numpy_casts_them(values, dtype):
    x = np.asarray([values, values])
    with np.errstate(over="raise"):  # nothing here overflows
        expected = x.astype(dtype)
    feed = prepare_feeds((TensorSpec("h", (None, 3), dtype),), x)["h"]
    assert feed.dtype == np.dtype(dtype) and feed.flags.c_contiguous
    np.testing.assert_array_equal(feed, expected)


@FUZZ
@given(
    values=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.just(N_FEATURES)),
        elements=st.floats(allow_nan=True, allow_infinity=True)
        | st.floats(3.3e38, 3.5e38)
        | st.floats(-3.5e38, -3.3e38),
    )
)
def test_float64_rows_are_refused_exactly_when_a_finite_value_would_become_inf(model, values):
    with np.errstate(over="ignore"):
        as_float32 = values.astype(np.float32)
    overflowing = np.isinf(as_float32) & np.isfinite(values)
    if overflowing.any():
        largest = np.abs(values[np.isfinite(values)]).max()
        with pytest.raises(TypeError, match=r"^Input 'features' expects float32 values") as raised:
            model.predict(values)
        assert float(_largest_in(raised.value.args[0])) == pytest.approx(largest, rel=1e-7)
    else:
        np.testing.assert_array_equal(model.predict(values), model.predict(as_float32))


def _largest_in(message: str) -> str:
    return re.search(r"values up to ([^;]+);", message).group(1)


def test_mappings_with_keys_of_mixed_types_are_refused_naming_the_keys(model):
    features = np.zeros((1, N_FEATURES), np.float32)
    with pytest.raises(
        ValueError, match=r"Expected the one input \['features'\], received keys \['features', 1\]"
    ):
        model.predict({"features": features, 1: features})
    two = (TensorSpec("num", (None, 4), "float32"), TensorSpec("cat", (None, 3), "float32"))
    with pytest.raises(ValueError, match=r"missing \['cat'\], unknown \['z', 1, None\]"):
        prepare_feeds(two, {"num": np.zeros((1, 4)), "z": 0, 1: 0, None: 0})


# Manifests ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _mostly(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """``plausible`` five times in six, else any JSON value: most drafts reach deep checks."""
    return st.sampled_from([*[plausible] * 5, JSON_VALUES]).flatmap(lambda chosen: chosen)


SPEC_LIKE = _mostly(
    st.fixed_dictionaries(
        {
            "name": _mostly(st.sampled_from(["x", "y", ""])),
            "shape": _mostly(st.lists(st.none() | st.integers(-1, 30) | st.booleans(), max_size=4)),
            "dtype": _mostly(st.sampled_from(["float32", "int64", ""])),
        }
    )
)
# Every checked key, most with a plausible value, in any order, one sometimes left out.
MANIFEST_LIKE = st.fixed_dictionaries(
    {
        "format": _mostly(st.just(manifest_lib.FORMAT)),
        "format_version": _mostly(st.integers(-1, manifest_lib.FORMAT_VERSION + 1)),
        "members": _mostly(st.just([])),
        "head": _mostly(st.just({"name": "mean"})),
        "inputs": _mostly(st.lists(SPEC_LIKE, min_size=1, max_size=2)),
        "outputs": _mostly(st.lists(SPEC_LIKE, min_size=1, max_size=2)),
        "artifact": _mostly(st.fixed_dictionaries({"format": st.sampled_from(["onnx", "x"])})),
    }
).flatmap(
    lambda manifest: (st.none() | st.sampled_from(list(manifest))).map(
        lambda left_out: {key: value for key, value in manifest.items() if key != left_out}
    )
)


def _read_or_refuse(text: str | bytes) -> dict | None:
    """Read ``text`` as a manifest: a dict whose specs parse, or ``ManifestError``."""
    try:
        data = manifest_lib.loads(text, "x")
    except ManifestError as error:
        assert str(error)
        return None
    assert isinstance(data, dict)
    for key in ("inputs", "outputs"):
        with contextlib.suppress(ManifestError):
            manifest_lib.specs(data, key)
    return data


@FUZZ
@given(text=st.text() | st.binary())
@example(text="")
@example(text=b"\xff\xfe\x00")
@example(text="NaN")
@example(text="1" * 5000)
def test_random_text_is_read_or_refused_with_manifest_error(text):
    _read_or_refuse(text)


@FUZZ
@given(value=JSON_VALUES | MANIFEST_LIKE)
def test_random_json_is_read_or_refused_with_manifest_error(value):
    _read_or_refuse(json.dumps(value))


def _paths(value, prefix=()):
    """The path (keys and indices) of every value inside a JSON document, the root first."""
    yield prefix
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        items = []
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _parent(document, path):
    for key in path[:-1]:
        document = document[key]
    return document


@FUZZ
@given(data=st.data())
def test_mutated_real_manifests_are_read_or_refused_with_manifest_error(manifest_text, data):
    document = json.loads(manifest_text)
    for _ in range(data.draw(st.integers(0, 4), label="structural edits")):
        paths = list(_paths(document))[1:]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = _parent(document, path)
        if data.draw(st.booleans(), label="delete"):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON_VALUES, label="replacement")
    text = json.dumps(document)
    for _ in range(data.draw(st.integers(0, 3), label="character edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        edit = data.draw(st.sampled_from(["flip", "insert", "delete"]), label="edit")
        character = data.draw(st.characters(), label="character")
        if edit == "insert":
            text = text[:at] + character + text[at:]
        elif at < len(text):
            replacement = chr(ord(text[at]) ^ 1) if edit == "flip" else ""
            text = text[:at] + replacement + text[at + 1 :]
    _read_or_refuse(text)


def test_the_real_manifest_is_read_unchanged(manifest_text, model):
    assert _read_or_refuse(manifest_text) == json.loads(manifest_text)
    assert manifest_lib.specs(json.loads(manifest_text), "inputs") == model.inputs


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_refused_with_manifest_error(depth):
    with pytest.raises(
        ManifestError,
        match=r"^The manifest in x is malformed: manifest field (\[0\]){8}… is nested more than "
        r"32 levels deep",
    ):
        manifest_lib.loads("[" * depth + "]" * depth, "x")


@pytest.mark.parametrize("depth", [32, 33, 990, 100_000])
def test_manifests_nest_at_most_32_levels_deep(manifest_text, depth):
    """The root is level 0, ``extra`` level 1; JSON too deep for Python is refused alike."""
    text = manifest_text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    if depth <= 32:
        assert _depth(manifest_lib.loads(text, "x")["extra"]) == depth
        return
    with pytest.raises(
        ManifestError, match=r"manifest field extra(\[0\]){7}… is nested more than 32 levels deep"
    ):
        manifest_lib.loads(text, "x")


def _depth(value) -> int:
    depth = 0
    while isinstance(value, list):
        value, depth = (value[0] if value else None), depth + 1
    return depth


@pytest.mark.parametrize("version", [0, -5, 1.5, None, "2"])
def test_a_format_version_that_is_not_a_positive_integer_is_refused(manifest_text, version):
    data = json.loads(manifest_text)
    data["format_version"] = version
    with pytest.raises(ManifestError, match=r"format version .*expected a positive integer"):
        manifest_lib.loads(json.dumps(data), "x")


# Threads and memory -------------------------------------------------------------------

THREADS, CALLS_PER_THREAD = 16, 10_000


def test_16_threads_sharing_one_model_get_the_serial_answers(model):
    rng = np.random.default_rng(7)
    batches = [
        rng.normal(size=(int(rng.integers(1, 9)), N_FEATURES)).astype(np.float32)
        for _ in range(509)
    ]
    serial = [model.predict(batch) for batch in batches]
    as_float64 = [batch.astype(np.float64) for batch in batches]
    all_started = threading.Barrier(THREADS)

    def work(worker: int) -> int:
        # odd workers pass float64, so conversion runs concurrently as well
        inputs = as_float64 if worker % 2 else batches
        all_started.wait()
        mismatches = 0
        for call in range(CALLS_PER_THREAD):
            index = (worker * 31 + call * (2 * worker + 1)) % len(batches)
            if not np.array_equal(model.predict(inputs[index]), serial[index]):
                mismatches += 1
        return mismatches

    began = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        mismatches = list(pool.map(work, range(THREADS)))
    seconds = time.perf_counter() - began
    calls = THREADS * CALLS_PER_THREAD
    print(
        f"\n{THREADS} threads x {CALLS_PER_THREAD} predictions (batch 1-8): {calls} calls in "
        f"{seconds:.1f} s, {calls / seconds:,.0f} calls/s; mismatches per thread {mismatches}"
    )
    assert mismatches == [0] * THREADS


def test_memory_stays_flat_over_100000_predictions(model):
    rng = np.random.default_rng(8)
    plain = [rng.normal(size=(1 + i % 16, N_FEATURES)).astype(np.float32) for i in range(256)]
    # every input path: contiguous float32, float64 to cast, a strided view to copy
    batches = [
        *plain,
        *(batch.astype(np.float64) for batch in plain[::3]),
        *(np.repeat(batch, 2, axis=0)[::2] for batch in plain[1::3]),
    ]
    wrong = np.zeros((2, N_FEATURES + 1), np.float32)

    def predict_many(calls: int) -> int:
        """``calls`` predictions, and one refused input per ten, whose errors must not pile up."""
        refused = 0
        for call in range(calls):
            model.predict(batches[call % len(batches)])
            if call % 10 == 0:
                try:
                    model.predict(wrong)
                except ValueError:
                    refused += 1
        return refused

    process = psutil.Process()
    predict_many(5_000)
    gc.collect()
    before = process.memory_info().rss
    began = time.perf_counter()
    refused = predict_many(100_000)
    seconds = time.perf_counter() - began
    gc.collect()
    after = process.memory_info().rss
    growth = after - before
    print(
        f"\nRSS after 5,000 warm-up predictions {before / 2**20:.1f} MiB, after 100,000 more "
        f"(batch 1-16, plus {refused:,} refused) {after / 2**20:.1f} MiB: growth "
        f"{growth / 2**20:+.2f} MiB; {100_000 / seconds:,.0f} predictions/s"
    )
    assert refused == 10_000
    assert growth < 20 * 2**20
