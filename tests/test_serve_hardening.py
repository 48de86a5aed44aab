"""``fuser serve`` under attack: slow and excess connections, large bodies, failing passes,
variable-length inputs. Real sockets against a real uvicorn server on an ephemeral port."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import fuser
import runtime
from runtime import server as server_module
from runtime.manifest import TensorSpec
from runtime.server import INLINE_BODY_BYTES, INLINE_OUTPUT_VALUES, ServeOptions, build_server

pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]


class Doubler:
    """A stand-in for a loaded artifact: ``y = 2 x`` on rows of 3 floats.

    ``gate`` (an event) holds every forward pass until it is set; a row holding NaN makes
    the pass fail, as a model might on inputs it cannot take.
    """

    inputs = (TensorSpec("x", (None, 3), "float32"),)
    outputs = (TensorSpec("y", (None, 3), "float32"),)

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.passes = 0  # forward passes begun

    def predict(self, feeds, as_dict=False):
        self.passes += 1
        if self.gate is not None:
            self.gate.wait(timeout=60)
        x = feeds["x"]
        if np.isnan(x).any():
            raise ValueError("This model cannot take NaN.")
        return {"y": x * 2}


@contextlib.contextmanager
def serving(model, options):
    """Run ``build_server`` (what ``fuser serve`` runs) on a free port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = build_server(model, options, log_level="critical")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(port, path, payload=None, *, timeout=10.0):
    """(status, parsed JSON body); ``timeout`` is how long a hang may last before failing."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {
        name: float(value)
        for name, value in (line.split() for line in lines if not line.startswith("#"))
    }


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within 30 s"
        time.sleep(0.01)


def read_until_closed(connection: socket.socket, timeout: float = 10.0) -> bytes:
    """What the server sends until it closes the connection; fails if it never does."""
    connection.settimeout(timeout)
    received = b""
    while True:
        try:
            data = connection.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for {timeout} s")
        if not data:
            return received
        received += data


def read_response(connection: socket.socket) -> bytes:
    """One whole response (with a Content-Length) from a keep-alive connection."""
    connection.settimeout(10)
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_by_server(connection: socket.socket) -> bool:
    """For a readable connection: whether the server closed it (end of file or reset)."""
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True


def split_response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


PREDICT = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: test\r\n"
ROW = {"instances": [[1.0, 2.0, 3.0]]}


@pytest.mark.parametrize(
    ("unfinished", "status"),
    [
        pytest.param(PREDICT, 408, id="headers-never-finished"),
        pytest.param(
            PREDICT + b"Content-Length: 100\r\n\r\n" + b'{"instances": [[1',
            408,
            id="body-never-finished",
        ),
        pytest.param(b"", None, id="nothing-sent"),
    ],
)
def test_a_request_not_complete_within_the_deadline_is_cut_off(unfinished, status):
    """First a whole request (the deadline starts again after each answer), then one that
    never completes: the server answers 408 if it had begun, and closes the connection."""
    options = ServeOptions(name="m", request_timeout_s=0.5)
    with serving(Doubler(), options) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(PREDICT + b"Content-Length: 2\r\n\r\n{}")  # a bad request: fast
            assert read_response(connection).startswith(b"HTTP/1.1 400")
            connection.sendall(unfinished)
            answer = read_until_closed(connection)
        if status is None:
            assert answer == b""
        else:
            assert split_response(answer) == (
                status,
                {
                    "error": "The request was not complete within 0.5 s (--request-timeout-s); "
                    "the connection is closed."
                },
            )
        assert metrics(port)["fuser_connections_timed_out_total"] == 1


def test_trickling_headers_does_not_extend_the_deadline():
    options = ServeOptions(name="m", request_timeout_s=0.5)
    with (
        serving(Doubler(), options) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as connection,
    ):
        closed_early = False
        for byte in PREDICT + b"X-Padding: " + b"a" * 200:  # 20 s at one byte per 0.1 s
            try:
                connection.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_early = True
                break
            if select.select([connection], [], [], 0.1)[0]:
                closed_early = True
                break
        assert closed_early, "the server waited for headers sent one byte at a time"
        assert read_until_closed(connection).startswith(b"HTTP/1.1 408")


def test_the_time_the_model_takes_does_not_count_against_the_deadline():
    gate = threading.Event()
    options = ServeOptions(name="m", request_timeout_s=0.3)
    with serving(Doubler(gate), options) as port:
        threading.Timer(1.0, gate.set).start()  # the model answers after the deadline
        assert call(port, "/v1/models/m:predict", ROW) == (200, {"predictions": [[2, 4, 6]]})


def test_healthz_answers_while_hundreds_of_slow_connections_are_open():
    """Beyond the cap each new connection displaces the one that waited longest for its
    request, so slow connections never hold more than ``max_connections`` descriptors."""
    options = ServeOptions(name="m", max_connections=32, request_timeout_s=60)
    with serving(Doubler(), options) as port:
        slow = []
        try:
            for _ in range(300):
                connection = socket.create_connection(("127.0.0.1", port), timeout=10)
                connection.sendall(PREDICT)
                slow.append(connection)
            assert call(port, "/healthz") == (200, {"status": "ok", "model": "m"})
            assert call(port, "/v1/models/m:predict", ROW)[0] == 200
            counts = metrics(port)
            # The server closed the displaced connections: they read end-of-file.
            deadline, closed = time.monotonic() + 10, set()
            while len(closed) < 300 - 32 and time.monotonic() < deadline:
                readable, _, _ = select.select([c for c in slow if c not in closed], [], [], 1)
                closed.update(c for c in readable if closed_by_server(c))
        finally:
            for connection in slow:
                connection.close()
    assert counts["fuser_open_connections"] <= 32
    assert counts["fuser_connections_evicted_total"] >= 300 - 32
    assert len(closed) >= 300 - 32


def test_a_connection_beyond_the_cap_is_refused_when_every_connection_is_busy():
    gate = threading.Event()
    model = Doubler(gate)
    options = ServeOptions(name="m", max_connections=2, batching=False)
    with serving(model, options) as port:
        answers: list = []
        busy = [
            threading.Thread(target=lambda: answers.append(call(port, "/v1/models/m:predict", ROW)))
            for _ in range(2)
        ]
        for thread in busy:
            thread.start()
        wait_for(lambda: model.passes == 2, "both requests reaching the model")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            status, body = split_response(read_until_closed(connection))
        gate.set()
        for thread in busy:
            thread.join(timeout=30)
    assert status == 503 and "--max-connections" in body["error"]
    assert answers == [(200, {"predictions": [[2, 4, 6]]})] * 2


def test_a_malformed_request_gets_a_json_400_and_is_counted():
    with serving(Doubler(), ServeOptions(name="m")) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            status, body = split_response(read_until_closed(connection))
        assert status == 400 and body["error"].startswith("The request is not valid HTTP/1.1")
        assert metrics(port)["fuser_malformed_requests_total"] == 1


@pytest.mark.parametrize("stage", ["parse_predict", "format_outputs"])
def test_a_small_request_is_answered_while_a_large_one_is_decoded_or_encoded(monkeypatch, stage):
    """The large request's JSON work is held mid-way; the small one must not wait for it
    (it would, were that work done on the event loop)."""
    rows = np.arange(3 * 8000, dtype=np.float32).reshape(8000, 3)
    large = {"instances": rows.tolist()}
    # Well over what the server handles on the event loop itself.
    assert len(json.dumps(large)) > 2 * INLINE_BODY_BYTES and rows.size > INLINE_OUTPUT_VALUES
    held, release = threading.Event(), threading.Event()
    original = getattr(server_module, stage)

    def hold_if_large(*arguments):
        data = arguments[0]
        size = len(data) if stage == "parse_predict" else sum(v.size for v in data.values())
        if size >= (2 * INLINE_BODY_BYTES if stage == "parse_predict" else rows.size):
            held.set()
            release.wait(timeout=60)
        return original(*arguments)

    monkeypatch.setattr(server_module, stage, hold_if_large)
    results: list = []
    with serving(Doubler(), ServeOptions(name="m")) as port:
        sender = threading.Thread(
            target=lambda: results.append(call(port, "/v1/models/m:predict", large, timeout=60))
        )
        sender.start()
        try:
            assert held.wait(timeout=30)
            assert call(port, "/v1/models/m:predict", ROW) == (200, {"predictions": [[2, 4, 6]]})
            assert call(port, "/healthz")[0] == 200
        finally:
            release.set()
            sender.join(timeout=60)
    status, body = results[0]
    assert status == 200
    np.testing.assert_array_equal(np.array(body["predictions"]), rows * 2)


def test_a_request_that_breaks_the_model_fails_alone_and_is_counted():
    """Requests coalesced with a failing one are retried on their own and answered; the
    culprit gets its own 500, with the model's message."""
    gate = threading.Event()
    model = Doubler(gate)
    options = ServeOptions(name="m", max_batch_size=64, batch_timeout_ms=200.0)
    bodies = [{"instances": [[float(i), 1.0, 2.0]]} for i in range(5)]
    bodies[2] = {"instances": [[float("nan"), 1.0, 2.0]]}
    with serving(model, options) as port:
        answers: list = [None] * len(bodies)

        def send(index):
            answers[index] = call(port, "/v1/models/m:predict", bodies[index], timeout=60)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        # The first holds the model; the four others, the culprit among them, queue behind it
        # and then share one pass.
        threads[0].start()
        wait_for(lambda: model.passes == 1, "the first request reaching the model")
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: metrics(port)["fuser_predict_requests_total"] == 5, "all five arriving")
        time.sleep(0.2)  # from arrival to the batcher's queue is a few microseconds
        gate.set()
        for thread in threads:
            thread.join(timeout=60)
        counts = metrics(port)
    for index, (status, body) in enumerate(answers):
        if index == 2:
            assert status == 500 and "ValueError: This model cannot take NaN." in body["error"]
        else:
            assert (status, body) == (200, {"predictions": [[2.0 * index, 2.0, 4.0]]})
    assert counts["fuser_request_errors_total"] == 1
    assert counts["fuser_predict_requests_total"] == 5
    assert counts["fuser_requests_retried_alone_total"] >= 2


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    """A fused artifact of two members over variable-length sequences, ``(None, None, 4)``."""
    import keras

    root = tmp_path_factory.mktemp("sequences")
    paths = []
    for seed in (21, 22):
        keras.utils.set_random_seed(seed)
        steps = keras.Input((None, 4), name="steps")
        hidden = keras.layers.Dense(8, activation="tanh")(steps)
        pooled = keras.layers.GlobalAveragePooling1D()(hidden)
        paths.append(root / f"sequence_{seed}.keras")
        keras.Model(steps, keras.layers.Dense(3)(pooled)).save(paths[-1])
    return runtime.load(fuser.build(paths).save(root / "sequences.onnx"))


def test_concurrent_sequences_of_different_lengths_each_get_their_own_answer(sequences):
    assert sequences.inputs[0].shape == (None, None, 4)
    rng = np.random.default_rng(5)
    inputs = [rng.normal(size=(1 + i % 2, 1 + i % 4, 4)).astype(np.float32) for i in range(24)]
    expected = [sequences.predict(x) for x in inputs]
    answers: list = [None] * len(inputs)
    start = threading.Barrier(len(inputs))
    options = ServeOptions(name="seq", batch_timeout_ms=50.0)
    with serving(sequences, options) as port:

        def send(index):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = json.dumps({"instances": inputs[index].tolist()})
            start.wait()
            connection.request("POST", "/v1/models/seq:predict", body)
            response = connection.getresponse()
            answers[index] = (response.status, json.loads(response.read()))
            connection.close()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        counts = metrics(port)
    for (status, body), want in zip(answers, expected):
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["predictions"]), want, atol=1e-5)
    assert counts["fuser_request_errors_total"] == 0
    assert counts["fuser_batched_requests_total"] == len(inputs)


SLOW_SERVER = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from runtime.manifest import TensorSpec
    from runtime.server import ServeOptions, run

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    class Doubler:
        inputs = (TensorSpec("x", (None, 3), "float32"),)
        outputs = (TensorSpec("y", (None, 3), "float32"),)

        def predict(self, feeds, as_dict=False):
            return {"y": feeds["x"] * 2}

    options = ServeOptions(name="m", max_connections=50, request_timeout_s=60)
    run(Doubler(), options, port=int(sys.argv[1]), log_level="critical")
    """
)


def test_a_server_with_256_file_descriptors_outlives_400_slow_connections():
    """The attack as reported: more slow connections than the process may open files.
    Without the cap the server could accept no connection at all, /healthz included."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    slow = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert call(port, "/healthz")[0] == 200
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and process.poll() is None, "no server"
                time.sleep(0.1)
        for _ in range(400):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(PREDICT)
            slow.append(connection)
        assert call(port, "/healthz") == (200, {"status": "ok", "model": "m"})
        assert call(port, "/v1/models/m:predict", ROW) == (200, {"predictions": [[2, 4, 6]]})
        assert metrics(port)["fuser_open_connections"] <= 50
    finally:
        for connection in slow:
            connection.close()
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ((100, 300), None),
        ((100, 500), "needs about 704 open files, but this process may open at most 500"),
    ],
)
def test_the_open_file_limit_is_raised_for_the_connection_cap_or_refused(
    monkeypatch, limits, message
):
    import resource

    raised: list = []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: limits)
    monkeypatch.setattr(resource, "setrlimit", lambda kind, value: raised.append(value))
    max_connections = 512 if message else 100
    if message:
        with pytest.raises(ValueError, match=message):
            server_module.ensure_descriptors(max_connections)
        assert raised == []
    else:
        server_module.ensure_descriptors(max_connections)
        needed = 100 + server_module.LISTEN_BACKLOG + server_module.RESERVED_DESCRIPTORS
        assert raised == [(needed, 300)]
