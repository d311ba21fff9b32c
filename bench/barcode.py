"""Scenario ``barcode``: scans per second through the barcode source into the SQLite buffer.

The agent runs in this process (``Agent``, no HTTP server) with one barcode source
in ``tcp-server`` mode, station event ``goods.received``, and one JSON Lines sink
taking the transaction lane (so the scans are routed and drained as in production).
A separate process (``python -m bench.barcode send HOST PORT N``) plays a scanner
that sends N distinct GS1-128 scans (``]C1``, GTIN, lot, serial, count, GS
separators, CR) as fast as the socket takes them. Measured: the time from the
first byte until the source's status says all N scans are committed (``scans``
counts a scan after ``output.events`` returned), this process's CPU over that
window, RSS; and, separately, the cost of reading one scan (``read_scan``, biip).

Real scanners deliver a few scans per second each; the target (1,000 committed
scans/s) leaves a site's worth of scanners far below the source's limit.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import HOST, CpuWindow, Row, ScenarioResult, free_port, memory_mb, target_min, workdir

TARGET = 1_000
GTIN = "05012345678900"
GS = "\x1d"

CONFIG = """
[agent]
site = "bench"
id = "bench-barcode"
data_dir = "{data_dir}"
log_level = "WARNING"

[[sources.barcode]]
name = "dock1"
mode = "tcp-server"
listen = "{host}:{port}"
station = "receiving-dock-1"
event = "goods.received"

[[sinks.jsonl]]
name = "file"
lanes = ["transaction", "operational"]
"""


def scan(index: int) -> bytes:
    """One distinct GS1-128 scan with its terminator."""
    return f"]C101{GTIN}{GS}10LOT{index % 97}{GS}21SN{index:09d}{GS}37{1 + index % 24}\r".encode()


def send(host: str, port: int, count: int) -> None:
    """The scanner process: connect, send ``count`` scans in 64 KiB writes, close."""
    with socket.create_connection((host, port), timeout=10) as sock:
        chunk = bytearray()
        for index in range(count):
            chunk += scan(index)
            if len(chunk) >= 65536:
                sock.sendall(chunk)
                chunk.clear()
        sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(60)
        sock.recv(1)  # until the agent closes: every byte was read


async def _measure(data_dir: Path, count: int) -> dict[str, Any]:
    from agent.pipeline import Agent
    from agent.settings import parse_settings

    port = free_port()
    settings = parse_settings(CONFIG.format(data_dir=data_dir, host=HOST, port=port))
    agent = Agent(settings, serve_http=False)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 30)
        source = agent.sources[0]
        deadline = time.monotonic() + 30
        while source.status.state != "connected":
            if time.monotonic() > deadline:
                raise TimeoutError(f"barcode source not listening: {source.status}")
            await asyncio.sleep(0.05)
        window = CpuWindow().start()
        t0 = time.perf_counter()
        scanner = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.barcode", "send", HOST, str(port), str(count)
        )
        try:
            deadline = time.monotonic() + max(60.0, count / 200)
            while int(source.status.info["scans"]) < count:
                if time.monotonic() > deadline or scanner.returncode not in (None, 0):
                    raise TimeoutError(f"only {source.status.info['scans']} of {count} scans committed")
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            window.stop()
            rss, hwm = memory_mb()
        finally:
            if scanner.returncode is None:
                scanner.terminate()
            await asyncio.wait_for(scanner.wait(), 30)
        info = dict(source.status.info)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return {
        "scans": count,
        "seconds": elapsed,
        "scans_per_s": count / elapsed,
        "cpu_cores": window.cores,
        "rss_mb": rss,
        "vmhwm_mb": hwm,
        "source_info": info,
    }


def _read_cost(samples: int) -> float:
    """Microseconds to read one GS1 scan with biip (``read_scan``), no I/O."""
    from protocols.barcode.gs1 import read_scan

    codes = [scan(i)[:-1] for i in range(samples)]
    t0 = time.perf_counter()
    for code in codes:
        read_scan(code)
    return (time.perf_counter() - t0) / samples * 1e6


def run(quick: bool = False) -> ScenarioResult:
    """Scenario ``barcode``; see the module docstring."""
    count = 5_000 if quick else 50_000
    result = ScenarioResult("barcode", "scans/s through the barcode source into the buffer", quick=quick)
    with workdir("barcode") as tmp:
        figures = asyncio.run(_measure(tmp / "data", count))
    figures["read_scan_us"] = _read_cost(2_000 if quick else 20_000)
    result.figures = figures
    rate = figures["scans_per_s"]
    result.rows.append(
        Row(
            "barcode",
            "scans/s committed",
            rate,
            "scans/s",
            f">= {TARGET:,}",
            target_min(rate, TARGET),
            "",
            figures["cpu_cores"],
            figures["rss_mb"],
            f"{count:,} GS1-128 scans over one TCP connection; read_scan {figures['read_scan_us']:.0f} us/scan",
        )
    )
    return result


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        print("usage: python -m bench.barcode send HOST PORT COUNT", file=sys.stderr)
        sys.exit(2)
