"""``fuser serve`` under load: dynamic batching against one forward pass per request.

``python -m benchmarks.serve [--seconds 20] [--clients 32] [--out DIR]`` builds a fused
artifact of 8 of the suite's MLPs, starts ``fuser serve`` on loopback twice (with dynamic
batching, then ``--no-batching``), and drives each with ``--clients`` concurrent clients
for ``--seconds``: every client holds one keep-alive connection and sends TF Serving
row-format requests of one row, one after another. The load generator is a separate
process (asyncio, raw HTTP/1.1) so that it does not share the server's interpreter. It
reports requests per second and p50/p99 latency and writes ``DIR/serve.json`` and
``DIR/SERVE.md``. Both run on this machine's 2 cores, client and server together.
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


async def _client(port: int, body: bytes, stop_at: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"POST /v1/models/ensemble:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"server answered {head.splitlines()[0]!r}")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def _load(port: int, clients: int, seconds: float, body: bytes) -> dict[str, float]:
    latencies: list[float] = []
    warm_until = time.perf_counter() + 1.0
    await asyncio.gather(*(_client(port, body, warm_until, []) for _ in range(clients)))
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_client(port, body, stop_at, latencies) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    values = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(values, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(values, 99)), 3),
    }


def load_generator(argv: list[str]) -> None:
    """Entry point of the client process: ``PORT CLIENTS SECONDS``; prints one JSON line."""
    port, clients, seconds = int(argv[0]), int(argv[1]), float(argv[2])
    row = np.random.default_rng(0).normal(size=20).round(4).tolist()
    body = json.dumps({"instances": [row]}).encode()
    print(json.dumps(asyncio.run(_load(port, clients, seconds, body))), flush=True)


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


def run(out: Path, workdir: Path, *, seconds: float, clients: int) -> dict[str, Any]:
    import fuser

    members = write_members("mlp", MEMBERS, workdir / "mlp")
    artifact = fuser.build(members).save(workdir / "ensemble.onnx", force=True)
    rows = []
    for label, extra in (
        ("dynamic batching", ["--max-batch-size", "64", "--batch-timeout-ms", "1"]),
        ("no batching", ["--no-batching"]),
    ):
        port = _free_port()
        server = _serve(artifact, port, extra)
        try:
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.serve",
                    "--load-generator",
                    str(port),
                    str(clients),
                    str(seconds),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=seconds + 120,
            )
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = dict(
                    line.split()
                    for line in response.read().decode().splitlines()
                    if not line.startswith("#")
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
        row = {"server": label, "options": " ".join(extra), **json.loads(completed.stdout)}
        if "fuser_forward_passes_total" in metrics:
            passes = int(metrics["fuser_forward_passes_total"])
            row["rows_per_forward_pass"] = round(
                int(metrics["fuser_batched_rows_total"]) / passes, 2
            )
        print(f"{label}: {row}", flush=True)
        rows.append(row)
    batched, alone = rows
    results = {
        "machine": describe_machine(),
        "members": MEMBERS,
        "clients": clients,
        "seconds": seconds,
        "rows": rows,
        "throughput_ratio": round(batched["requests_per_second"] / alone["requests_per_second"], 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "SERVE.md").write_text(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "# `fuser serve` under load",
        "",
        f"`python -m benchmarks.serve` — {results['clients']} concurrent clients on loopback, "
        f"each sending one-row TF Serving `:predict` requests back to back over a keep-alive "
        f"connection for {results['seconds']:g} s (after 1 s of warm-up), against an ensemble "
        f"of {results['members']} MLPs (20 → 64 → 64 → 5). Client and server share this "
        "machine's cores.",
        "",
        "Machine: {cpu_model}, {cores_logical} logical cores, {memory_gb} GB, Python {python}."
        "".format(**results["machine"]),
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--load-generator"]:
        load_generator(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, help="where members and the artifact go")
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    options = {"seconds": arguments.seconds, "clients": arguments.clients}
    with workdir_or_temporary(arguments.workdir, "fuser-serve-") as workdir:
        run(arguments.out, workdir, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
