"""``fuser serve`` under load: dynamic batching, and small requests beside large ones.

``python -m benchmarks.serve [--seconds 20] [--clients 32] [--contention-seconds 15]
[--large-mib 32] [--large-clients 2] [--small-rate 50] [--scenarios throughput,contention]
[--out DIR]`` builds a fused artifact of 8 of the suite's MLPs and runs two scenarios:

- **throughput**: ``fuser serve`` on loopback twice (with dynamic batching, then
  ``--no-batching``), each driven by ``--clients`` concurrent clients for ``--seconds``:
  every client holds one keep-alive connection and sends TF Serving row-format requests of
  one row, one after another. Reports requests per second and p50/p99 latency.
- **contention**: one server with dynamic batching; one-row requests sent at a fixed rate
  (``--small-rate`` per second, open loop: latency counts from the moment a request was
  due, so a stalled server cannot hide its stall by delaying the next request), for
  ``--contention-seconds`` alone, then as long again while ``--large-clients`` clients
  send requests of ``--large-mib`` MiB back to back. Reports p50/p99/max latency of the
  small requests in both phases, side by side, and what the large requests took.

The load generators are separate processes (asyncio, raw HTTP/1.1), so that they do not
share the server's interpreter. Results go to ``DIR/serve.json`` and ``DIR/SERVE.md``.
Everything runs on this machine's cores, clients and server together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fusion import write_members
from benchmarks.machine import describe_machine
from benchmarks.members import workdir_or_temporary

MEMBERS = 8


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    """The body of one HTTP/1.1 response with a Content-Length; raises unless it is 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"server answered {head.splitlines()[0]!r}")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


def _request(body: bytes) -> bytes:
    return (
        f"POST /v1/models/ensemble:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _client(port: int, body: bytes, stop_at: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = _request(body)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            await _read_response(reader)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


def _percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies) * 1000
    return {
        "latency_ms_p50": round(float(np.percentile(values, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(values, 99)), 3),
        "latency_ms_max": round(float(values.max()), 3),
    }


async def _load(port: int, clients: int, seconds: float, body: bytes) -> dict[str, float]:
    latencies: list[float] = []
    warm_until = time.perf_counter() + 1.0
    await asyncio.gather(*(_client(port, body, warm_until, []) for _ in range(clients)))
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_client(port, body, stop_at, latencies) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    percentiles = _percentiles(latencies)
    return {
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "latency_ms_p50": percentiles["latency_ms_p50"],
        "latency_ms_p99": percentiles["latency_ms_p99"],
    }


async def _open_loop(port: int, body: bytes, rate: float, seconds: float) -> dict[str, float]:
    """One request every ``1 / rate`` s, each on an idle keep-alive connection or a new one;
    latency from the moment the request was due."""
    request = _request(body)
    # Idle keep-alive connections with the time each was last used, newest last. One idle
    # for a second or more is dropped: the server closes idle ones after a few seconds, and
    # a request sent as it does would fail.
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    opened: list[asyncio.StreamWriter] = []
    latencies: list[float] = []

    async def one(due: float) -> None:
        while idle and time.perf_counter() - idle[0][2] >= 1.0:
            idle.pop(0)[1].close()
        if idle:
            reader, writer, _ = idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append(writer)
        writer.write(request)
        await writer.drain()
        await _read_response(reader)
        latencies.append(time.perf_counter() - due)
        idle.append((reader, writer, time.perf_counter()))

    started = time.perf_counter()
    tasks = []
    for index in range(int(rate * seconds)):
        due = started + index / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    for writer in opened:
        writer.close()
    return {"requests": len(latencies), "connections": len(opened), **_percentiles(latencies)}


async def _send_large(port: int, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` connections sending ``body`` back to back for ``seconds``."""
    latencies: list[float] = []
    print("sending", flush=True)  # the caller starts its measurement now
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(_client(port, body, stop_at, latencies) for _ in range(clients)))
    return {"requests": len(latencies), **_percentiles(latencies)}


def _one_row_body() -> bytes:
    row = np.random.default_rng(0).normal(size=20).round(4).tolist()
    return json.dumps({"instances": [row]}).encode()


def large_body(mib: float) -> bytes:
    """A row-format request of about ``mib`` MiB: rows of 20 numbers with 4 decimals."""
    rng = np.random.default_rng(1)
    sample = json.dumps(rng.normal(size=(100, 20)).round(4).tolist())
    rows = max(1, int(mib * 2**20 / (len(sample) / 100)))
    return json.dumps({"instances": rng.normal(size=(rows, 20)).round(4).tolist()}).encode()


def load_generator(argv: list[str]) -> None:
    """Entry point of a client process; prints one JSON line.

    ``PORT CLIENTS SECONDS`` (closed loop), ``--small PORT RATE SECONDS`` (open loop), or
    ``--large PORT MIB CLIENTS SECONDS`` (prints ``sending`` once its body is ready).
    """
    if argv[0] == "--small":
        port, rate, seconds = int(argv[1]), float(argv[2]), float(argv[3])
        result = asyncio.run(_open_loop(port, _one_row_body(), rate, seconds))
    elif argv[0] == "--large":
        port, mib, clients, seconds = int(argv[1]), float(argv[2]), int(argv[3]), float(argv[4])
        body = large_body(mib)
        result = {"body_mib": round(len(body) / 2**20, 1)}
        result.update(asyncio.run(_send_large(port, body, clients, seconds)))
    else:
        port, clients, seconds = int(argv[0]), int(argv[1]), float(argv[2])
        result = asyncio.run(_load(port, clients, seconds, _one_row_body()))
    print(json.dumps(result), flush=True)


def _generator(*arguments: Any) -> list[str]:
    return [sys.executable, "-m", "benchmarks.serve", "--load-generator", *map(str, arguments)]


def _generate(arguments: list[str], timeout: float) -> str:
    """Run a load generator to its end; its JSON line, or its error if it failed."""
    completed = subprocess.run(arguments, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"The load generator failed:\n{completed.stderr[-2000:]}")
    return completed.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(artifact: Path, port: int, extra: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "fuser", "serve", str(artifact), "--port", str(port), *extra],
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("fuser serve did not start") from None
            time.sleep(0.1)


BATCHING = ["--max-batch-size", "64", "--batch-timeout-ms", "1"]
SCENARIOS = ("throughput", "contention")


def run(
    out: Path,
    workdir: Path,
    *,
    seconds: float,
    clients: int,
    scenarios: tuple[str, ...] = SCENARIOS,
    contention_seconds: float | None = None,
    large_mib: float = 32.0,
    large_clients: int = 2,
    small_rate: float = 50.0,
) -> dict[str, Any]:
    """Run ``scenarios`` (``contention_seconds`` defaults to ``seconds``); write the results.

    Raises:
        ValueError: an unknown scenario.
    """
    import fuser

    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        raise ValueError(f"Unknown scenarios {unknown}; choose among {list(SCENARIOS)}.")
    members = write_members("mlp", MEMBERS, workdir / "mlp")
    artifact = fuser.build(members).save(workdir / "ensemble.onnx", force=True)
    results: dict[str, Any] = {"machine": describe_machine(), "members": MEMBERS}
    if "throughput" in scenarios:
        results.update(_throughput(artifact, seconds=seconds, clients=clients))
    if "contention" in scenarios:
        results["contention"] = _contention(
            artifact,
            seconds=seconds if contention_seconds is None else contention_seconds,
            large_mib=large_mib,
            large_clients=large_clients,
            small_rate=small_rate,
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "SERVE.md").write_text(report(results))
    return results


def _throughput(artifact: Path, *, seconds: float, clients: int) -> dict[str, Any]:
    rows = []
    for label, extra in (("dynamic batching", BATCHING), ("no batching", ["--no-batching"])):
        port = _free_port()
        server = _serve(artifact, port, extra)
        try:
            generated = _generate(_generator(port, clients, seconds), timeout=seconds + 120)
            metrics = _metrics(port)
        finally:
            server.terminate()
            server.wait(timeout=30)
        row = {"server": label, "options": " ".join(extra), **json.loads(generated)}
        if "fuser_forward_passes_total" in metrics:
            passes = int(metrics["fuser_forward_passes_total"])
            row["rows_per_forward_pass"] = round(
                int(metrics["fuser_batched_rows_total"]) / passes, 2
            )
        print(f"{label}: {row}", flush=True)
        rows.append(row)
    batched, alone = rows
    return {
        "clients": clients,
        "seconds": seconds,
        "rows": rows,
        "throughput_ratio": round(batched["requests_per_second"] / alone["requests_per_second"], 2),
    }


def _contention(
    artifact: Path, *, seconds: float, large_mib: float, large_clients: int, small_rate: float
) -> dict[str, Any]:
    port = _free_port()
    server = _serve(artifact, port, BATCHING)
    small = _generator("--small", port, small_rate, seconds)
    try:
        _generate(_generator("--small", port, small_rate, 1.0), timeout=120)  # warm-up
        alone = _generate(small, timeout=seconds + 120)
        print(f"small requests alone: {alone.strip()}", flush=True)
        # The large senders run a little longer than the small phase, so that it is
        # covered from end to end.
        sender = subprocess.Popen(
            _generator("--large", port, large_mib, large_clients, seconds + 1.0),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if sender.stdout.readline().strip() != "sending":
                raise RuntimeError("the large-request generator did not start")
            beside = _generate(small, timeout=seconds + 300)
            large_out, _ = sender.communicate(timeout=seconds + 600)
        finally:
            sender.kill()
        print(f"small requests beside large ones: {beside.strip()}", flush=True)
        print(f"large requests: {large_out.strip()}", flush=True)
        metrics = _metrics(port)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "options": " ".join(BATCHING),
        "seconds": seconds,
        "small_rate": small_rate,
        "large_mib": large_mib,
        "large_clients": large_clients,
        "small_alone": json.loads(alone),
        "small_beside_large": json.loads(beside),
        "large": json.loads(large_out),
        "errors": int(metrics["fuser_request_errors_total"]),
    }


def _metrics(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        return dict(
            line.split()
            for line in response.read().decode().splitlines()
            if not line.startswith("#")
        )


def report(results: dict[str, Any]) -> str:
    machine = (
        "Machine: {cpu_model}, {cores_logical} logical cores, {memory_gb} GB, Python {python}; "
        "load average {load} at the start (other work may share the cores).".format(
            load=results["machine"]["load_average_at_start"][0], **results["machine"]
        )
    )
    lines = ["# `fuser serve` under load", "", machine]
    if "rows" in results and "contention" in results:
        lines += [
            "",
            "`python -m benchmarks.serve` runs both scenarios below (about two minutes here); "
            "the command at the head of each section runs that one alone.",
        ]
    if "rows" in results:
        lines += [
            "",
            "## Throughput: dynamic batching against one forward pass per request",
            "",
            f"`python -m benchmarks.serve --seconds {results['seconds']:g} --clients "
            f"{results['clients']}` — {results['clients']} concurrent clients on loopback, "
            f"each sending one-row TF Serving `:predict` requests back to back over a "
            f"keep-alive connection for {results['seconds']:g} s (after 1 s of warm-up), "
            f"against an ensemble of {results['members']} MLPs (20 → 64 → 64 → 5). Client and "
            "server share this machine's cores.",
            "",
            "| server | requests/s | p50 latency | p99 latency | rows per forward pass |",
            "| :--- | ---: | ---: | ---: | ---: |",
        ]
        for row in results["rows"]:
            lines.append(
                f"| {row['server']} (`{row['options']}`) | {row['requests_per_second']:,.0f} | "
                f"{row['latency_ms_p50']:.2f} ms | {row['latency_ms_p99']:.2f} ms | "
                f"{row.get('rows_per_forward_pass', 1)} |"
            )
        lines += [
            "",
            f"Dynamic batching serves {results['throughput_ratio']}x the requests per second.",
        ]
    if "contention" in results:
        contention = results["contention"]
        alone, beside = contention["small_alone"], contention["small_beside_large"]
        large = contention["large"]
        lines += [
            "",
            "## Small requests while large ones arrive",
            "",
            f"`python -m benchmarks.serve --scenarios contention --contention-seconds "
            f"{contention['seconds']:g} --large-mib {contention['large_mib']:g} "
            f"--large-clients {contention['large_clients']} --small-rate "
            f"{contention['small_rate']:g}` — one server (`{contention['options']}`); one-row "
            f"requests due every {1000 / contention['small_rate']:g} ms (open loop: latency "
            f"counts from when a request was due, on idle keep-alive connections or new ones), "
            f"for {contention['seconds']:g} s alone, then {contention['seconds']:g} s while "
            f"{contention['large_clients']} clients send {large['body_mib']:g} MiB row-format "
            "requests back to back.",
            "",
            "| one-row requests | answered | p50 latency | p99 latency | max latency |",
            "| :--- | ---: | ---: | ---: | ---: |",
        ]
        for label, row in (("alone", alone), ("while large requests arrive", beside)):
            lines.append(
                f"| {label} | {row['requests']:,} | {row['latency_ms_p50']:.2f} ms | "
                f"{row['latency_ms_p99']:.2f} ms | {row['latency_ms_max']:.2f} ms |"
            )
        lines += [
            "",
            f"The large requests: {large['requests']} answered, each in "
            f"{large['latency_ms_p50'] / 1000:.2f} s at the median "
            f"({large['latency_ms_max'] / 1000:.2f} s at most), decoding, forward pass and "
            f"encoding included; {contention['errors']} errors in all. The server decodes "
            "and encodes large bodies in a worker thread, a block of rows at a time, and runs "
            "a large request's forward pass in parts of `--max-batch-size` rows with the small "
            "requests taking turns between them; the event loop stays free for the small "
            "requests. What remains is the two cores being shared by that work, the server's "
            "and the clients'.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--load-generator"]:
        load_generator(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="throughput run length")
    parser.add_argument("--clients", type=int, default=32, help="throughput clients")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, among {', '.join(SCENARIOS)} (default: both)",
    )
    parser.add_argument(
        "--contention-seconds", type=float, default=15.0, help="length of each contention phase"
    )
    parser.add_argument("--large-mib", type=float, default=32.0, help="size of a large request")
    parser.add_argument("--large-clients", type=int, default=2, help="large-request senders")
    parser.add_argument("--small-rate", type=float, default=50.0, help="one-row requests per s")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where members and the artifact go")
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    options = {
        "seconds": arguments.seconds,
        "clients": arguments.clients,
        "scenarios": tuple(name.strip() for name in arguments.scenarios.split(",") if name),
        "contention_seconds": arguments.contention_seconds,
        "large_mib": arguments.large_mib,
        "large_clients": arguments.large_clients,
        "small_rate": arguments.small_rate,
    }
    with workdir_or_temporary(arguments.workdir, "fuser-serve-") as workdir:
        run(arguments.out, workdir, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
