"""Scenario ``https``: a backlog of transaction events drained over HTTPS (TLS) to a local receiver.

For each backlog size: a buffer is filled (not timed, as in ``drain``) with canonical
``production.completed`` events for sink ``bench``; a receiver starts as a separate
process (``python -m bench.https_drain receive``: Starlette on uvicorn with TLS from a
trustme CA, counting every event by the index in its id with msgspec, so lost and
duplicated are exact); then ``plantgate run -c`` starts with no sources and one
``[[sinks.https]]`` (lane ``transaction``, ``batch_max`` events per request). The
agent process alone is measured from ``/status`` saying ``running`` until
``sinks.bench.depth`` is 0: events/s, CPU per delivered event, RSS sampled every
0.25 s (start, middle, end), so a large and a small backlog show RSS flat.

Then the cost of one poison event: the HTTPS sink, in this process, delivers a
batch of 500 events of which one is refused (the receiver answers 422 naming it)
and reports how many requests isolating it took, and how long.

Run: ``python -m bench https`` (registered in ``bench/__main__.py``) or
``python -m bench.https_drain [--quick] [--count N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    AgentProcess,
    CpuWindow,
    MemorySampler,
    Row,
    ScenarioResult,
    SystemCpu,
    agent_header,
    check_config,
    free_port,
    machine_info,
    memory_mb,
    stop_process,
    target_max,
    target_min,
    wait_until,
    workdir,
)
from bench.drain import SINK, fill

TARGET = 50_000
RSS_GROWTH_LIMIT_MB = 10.0  # "flat", the drain scenario's threshold
BATCH = 500
POISON_BATCH = 500


# --- the receiver (its own process) -------------------------------------------------------------------------


def receiver_main(argv: list[str]) -> None:
    """``receive --port P --certfile F --keyfile F --expected N``: serve until SIGTERM."""
    import msgspec
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    parser = argparse.ArgumentParser(prog="bench.https_drain receive")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--expected", type=int, default=0)
    parser.add_argument("--http2", action="store_true", help="serve with hypercorn, offering HTTP/2")
    args = parser.parse_args(argv)

    class Event(msgspec.Struct):
        id: str

    decode = msgspec.json.Decoder(list[Event]).decode
    counts = bytearray(args.expected + 1)
    state = {"events": 0, "requests": 0, "refused": 0, "unexpected": 0, "first": 0.0, "last": 0.0}

    async def events(request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204)
        body = await request.body()
        state["requests"] += 1
        if b'"poison":true' in body:
            # a bisection test: name the poison events, store nothing of this request
            poison = [e["id"] for e in msgspec.json.decode(body) if e.get("data", {}).get("poison")]
            state["refused"] += 1
            return JSONResponse({"rejected": poison}, status_code=422)
        batch = decode(body)
        now = time.monotonic()
        state["first"] = state["first"] or now
        state["last"] = now
        state["events"] += len(batch)
        for event in batch:
            index = int(event.id[-12:])
            if index < len(counts):
                counts[index] = min(255, counts[index] + 1)
            else:
                state["unexpected"] += 1
        return Response(status_code=204)

    async def stats(request: Request) -> Response:
        seen = sum(1 for c in counts[: args.expected] if c)
        duplicates = sum(c - 1 for c in counts if c > 1)
        return JSONResponse({**state, "distinct": seen, "duplicates": duplicates})

    app = Starlette(routes=[Route("/events", events, methods=["POST", "OPTIONS"]), Route("/stats", stats)])
    if args.http2:
        # hypercorn speaks HTTP/2 (ALPN h2): for the client-cost comparison only
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"{HOST}:{args.port}"]
        config.certfile, config.keyfile = args.certfile, args.keyfile
        config.errorlog = config.accesslog = None
        asyncio.run(serve(app, config))  # type: ignore[arg-type]
        return
    uvicorn.run(
        app, host=HOST, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
        log_level="warning", access_log=False, http="h11",
    )  # fmt: skip


class Receiver:
    """The receiver process and its TLS material (trustme CA)."""

    def __init__(self, directory: Path, expected: int, *, http2: bool = False) -> None:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert(HOST)
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.certfile, self.keyfile = directory / "server.pem", directory / "server.key"
        cert.cert_chain_pems[0].write_to_path(str(self.certfile))
        cert.private_key_pem.write_to_path(str(self.keyfile))
        self.port = free_port()
        self.expected = expected
        self.http2 = http2
        self.proc: subprocess.Popen[bytes] | None = None
        self._context = ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}/events"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Receiver:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.https_drain", "receive", "--port", str(self.port),
             "--certfile", str(self.certfile), "--keyfile", str(self.keyfile), "--expected", str(self.expected),
             *(["--http2"] if self.http2 else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: self.stats() is not None, timeout=30, what="the HTTPS receiver answering")
        return self

    def stats(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"https://{HOST}:{self.port}/stats", context=self._context, timeout=5) as r:
                doc: dict[str, Any] = json.loads(r.read())
                return doc
        except OSError:
            return None

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


def https_config(*, data_dir: Path, http_port: int, url: str, ca_file: Path, batch_max: int) -> str:
    """The bench agent's TOML: no sources, one HTTPS sink taking the transaction lane."""
    return "\n".join(
        [
            *agent_header(data_dir, http_port),
            "[[sinks.https]]",
            f'name = "{SINK}"',
            f'url = "{url}"',
            f'ca_file = "{ca_file}"',
            'lanes = ["transaction"]',
            f"batch_max = {batch_max}",
            "",
        ]
    )


# --- one drain ---------------------------------------------------------------------------------------------


def drain_once(count: int, *, quick: bool, batch_max: int = BATCH, http2: bool = False) -> dict[str, Any]:
    """Fill a backlog of ``count`` events, start receiver and agent, time the drain; every figure of one run."""
    with workdir(f"https-{count}") as tmp:
        data_dir = tmp / "agent"
        data_dir.mkdir()
        fill_s = asyncio.run(fill(data_dir / "buffer.db", count))
        receiver = Receiver(tmp / "receiver", count, http2=http2).start()
        agent: AgentProcess | None = None
        try:
            http_port = free_port()
            config = tmp / "plantgate.toml"
            config.write_text(
                https_config(
                    data_dir=data_dir, http_port=http_port, url=receiver.url, ca_file=receiver.ca_file,
                    batch_max=batch_max,
                ),
                encoding="utf-8",
            )  # fmt: skip
            check_config(config)
            deadline = max(60.0, count / 2_000)
            agent = AgentProcess(config, http_port, tmp / "agent.log").start()
            sampler = MemorySampler(agent.pid, 0.25).start()
            doc = agent.wait_running(timeout=120)
            t_running = time.monotonic()
            rss_start, _ = memory_mb(agent.pid)
            depth_start = int(doc["sinks"][SINK]["depth"])
            window = CpuWindow(agent.pid).start()
            receiver_cpu = CpuWindow(receiver.pid).start()
            machine = SystemCpu().start()
            depth, timeline = depth_start, [(0.0, depth_start)]
            end = t_running + deadline
            while depth > 0 and time.monotonic() < end:
                time.sleep(0.2)
                status = agent.status()
                if status is not None:
                    depth = int(status["sinks"][SINK]["depth"])
                    timeline.append((round(time.monotonic() - t_running, 3), depth))
            t_empty = time.monotonic()
            window.stop()
            receiver_cpu.stop()
            machine.stop()
            rss_end, hwm = memory_mb(agent.pid)
            final = agent.status() or {}
            samples = sampler.stop()
            stats = receiver.stats() or {}
            stop_code = agent.stop()
        finally:
            if agent is not None:
                agent.stop()
            receiver.stop()
        drain_s = t_empty - t_running
        delivered = int(stats.get("events", 0))
        rss_drain = [rss for t, rss in samples if t_running <= t <= t_empty]
        sink_info = final.get("sinks", {}).get(SINK, {}) if isinstance(final, dict) else {}
        return {
            "backlog": count,
            "batch_max": batch_max,
            "receiver_server": "hypercorn (offers HTTP/2)" if http2 else "uvicorn (HTTP/1.1)",
            "http_version": sink_info.get("info", {}).get("http_version") if isinstance(sink_info, dict) else None,
            "fill_seconds": round(fill_s, 2),
            "drained": depth == 0,
            "depth_start": depth_start,
            "depth_end": depth,
            "drain_seconds": round(drain_s, 3),
            "events_per_s": round(depth_start / drain_s, 1) if drain_s > 0 and depth == 0 else None,
            "cpu_cores": round(window.cores, 3),
            "cpu_seconds": round(window.cpu, 2),
            "cpu_us_per_event": round(window.cpu / delivered * 1e6, 2) if delivered else None,
            "receiver_cores": round(receiver_cpu.cores, 3),
            "machine_busy_cores": round(machine.cores, 3),
            "rss_start_mb": round(rss_start, 1),
            "rss_middle_mb": round(rss_drain[len(rss_drain) // 2], 1) if rss_drain else None,
            "rss_end_mb": round(rss_end, 1),
            "rss_max_during_drain_mb": round(max(rss_drain), 1) if rss_drain else None,
            "vmhwm_mb": round(hwm, 1),
            "depth_timeline": timeline[:: max(1, len(timeline) // 60)],
            "receiver": stats,
            "requests": stats.get("requests"),
            "lost": count - int(stats.get("distinct", 0)),
            "duplicates": int(stats.get("duplicates", 0)),
            "sink_status": sink_info,
            "agent_exit_code": stop_code,
            "quick": quick,
        }


# --- the cost of one poison event --------------------------------------------------------------------------------


async def _poison_cost(url: str, ca_file: Path, directory: Path, position: int) -> dict[str, Any]:
    from agent.config_types import BuildContext
    from agent.events import encode_event
    from agent.sink import ACKED, BufferedEvent, Rejected
    from bench.ingest import transaction
    from protocols.https import HttpsSinkConfig

    base = datetime(2025, 1, 1, tzinfo=UTC)
    batch = []
    for i in range(POISON_BATCH):
        event = transaction(10_000_000 + i, base)
        body = encode_event(event)
        if i == position:
            body = body.replace(b'"data":{', b'"data":{"poison":true,', 1)  # the receiver refuses it
        batch.append(BufferedEvent(seq=i + 1, lane=event.lane, type=event.type, id=event.id, body=body))
    config = HttpsSinkConfig(name="poison", url=url, ca_file=ca_file, batch_max=POISON_BATCH)
    sink = config.build(BuildContext(agent_id="bench", site="bench", version="bench", data_dir=directory))
    task = asyncio.create_task(sink.run())
    try:
        t0 = time.perf_counter()
        outcomes = await sink.deliver(batch)
        elapsed = time.perf_counter() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    rejected = [i for i, o in enumerate(outcomes) if isinstance(o, Rejected)]
    return {
        "batch": POISON_BATCH,
        "poison_at": position,
        "requests": sink.requests,
        "refused_requests": sink.refused_requests,
        "seconds": round(elapsed, 4),
        "rejected": rejected,
        "acked": sum(1 for o in outcomes if o is ACKED),
    }


def poison_cost(quick: bool) -> list[dict[str, Any]]:
    """Requests (and time) to isolate one poison event in a batch of 500, at a few positions."""
    with workdir("https-poison") as tmp:
        receiver = Receiver(tmp / "receiver", 0).start()
        try:
            positions = (0, 250, 499) if quick else (0, 137, 250, 377, 499)
            return [asyncio.run(_poison_cost(receiver.url, receiver.ca_file, tmp, p)) for p in positions]
        finally:
            receiver.stop()


# --- what a request costs the sink: HTTP/1.1 against HTTP/2 ------------------------------------------------------


async def _request_cost(url: str, ca_file: Path, directory: Path, requests: int) -> dict[str, Any]:
    from agent.config_types import BuildContext
    from agent.events import encode_event
    from agent.sink import ACKED, BufferedEvent
    from bench.ingest import transaction
    from protocols.https import HttpsSinkConfig

    base = datetime(2025, 1, 1, tzinfo=UTC)
    events = [transaction(20_000_000 + i, base) for i in range(BATCH)]
    batch = [
        BufferedEvent(seq=i + 1, lane=e.lane, type=e.type, id=e.id, body=encode_event(e)) for i, e in enumerate(events)
    ]
    config = HttpsSinkConfig(name="cost", url=url, ca_file=ca_file, http2=True)
    sink = config.build(BuildContext(agent_id="bench", site="bench", version="bench", data_dir=directory))
    task = asyncio.create_task(sink.run())
    try:
        assert all(o is ACKED for o in await sink.deliver(batch))  # connection and TLS set up, not measured
        window = CpuWindow().start()
        for _ in range(requests):
            outcomes = await sink.deliver(batch)
            if not all(o is ACKED for o in outcomes):
                raise RuntimeError(f"request refused: {sink.status.last_error}")
        window.stop()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {
        "http_version": sink.status.info.get("http_version"),
        "requests": requests,
        "batch": BATCH,
        "body_bytes": sum(len(e.body) for e in batch) + BATCH + 1,
        "client_cpu_ms_per_request": round(window.cpu / requests * 1000, 2),
        "client_cpu_us_per_event": round(window.cpu / requests / BATCH * 1e6, 2),
        "events_per_s_wall": round(requests * BATCH / window.wall, 1),
    }


def request_cost(quick: bool) -> list[dict[str, Any]]:
    """The sink's own CPU per request of 500 events, to a receiver offering HTTP/1.1 only and one offering HTTP/2."""
    results = []
    with workdir("https-cost") as tmp:
        for http2 in (False, True):
            receiver = Receiver(tmp / f"receiver-{int(http2)}", 0, http2=http2).start()
            try:
                results.append(asyncio.run(_request_cost(receiver.url, receiver.ca_file, tmp, 20 if quick else 100)))
            finally:
                receiver.stop()
    return results


# --- the scenario ---------------------------------------------------------------------------------------------


def run(quick: bool = False, sizes: tuple[int, int] | None = None) -> ScenarioResult:
    """The large backlog, a small one (RSS flat), and the poison-isolation cost."""
    sizes = sizes or ((50_000, 20_000) if quick else (1_000_000, 200_000))
    result = ScenarioResult(
        "https", "backlog drain over HTTPS (TLS) to a local receiver (agent subprocess, no sources)", quick=quick
    )
    runs = [drain_once(size, quick=quick) for size in sizes]
    # The same drain against a receiver that offers HTTP/2 (the sink's default takes it)
    h2_run = drain_once(sizes[1], quick=quick, http2=True)
    poison = poison_cost(quick)
    costs = request_cost(quick)
    result.figures = {
        "runs": runs, "http2_run": h2_run, "poison": poison, "request_cost": costs, "target_events_per_s": TARGET,
    }  # fmt: skip
    for r in [*runs, h2_run]:
        rate = r["events_per_s"]
        ok = target_min(rate, TARGET)
        if ok and (r["lost"] or r["duplicates"]):
            ok = False
        result.rows.append(
            Row(
                f"https drain {r['backlog']:,} {r['http_version'] or ''}",
                "events/s drained",
                rate,
                "ev/s",
                f">= {TARGET:,}, 0 lost",
                ok,
                "",
                r["cpu_cores"],
                r["rss_max_during_drain_mb"],
                f"lost {r['lost']}, dup {r['duplicates']}, {r['requests']} requests of {r['batch_max']}, "
                f"{r['cpu_us_per_event']} us CPU/event, receiver {r['receiver_cores']:.2f} cores, "
                f"RSS start {r['rss_start_mb']:.0f} / middle {r['rss_middle_mb'] or 0:.0f} / end {r['rss_end_mb']:.0f}",
            )
        )
    big, small = runs
    growth = (big["rss_max_during_drain_mb"] or 0) - (small["rss_max_during_drain_mb"] or 0)
    result.rows.append(
        Row(
            "https drain RSS",
            f"RSS during drain: {big['backlog'] // 1000}k minus {small['backlog'] // 1000}k",
            round(growth, 1),
            "MB",
            f"<= {RSS_GROWTH_LIMIT_MB:g} (flat)",
            target_max(growth, RSS_GROWTH_LIMIT_MB),
            "",
            None,
            big["rss_max_during_drain_mb"],
        )
    )
    worst = max(p["requests"] for p in poison)
    result.rows.append(
        Row(
            "https poison",
            f"requests to isolate 1 poison event in {POISON_BATCH}",
            worst,
            "requests",
            "",
            None,
            "",
            None,
            None,
            ", ".join(f"at {p['poison_at']}: {p['requests']} in {p['seconds'] * 1000:.0f} ms" for p in poison),
        )
    )
    for cost in costs:
        result.rows.append(
            Row(
                "https request cost",
                f"sink CPU per request of {BATCH} over {cost['http_version']}",
                cost["client_cpu_ms_per_request"],
                "ms",
                "",
                None,
                "",
                None,
                None,
                f"{cost['client_cpu_us_per_event']} us/event, {cost['events_per_s_wall']:.0f} ev/s "
                f"(one request at a time, {cost['body_bytes'] // 1024} KiB bodies)",
            )
        )
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "receive":
        receiver_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="bench.https_drain")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, nargs=2, metavar=("LARGE", "SMALL"))
    args = parser.parse_args()
    result = run(quick=args.quick, sizes=tuple(args.count) if args.count else None)  # type: ignore[arg-type]
    for row in result.rows:
        print(f"{row.scenario:24} {row.metric:50} {row.value} {row.unit} {row.target} {row.ok} {row.note}")
    print(f"written to {result.write(machine_info())}")


if __name__ == "__main__":
    main()
