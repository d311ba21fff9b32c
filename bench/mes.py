"""Scenario ``mes`` (f): MES webhook ingest into the agent, over loopback HTTP.

The agent runs as ``plantgate run`` with one ``[[sources.mes]]`` webhook and one
MQTT sink whose broker never answers, so every committed event stays in the
buffer and the figure is the ingest alone (synchronous FULL, the default).

- **Batches**: pre-encoded ``application/cloudevents-batch+json`` bodies of 500
  ``production.completed`` events (distinct ids), posted by 4 concurrent
  keep-alive connections; events/s = events answered 202 (committed) / wall time
  from the first request to the last answer.
- **Single events**: one ``application/cloudevents+json`` event per request, sent
  open loop at 500 requests/s (each at its due time, whatever the answers before
  it) for the measured window after a 1 s warm-up; latency from sending the request
  to the 202, p50/p90/p99.

The client runs in this process (httpx); the agent's CPU and RSS are measured
over each window.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h11
import httpx

from bench.common import (
    HOST,
    AgentProcess,
    CpuWindow,
    Row,
    ScenarioResult,
    agent_header,
    check_config,
    free_port,
    memory_mb,
    percentile,
    target_max,
    target_min,
    workdir,
)

BATCH = 500
BATCH_TARGET = 50_000
SINGLE_RATE = 500
SINGLE_P99_MS = 20.0
TOKEN = "bench-mes-token"
CONNECTIONS = 4


def config_text(data_dir: Path, http_port: int, broker_port: int) -> str:
    """The agent: the MES webhook, one MQTT sink that never connects (events stay committed in the buffer)."""
    return "\n".join(
        [
            *agent_header(data_dir, http_port, token_file="ingest-token"),
            "[[sources.mes]]",
            'name = "mes"',
            'mode = "webhook"',
            "",
            "[[sinks.mqtt]]",
            'name = "held"',
            f'url = "mqtt://{HOST}:{broker_port}"',
            "",
        ]
    )


def event(index: int, base: datetime) -> dict[str, Any]:
    """One MES ``production.completed`` CloudEvent."""
    work_order = f"WO-{4_700_000 + index // 20}"
    return {
        "specversion": "1.0",
        "id": f"00000000-0000-4000-8000-{index:012d}",
        "source": "mes://bench/mes",
        "type": "io.plantgate.production.completed",
        "time": (base + timedelta(milliseconds=index)).isoformat().replace("+00:00", "Z"),
        "subject": work_order,
        "correlationid": f"conf-{index}",
        "data": {
            "work_order": work_order,
            "item": "40012345000017",
            "quantity": {"value": f"{10 + index % 490}.25", "uom": "EA"},
            "line": "line3",
        },
    }


async def _post_batches(url: str, bodies: list[bytes]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/cloudevents-batch+json"}
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                response = await client.post("/v1/events", content=body)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "statuses": statuses}


class _Connection:
    """One keep-alive HTTP/1.1 connection driven by h11: the load generator's client.

    httpx costs about 1 ms of CPU per request; at 500 requests/s on a 2-core machine
    that load generator competed with the agent and its own scheduling lag showed up
    as latency. h11 (the HTTP/1.1 state machine under httpx and uvicorn) with asyncio
    streams costs a tenth of that.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, path: str, headers: list[tuple[str, str]], body: bytes) -> int:
        conn = self.h11
        self.writer.write(
            conn.send(h11.Request(method="POST", target=path, headers=[*headers, ("Content-Length", str(len(body)))]))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    raise ConnectionError("the agent closed the connection")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
        conn.start_next_cycle()
        return status

    def close(self) -> None:
        self.writer.close()


async def _post_singles(url: str, bodies: list[bytes], rate: float, warmup: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    headers = [
        ("Host", f"{host}:{port}"),
        ("Authorization", f"Bearer {TOKEN}"),
        ("Content-Type", "application/cloudevents+json"),
    ]
    idle: list[_Connection] = []
    opened: list[_Connection] = []
    latencies: list[float] = []
    lateness: list[float] = []
    statuses: dict[int, int] = {}

    async def one(index: int, body: bytes, due: float) -> None:
        sent = time.perf_counter()
        reused = bool(idle)
        if idle:
            connection = idle.pop()
        else:
            connection = await _Connection.open(host, int(port))
            opened.append(connection)
        try:
            status = await connection.post("/v1/events", headers, body)
        except (ConnectionError, h11.RemoteProtocolError):
            if not reused:
                raise
            # The server closed an idle keep-alive connection (its keep-alive timeout), as HTTP allows:
            # open a new one and send again, as every HTTP client does.
            connection.close()
            connection = await _Connection.open(host, int(port))
            opened.append(connection)
            status = await connection.post("/v1/events", headers, body)
        answered = time.perf_counter()
        idle.append(connection)
        if index >= warmup:
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append((answered - sent) * 1000)
            lateness.append((sent - due) * 1000)

    tasks = []
    start = time.perf_counter() + 0.05
    try:
        for index, body in enumerate(bodies):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the open-loop schedule, not synchronisation
            tasks.append(asyncio.create_task(one(index, body, due)))
        await asyncio.gather(*tasks)
    finally:
        for connection in opened:
            connection.close()
    return {
        "latencies_ms": latencies,
        "client_lateness_ms": lateness,
        "statuses": statuses,
        "connections": len(opened),
    }


def run(quick: bool = False) -> ScenarioResult:
    """Scenario (f); see the module docstring."""
    events = 50_000 if quick else 500_000
    seconds = 3 if quick else 20
    result = ScenarioResult("mes", "MES webhook ingest (batches of 500; single events at 500 req/s)", quick=quick)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    bodies = [
        json.dumps([event(i, base) for i in range(first, first + BATCH)]).encode()
        for first in range(0, events, BATCH)
    ]
    warmup = SINGLE_RATE
    singles = [json.dumps(event(events + i, base)).encode() for i in range(warmup + SINGLE_RATE * seconds)]
    with workdir("mes") as tmp:
        data_dir = tmp / "data"
        data_dir.mkdir()
        (data_dir / "ingest-token").write_text(TOKEN, encoding="utf-8")
        http_port = free_port()
        config = tmp / "plantgate.toml"
        config.write_text(config_text(data_dir, http_port, free_port()), encoding="utf-8")
        check_config(config)
        agent = AgentProcess(config, http_port, tmp / "agent.log").start()
        try:
            agent.wait_running()
            url = f"http://{HOST}:{http_port}"
            cpu = CpuWindow(agent.pid).start()
            batches = asyncio.run(_post_batches(url, bodies))
            cpu.stop()
            rss_batches = memory_mb(agent.pid)[0]
            accepted = batches["statuses"].get(202, 0) * BATCH
            rate = accepted / batches["seconds"]
            single_cpu = CpuWindow(agent.pid).start()
            single = asyncio.run(_post_singles(url, singles, SINGLE_RATE, warmup))
            single_cpu.stop()
            rss_single, hwm = memory_mb(agent.pid)
            status = agent.status() or {}
        finally:
            agent.stop()
    latencies = single["latencies_ms"]
    p50, p90, p99 = (percentile(latencies, q) for q in (50, 90, 99))
    result.figures = {
        "batch": {
            "events": events,
            "batch": BATCH,
            "connections": CONNECTIONS,
            "seconds": batches["seconds"],
            "statuses": batches["statuses"],
            "events_per_s": rate,
            "agent_cpu_cores": cpu.cores,
            "agent_rss_mb": rss_batches,
        },
        "single": {
            "rate": SINGLE_RATE,
            "seconds": seconds,
            "requests": len(latencies),
            "statuses": single["statuses"],
            "p50_ms": p50,
            "p90_ms": p90,
            "p99_ms": p99,
            "max_ms": max(latencies, default=None),
            "client_lateness_p99_ms": percentile(single["client_lateness_ms"], 99),
            "agent_cpu_cores": single_cpu.cores,
            "agent_rss_mb": rss_single,
            "agent_vmhwm_mb": hwm,
        },
        "buffer_last_sequence": status.get("buffer", {}).get("last_sequence"),
    }
    result.rows.append(
        Row(
            "f mes",
            "webhook batches of 500, events/s committed",
            rate,
            "ev/s",
            f">= {BATCH_TARGET:,}",
            target_min(rate, BATCH_TARGET),
            "",
            cpu.cores,
            rss_batches,
            f"{events:,} events, {CONNECTIONS} connections; answers {batches['statuses']}",
        )
    )
    ok = single["statuses"].get(202, 0) == len(latencies)
    result.rows.append(
        Row(
            "f mes",
            f"single events at {SINGLE_RATE} req/s, p99 to 202",
            p99,
            "ms",
            f"<= {SINGLE_P99_MS:g} ms",
            target_max(p99, SINGLE_P99_MS) if ok else False,
            "",
            single_cpu.cores,
            rss_single,
            f"p50 {p50:.1f} ms, p90 {p90:.1f} ms over {seconds} s; answers {single['statuses']}"
            if p50 is not None and p90 is not None
            else "no answers",
        )
    )
    return result
