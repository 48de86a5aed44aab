"""``fuser serve``: TF Serving's REST API over a real uvicorn server, and dynamic batching."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import N_FEATURES

import fuser
import runtime
from runtime.batching import DynamicBatcher
from runtime.server import ServeOptions, create_app

pytest.importorskip("uvicorn")


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(url, payload=None, *, method=None, raw=None):
    """(status, parsed JSON body) of one request, as a TF Serving REST client sends it."""
    data = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def read_metrics(base):
    """``/metrics`` as ``{name: value}``."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=60) as response:
        lines = response.read().decode().splitlines()
    return {
        name: float(value)
        for name, value in (line.split() for line in lines if not line.startswith("#"))
    }


@pytest.fixture(scope="module")
def single(members_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "ensemble.onnx"
    fuser.build([members_dir / "a.keras", members_dir / "b.h5"]).save(path)
    return runtime.load(path)


@pytest.fixture(scope="module")
def multi(members_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_multi") / "multi.onnx"
    fuser.build([members_dir / "multi_a.keras", members_dir / "multi_b.keras"]).save(path)
    return runtime.load(path)


@pytest.fixture(scope="module")
def url(single):
    with running(create_app(single, ServeOptions(name="digits", batch_timeout_ms=1.0))) as base:
        yield base


def test_row_and_columnar_requests_answer_as_the_runtime_does(url, single, features):
    expected = single.predict(features)
    status, body = call(f"{url}/v1/models/digits:predict", {"instances": features.tolist()})
    assert status == 200
    np.testing.assert_allclose(np.array(body["predictions"]), expected, atol=1e-6)
    status, body = call(
        f"{url}/v1/models/digits/versions/1:predict",
        {"signature_name": "serving_default", "inputs": features.tolist()},
    )
    assert status == 200
    np.testing.assert_allclose(np.array(body["outputs"]), expected, atol=1e-6)
    status, body = call(
        f"{url}/v1/models/digits:predict",
        {"instances": [{"features": row} for row in features[:3].tolist()]},
    )
    assert status == 200
    np.testing.assert_allclose(np.array(body["predictions"]), expected[:3], atol=1e-6)


def test_status_metadata_health_and_metrics(url, single):
    status, body = call(f"{url}/v1/models/digits")
    assert status == 200
    assert body["model_version_status"][0]["state"] == "AVAILABLE"
    assert call(f"{url}/v1/models/digits/versions/1")[0] == 200
    status, body = call(f"{url}/v1/models/digits/metadata")
    assert status == 200 and body["model_spec"] == {
        "name": "digits",
        "signature_name": "",
        "version": "1",
    }
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    (name, spec), *_ = signature["inputs"].items()
    assert name == single.inputs[0].name and spec["dtype"] == "DT_FLOAT"
    assert [dim["size"] for dim in spec["tensor_shape"]["dim"]] == ["-1", str(N_FEATURES)]
    assert list(signature["outputs"]) == [spec.name for spec in single.outputs]
    assert call(f"{url}/healthz") == (200, {"status": "ok", "model": "digits"})
    with urllib.request.urlopen(f"{url}/metrics") as response:
        text = response.read().decode()
    assert "fuser_forward_passes_total" in text and "fuser_request_errors_total" in text


def test_several_inputs_and_outputs_in_both_forms(multi):
    rng = np.random.default_rng(3)
    x = {"num": rng.normal(size=(5, 4)).tolist(), "cat": rng.normal(size=(5, 3)).tolist()}
    expected = multi.predict({name: np.array(value) for name, value in x.items()})
    with running(create_app(multi, ServeOptions(name="multi"))) as base:
        status, body = call(f"{base}/v1/models/multi:predict", {"inputs": x})
        assert status == 200 and set(body["outputs"]) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(np.array(body["outputs"][name]), value, atol=1e-6)
        rows = [{"num": x["num"][i], "cat": x["cat"][i]} for i in range(5)]
        status, body = call(f"{base}/v1/models/multi:predict", {"instances": rows})
        assert status == 200 and len(body["predictions"]) == 5
        for name, value in expected.items():
            got = np.array([row[name] for row in body["predictions"]])
            np.testing.assert_allclose(got, value, atol=1e-6)
        status, body = call(f"{base}/v1/models/multi:predict", {"instances": x["num"]})
        assert (
            status == 400
            and "every instance must be an object keyed by input name" in body["error"]
        )


BAD_REQUESTS = [
    pytest.param("/v1/models/digits:predict", b"{not json", 400, "not valid JSON", id="malformed"),
    pytest.param("/v1/models/digits:predict", b"[1, 2]", 400, "must be a JSON object", id="array"),
    pytest.param("/v1/models/digits:predict", b"{}", 400, 'exactly one of "instances"', id="empty"),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": [[1.0, 2.0]]}).encode(),
        400,
        r"expects shape (None, 20), received (1, 2)",
        id="shape",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": [["a"] * N_FEATURES]}).encode(),
        400,
        "expects numbers",
        id="strings",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": [[1.0] * N_FEATURES, [1.0]]}).encode(),
        400,
        "could not be read as an array",
        id="ragged",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": []}).encode(),
        400,
        "non-empty list",
        id="no-rows",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"inputs": [[0.0] * N_FEATURES], "signature_name": "other"}).encode(),
        400,
        "'other' not found",
        id="signature",
    ),
    pytest.param(
        "/v1/models/other:predict",
        json.dumps({"instances": [[0.0] * N_FEATURES]}).encode(),
        404,
        "Servable not found for request: Latest(other)",
        id="unknown-model",
    ),
    pytest.param(
        "/v1/models/digits/versions/7:predict",
        json.dumps({"instances": [[0.0] * N_FEATURES]}).encode(),
        404,
        "Specific(digits, 7)",
        id="unknown-version",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": [[0.0] * N_FEATURES] * 40000}).encode(),
        400,
        "this server takes at most",
        id="body-too-large",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        "nests JSON arrays or objects too deeply",
        id="deeply-nested",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        b'{"instances": ' + b"[" * 100000,
        400,
        "nests JSON arrays or objects too deeply",
        id="deeply-nested-unclosed",
    ),
    pytest.param("/v1/models/digits:predict", b"", 400, "body is empty", id="empty-body"),
    pytest.param("/v1/models/digits:predict", b" \r\n ", 400, "body is empty", id="blank-body"),
    pytest.param(
        "/v1/models/digits:predict", b'{"instances": [[\xff]]}', 400, "not UTF-8", id="not-utf8"
    ),
    pytest.param("/v1/models/digits:predict", b"3", 400, "not a number", id="number-body"),
    pytest.param(
        "/v1/models/digits:predict",
        b'{"instances": [[0.0]]} x',
        400,
        "not valid JSON: Extra data",
        id="trailing-data",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        b'{"instances": [[' + b"1" * 5000 + b"]]}",
        400,
        "not valid JSON: Exceeds the limit",
        id="too-many-digits",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        ('{"instances": [[1e999, ' + ", ".join(["0"] * (N_FEATURES - 1)) + "]]}").encode(),
        400,
        "holds the number 1e999, beyond the range of 64-bit floats",
        id="beyond-float64",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        ('{"instances": [[-1e39, ' + ", ".join(["0"] * (N_FEATURES - 1)) + "]]}").encode(),
        400,
        "but -1e+39 is beyond float32's largest magnitude 3.4028235e+38",
        id="beyond-float32",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": [[10**30] * N_FEATURES]}).encode(),
        400,
        "expects numbers (float32), received an array of dtype object",
        id="huge-integers",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": [[None] * N_FEATURES]}).encode(),
        400,
        "expects numbers (float32)",
        id="nulls",
    ),
    pytest.param(
        "/v1/models/digits:predict",
        json.dumps({"instances": "rows"}).encode(),
        400,
        "non-empty list",
        id="string-instances",
    ),
    pytest.param("/nowhere", b"{}", 404, "No endpoint POST /nowhere", id="unknown-path"),
    pytest.param("/healthz", b"{}", 405, "/healthz answers GET, HEAD only", id="wrong-method"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_an_error_body_and_the_server_keeps_serving(
    single, path, body, status, message, features
):
    options = ServeOptions(name="digits", max_body_bytes=2**20)
    with running(create_app(single, options)) as base:
        got_status, got = call(f"{base}{path}", raw=body, method="POST")
        assert got_status == status and set(got) == {"error"}
        assert message in got["error"], got["error"]
        good_status, good = call(
            f"{base}/v1/models/digits:predict", {"instances": [features[0].tolist()]}
        )
        assert good_status == 200
        np.testing.assert_allclose(good["predictions"], single.predict(features[:1]), atol=1e-6)
        metrics = read_metrics(base)
    # Counted: one error, and the bad request among the predict requests if it reached one.
    assert metrics["fuser_request_errors_total"] == 1
    assert metrics["fuser_predict_requests_total"] == (2 if status == 400 else 1)


def test_any_content_type_and_the_nan_and_infinity_literals_are_accepted(url, single, features):
    """As TF Serving: the body is JSON whatever its Content-Type (``curl -d`` sends a form
    type), and ``NaN``/``Infinity`` are read as the numbers they name."""
    expected = single.predict(features)
    body = json.dumps({"instances": features.tolist()}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        request = urllib.request.Request(f"{url}/v1/models/digits:predict", data=body)
        request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        np.testing.assert_allclose(np.array(answer["predictions"]), expected, atol=1e-6)
    rows = features[:3].tolist()
    text = json.dumps({"instances": rows}).replace(str(rows[0][0]), "NaN", 1)
    text = text.replace(str(rows[1][0]), "-Infinity", 1)
    status, answer = call(f"{url}/v1/models/digits:predict", raw=text.encode(), method="POST")
    assert status == 200
    predictions = np.array(answer["predictions"], dtype=float)
    assert not np.isfinite(predictions[0]).all()
    np.testing.assert_allclose(predictions[2], expected[2], atol=1e-6)


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (10 s at most)."""
    connection.settimeout(10)
    received = b""
    while True:
        try:
            data = connection.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def test_a_chunked_body_over_the_limit_is_refused_as_it_crosses_the_limit(single):
    """No Content-Length: the server stops reading at the limit, answers and closes,
    rather than wait for the end of a body that may never come."""
    limit = 2**16
    with running(create_app(single, ServeOptions(name="digits", max_body_bytes=limit))) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(
                b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"[" * 4096
            for _ in range(limit // len(chunk)):
                connection.sendall(b"1000\r\n" + chunk + b"\r\n")
            connection.sendall(b"1\r\n[\r\n")  # one byte over; the final chunk never comes
            answer = read_until_closed(connection)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"connection: close" in head.lower()
        assert json.loads(body) == {
            "error": f"The request body has more than {limit} bytes; this server takes at "
            f"most {limit}, and closes the connection."
        }
        assert read_metrics(base)["fuser_request_errors_total"] == 1


def test_sixty_four_concurrent_callers_each_get_their_own_rows(single):
    """Every caller sends different rows (1 to 3) and must get exactly its own answer."""
    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(1 + i % 3, N_FEATURES)).astype(np.float32) for i in range(64)]
    expected = [single.predict(batch) for batch in batches]
    options = ServeOptions(name="digits", max_batch_size=32, batch_timeout_ms=20.0)
    app = create_app(single, options)
    results: list = [None] * 64
    start = threading.Barrier(64)

    def caller(index: int, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"instances": batches[index].tolist()})
        start.wait()
        for _ in range(5):
            connection.request(
                "POST", "/v1/models/digits:predict", body, {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            results[index] = (response.status, json.loads(response.read()))
            assert results[index][0] == 200
            np.testing.assert_allclose(
                np.array(results[index][1]["predictions"]), expected[index], atol=1e-6
            )
        connection.close()

    with running(app) as base:
        port = int(base.rsplit(":", 1)[1])
        threads = [threading.Thread(target=caller, args=(i, port)) for i in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with urllib.request.urlopen(f"{base}/metrics") as response:
            metrics = dict(
                line.split()
                for line in response.read().decode().splitlines()
                if not line.startswith("#")
            )
    for index in range(64):
        status, body = results[index]
        assert status == 200
        np.testing.assert_allclose(np.array(body["predictions"]), expected[index], atol=1e-6)
    assert int(metrics["fuser_batched_requests_total"]) == 64 * 5
    assert int(metrics["fuser_batched_rows_total"]) == 5 * sum(len(batch) for batch in batches)
    # Coalesced: fewer forward passes than requests, none above the maximum batch size.
    assert int(metrics["fuser_forward_passes_total"]) < 64 * 5
    assert 1 < int(metrics["fuser_largest_batch_rows"]) <= 32


def test_batcher_respects_the_maximum_and_splits_oversized_requests():
    seen: list[int] = []
    release = threading.Event()

    def run(feeds):
        release.wait()
        seen.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}

    batcher = DynamicBatcher(run, max_batch_size=4, timeout=0.05)
    sizes = [1, 2, 3, 1, 9, 2, 1]
    inputs = [np.arange(size, dtype=float)[:, None] + 10 * i for i, size in enumerate(sizes)]
    futures = [batcher.submit({"x": x}) for x in inputs]
    release.set()
    for x, future in zip(inputs, futures):
        np.testing.assert_array_equal(future.result(timeout=30)["y"], x * 2)
    batcher.close()
    assert sum(seen) == sum(sizes)
    assert max(seen) <= 4  # the 9-row request ran in parts
    assert len(seen) < len(sizes) + 2  # and the small ones were still coalesced


def test_a_request_arriving_during_a_large_one_runs_between_its_parts():
    order: list[tuple[str, int]] = []
    large_started, small_submitted = threading.Event(), threading.Event()

    def run(feeds):
        x = feeds["x"]
        kind = "large" if x[0, 0] >= 100 else "small"
        if kind == "large" and not large_started.is_set():
            large_started.set()
            small_submitted.wait(timeout=30)
        order.append((kind, len(x)))
        return {"y": x * 2}

    batcher = DynamicBatcher(run, max_batch_size=4, timeout=0.0)
    rows = 100 + np.arange(12.0)[:, None]
    large = batcher.submit({"x": rows})
    assert large_started.wait(timeout=30)
    small = batcher.submit({"x": np.ones((1, 1))})
    small_submitted.set()
    np.testing.assert_array_equal(small.result(timeout=30)["y"], [[2.0]])
    np.testing.assert_array_equal(large.result(timeout=30)["y"], rows * 2)
    batcher.close()
    assert order == [("large", 4), ("small", 1), ("large", 4), ("large", 4)]
    assert batcher.stats.requests == 2 and batcher.stats.rows == 13


def test_a_failing_forward_pass_fails_its_callers_and_the_batcher_goes_on():
    calls = {"count": 0}

    def run(feeds):
        calls["count"] += 1
        if calls["count"] == 1:
            raise RuntimeError("broken once")
        return {"y": feeds["x"] + 1}

    batcher = DynamicBatcher(run, max_batch_size=8, timeout=0.0)
    with pytest.raises(RuntimeError, match="broken once"):
        batcher.submit({"x": np.zeros((1, 1))}).result(timeout=30)
    np.testing.assert_array_equal(
        batcher.submit({"x": np.zeros((2, 1))}).result(timeout=30)["y"], 1
    )
    batcher.close()


def test_batcher_joins_only_requests_whose_shapes_match():
    """Sequences of different lengths cannot be concatenated: each length gets its own
    forward passes, and every caller its own answer."""
    shapes: list[tuple[int, ...]] = []
    release = threading.Event()

    def run(feeds):
        release.wait()
        shapes.append(feeds["x"].shape)
        return {"y": feeds["x"].sum(axis=(1, 2))[:, None]}

    batcher = DynamicBatcher(run, max_batch_size=16, timeout=0.2)
    lengths = [3, 1, 2, 1, 2, 3, 1]
    inputs = [np.full((1 + i % 2, length, 4), float(i)) for i, length in enumerate(lengths)]
    futures = [batcher.submit({"x": x}) for x in inputs]
    release.set()
    for x, future in zip(inputs, futures):
        np.testing.assert_array_equal(future.result(timeout=30)["y"], x.sum(axis=(1, 2))[:, None])
    batcher.close()
    assert sum(shape[0] for shape in shapes) == sum(len(x) for x in inputs)
    assert len(shapes) < len(inputs)  # requests of one length did share passes
    assert batcher.stats.requests == len(inputs) and batcher.stats.retried_alone == 0


def test_a_failed_coalesced_pass_is_retried_alone_and_only_its_culprit_fails():
    passes: list[int] = []
    release = threading.Event()

    def run(feeds):
        release.wait()
        passes.append(len(feeds["x"]))
        if np.isnan(feeds["x"]).any():
            raise ValueError("This model cannot take NaN.")
        return {"y": feeds["x"] * 2}

    # Four rows fill the batch, so the three requests share the first pass at once.
    batcher = DynamicBatcher(run, max_batch_size=4, timeout=5.0)
    good, bad, other = np.ones((1, 2)), np.full((1, 2), np.nan), np.full((2, 2), 3.0)
    futures = [batcher.submit({"x": x}) for x in (good, bad, other)]
    release.set()
    np.testing.assert_array_equal(futures[0].result(timeout=30)["y"], good * 2)
    with pytest.raises(ValueError, match="cannot take NaN"):
        futures[1].result(timeout=30)
    np.testing.assert_array_equal(futures[2].result(timeout=30)["y"], other * 2)
    batcher.close()
    assert passes == [4, 1, 1, 2]
    assert batcher.stats.retried_alone == 3 and batcher.stats.requests == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_batch_size": 0}, "--max-batch-size must be at least 1"),
        ({"batch_timeout_ms": -1.0}, "--batch-timeout-ms must be a non-negative number"),
        ({"batch_timeout_ms": float("nan")}, "--batch-timeout-ms must be a non-negative number"),
        ({"name": "a/b"}, "The model name must be non-empty"),
        ({"max_body_bytes": 0}, "--max-body-bytes must be positive"),
        ({"request_timeout_s": 0.0}, "--request-timeout-s must be a positive number"),
        ({"request_timeout_s": float("inf")}, "--request-timeout-s must be a positive number"),
        ({"max_connections": 0}, "--max-connections must be at least 1"),
    ],
)
def test_bad_server_options_are_refused(single, changes, message):
    with pytest.raises(ValueError, match=message):
        create_app(single, ServeOptions(**{"name": "digits", **changes}))


def test_without_batching_every_request_runs_alone(single, features):
    with running(create_app(single, ServeOptions(name="digits", batching=False))) as base:
        status, body = call(f"{base}/v1/models/digits:predict", {"instances": features.tolist()})
        assert status == 200
        np.testing.assert_allclose(
            np.array(body["predictions"]), single.predict(features), atol=1e-6
        )
        with urllib.request.urlopen(f"{base}/metrics") as response:
            text = response.read().decode()
    assert "fuser_predict_requests_total 1" in text and "fuser_forward_passes_total" not in text


def test_fuser_serve_command_serves_until_stopped(single, tmp_path, features):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "fuser", "serve", single.source, "--name", "m", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        banner = process.stderr.readline()
        assert f"Serving {single.source} as 'm' on http://127.0.0.1:{port}/v1/models/m" in banner
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = call(
                    f"http://127.0.0.1:{port}/v1/models/m:predict", {"instances": features.tolist()}
                )
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "fuser serve did not answer"
                time.sleep(0.1)
        assert status == 200
        np.testing.assert_allclose(
            np.array(body["predictions"]), single.predict(features), atol=1e-6
        )
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        process.stderr.close()


def test_fuser_serve_refuses_bad_options_with_exit_2(single, capsys):
    from fuser.cli import main

    assert main(["serve", single.source, "--max-batch-size", "0", "--port", "70000"]) == 2
    error = capsys.readouterr().err
    assert "--max-batch-size must be at least 1" in error and "--port must be between" in error
