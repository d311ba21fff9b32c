"""Scenario ``journal``: what the delivery journal costs, and how fast it answers.

(a) **End to end at 5,000 changes/s**, journal on and off: the ``e2e`` chain
(``bench.opcua_load_server`` -> ``plantgate run`` -> mosquitto) with 100 tags, of
which 10 are counters each firing a ``production.completed`` transaction rule on
every increment: 500 transactions/s among 4,500 telemetry changes/s. The agent's
CPU over the measured window, and per transaction; off and on alternately, twice
(once with ``--quick``), summed per state.

(b) **Transaction drain**, journal on and off: the in-process ingest of N
transactions through a real ``Buffer`` (as ``ingest`` does: groups of 500, every
commit awaited), then ``plantgate run`` with one MQTT sink (QoS 1, lane
``transaction``) draining them: CPU per transaction of each half.

(c) **Trace on a 1,000,000-event journal**: built through a real ``Buffer`` as the
agent does it (groups of 1,000 appended, each batch acknowledged by a sink through
its cursor), 100 work orders; the time of ``Buffer.trace(work order)`` (its first
1,000 events), of ``Buffer.trace(id)``, and of what ``plantgate trace`` does on a
stopped agent's file (open read-only, trace, close), plus the CLI itself as a
process; where the time goes (cProfile of the traces).

Target: the journal costs at most 10 % more CPU per transaction (a, b); a trace
answers in under 100 ms (c).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import pstats
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec

from agent.sink import ACKED
from bench.common import (
    PLANTGATE,
    AgentProcess,
    Broker,
    CpuWindow,
    Row,
    ScenarioResult,
    agent_config,
    check_config,
    free_port,
    target_max,
    thread_cpu,
    thread_split,
    workdir,
)
from bench.e2e import LoadServer
from bench.ingest import append_timed, transaction, transactions
from buffer import Buffer

RATE = 5_000
TAGS = 100
COUNTERS = 10  # tags load.t090 .. load.t099: counters, each increment a transaction
SINK = "bench"
MAX_RATIO = 1.10  # the journal may cost at most 10 % more CPU per transaction
TRACE_MS = 100.0
WORK_ORDERS = 100


def _config(
    data_dir: Path,
    http_port: int,
    broker_port: int,
    *,
    journal: bool,
    endpoint: str | None = None,
    lanes: tuple[str, ...] = ("transaction", "operational", "telemetry"),
) -> str:
    """The bench agent's config, with ``COUNTERS`` transaction rules when it reads the load server."""
    text = agent_config(
        data_dir=data_dir, http_port=http_port, broker_port=broker_port, lanes=lanes, opcua_endpoint=endpoint,
        tags=TAGS - COUNTERS if endpoint else 0,
    )  # fmt: skip
    if endpoint is not None:
        counters = []
        for i in range(TAGS - COUNTERS, TAGS):
            counters += [
                "  [[sources.opcua.tags]]",
                f'  tag = "load.t{i:03d}"',
                f'  node = "ns=2;s=Load.T{i:03d}"',
                '  kind = "counter"',
                "",
            ]
        head, sinks = text.split("[[sinks.mqtt]]", 1)
        text = head + "\n".join(counters) + "\n[[sinks.mqtt]]" + sinks
        for i in range(TAGS - COUNTERS, TAGS):
            text += "\n".join([
                "",
                "[[transactions]]",
                f'name = "count-{i:03d}"',
                f'when = "load.t{i:03d}"',
                'on = "increment"',
                'type = "production.completed"',
                f'fields = {{ work_order = {{ literal = "WO-{i:03d}" }}, quantity = "load.t{i:03d}" }}',
                'uom = "pcs"',
                "",
            ])  # fmt: skip
    return text + f"\n[journal]\nenabled = {'true' if journal else 'false'}\n"


# --- (a) end to end ----------------------------------------------------------------------------------------


def e2e_once(journal: bool, *, warmup: float, measure: float) -> dict[str, Any]:
    """The 5,000 changes/s chain with 10 % transactions; the agent's CPU over the measured window."""
    with workdir(f"journal-e2e-{'on' if journal else 'off'}") as tmp:
        broker = Broker(tmp / "mosquitto").start()
        server: LoadServer | None = None
        agent: AgentProcess | None = None
        try:
            server = LoadServer(RATE, warmup + measure, hold=120)
            http_port = free_port()
            config = tmp / "plantgate.toml"
            config.write_text(
                _config(tmp / "agent", http_port, broker.port, journal=journal, endpoint=server.endpoint),
                encoding="utf-8",
            )
            check_config(config)
            agent = AgentProcess(config, http_port, tmp / "agent.log").start()
            agent.wait_running(timeout=60)
            agent.wait_connected(timeout=30)
            time.sleep(1.0)
            server.send("go")
            time.sleep(warmup)
            received_start = _transactions_received(agent)
            window = CpuWindow(agent.pid).start()
            threads_start = thread_cpu(agent.pid)
            time.sleep(measure)
            window.stop()
            threads = thread_split(agent.pid, threads_start, thread_cpu(agent.pid), window.wall)
            received = _transactions_received(agent) - received_start
            status = agent.status() or {}
            written = server.next_line(timeout=warmup + measure + 60)
        finally:
            if agent is not None:
                agent.stop()
            if server is not None:
                server.stop()
            broker.stop()
    per_s = received / window.wall if window.wall > 0 else 0.0
    return {
        "journal": journal,
        "measure_seconds": round(window.wall, 3),
        "cpu_cores": round(window.cores, 4),
        "cpu_by_thread": threads,
        "transactions": received,
        "transactions_per_s": round(per_s, 1),
        "cpu_us_per_transaction": round(window.cpu / received * 1e6, 1) if received else None,
        "server": written,
        "journal_status": (status.get("buffer") or {}).get("journal"),
    }


def _transactions_received(agent: AgentProcess) -> float:
    return agent.metric("plantgate_events_received_total", source="load", lane="transaction") or 0.0


# --- (b) transaction drain -------------------------------------------------------------------------------


async def _fill(path: Path, count: int, journal: bool) -> dict[str, Any]:
    buffer = Buffer(path, journal=journal)
    await buffer.open()
    try:
        buffer.cursor(SINK, ["transaction"])
        await buffer.commit_now()
        groups = list(transactions(0, count))
        wall, window = await append_timed(buffer, groups)
        return {
            "events": count,
            "seconds": round(wall, 3),
            "events_per_s": round(count / wall, 1),
            "cpu_seconds": round(window.cpu, 3),
            "cpu_us_per_event": round(window.cpu / count * 1e6, 2),
        }
    finally:
        await buffer.close()


def drain_once(count: int, journal: bool) -> dict[str, Any]:
    """Fill ``count`` transactions (timed, in process), then drain them with ``plantgate run`` (timed)."""
    with workdir(f"journal-drain-{'on' if journal else 'off'}") as tmp:
        data_dir = tmp / "agent"
        data_dir.mkdir()
        fill = asyncio.run(_fill(data_dir / "buffer.db", count, journal))
        broker = Broker(tmp / "mosquitto").start()
        agent: AgentProcess | None = None
        try:
            http_port = free_port()
            config = tmp / "plantgate.toml"
            config.write_text(
                _config(data_dir, http_port, broker.port, journal=journal, lanes=("transaction",)), encoding="utf-8"
            )
            check_config(config)
            agent = AgentProcess(config, http_port, tmp / "agent.log").start()
            agent.wait_running(timeout=120)
            window = CpuWindow(agent.pid).start()
            depth = count
            deadline = time.monotonic() + max(60.0, count / 2_000)
            while depth > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
                status = agent.status()
                if status is not None:
                    depth = int(status["sinks"][SINK]["depth"])
            window.stop()
            status = agent.status() or {}
        finally:
            if agent is not None:
                agent.stop()
            broker.stop()
    return {
        "journal": journal,
        "fill": fill,
        "drained": depth == 0,
        "drain_seconds": round(window.wall, 3),
        "drain_events_per_s": round(count / window.wall, 1) if depth == 0 else None,
        "drain_cpu_seconds": round(window.cpu, 3),
        "drain_cpu_us_per_event": round(window.cpu / count * 1e6, 2),
        "journal_status": (status.get("buffer") or {}).get("journal"),
    }


# --- (c) trace on a large journal --------------------------------------------------------------------------


async def _build(path: Path, count: int) -> dict[str, Any]:
    """``count`` transactions over ``WORK_ORDERS`` work orders, appended and acknowledged as the agent does."""
    from datetime import UTC, datetime

    started = time.perf_counter()
    base = datetime(2025, 1, 1, tzinfo=UTC)
    buffer = Buffer(path, journal_max_size_mb=4096)
    await buffer.open()
    try:
        cursor = buffer.cursor(SINK, ["transaction"])
        await buffer.commit_now()
        for first in range(0, count, 1000):
            group = []
            for index in range(first, min(first + 1000, count)):
                event = transaction(index, base)
                event.data["work_order"] = f"WO-{index % WORK_ORDERS:03d}"
                group.append(event)
            await buffer.wait_writable()
            await buffer.append(group)
            while cursor.depth():
                batch = await cursor.next_batch(500, wait=False)
                cursor.settle(batch, [ACKED] * len(batch))
        await buffer.commit_now()
        await buffer.maintain()
        stats = buffer.journal_stats()
        file_mb = buffer.file_bytes / 1e6
    finally:
        await buffer.close()
    return {"seconds": round(time.perf_counter() - started, 1), "journal": stats, "file_mb": round(file_mb, 1)}


async def _time_traces(path: Path, keys: dict[str, str], rounds: int) -> dict[str, Any]:
    """Median and max milliseconds of ``Buffer.trace`` per key on an open (read-only) buffer, and profiles."""
    buffer = Buffer(path)
    await buffer.open(readonly=True)
    out: dict[str, Any] = {}
    try:
        for name, key in keys.items():
            times = []
            found = 0
            for _ in range(rounds):
                t0 = time.perf_counter()
                entries = await buffer.trace(key)
                times.append((time.perf_counter() - t0) * 1000)
                found = len(entries)
            profiler = cProfile.Profile()
            profiler.enable()
            await buffer.trace(key)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(12)
            out[name] = {"key": key, "entries": found, "median_ms": round(statistics.median(times), 2),
                         "max_ms": round(max(times), 2), "profile": text.getvalue()[-3000:]}  # fmt: skip
    finally:
        await buffer.close()
    return out


async def _cli_equivalent(path: Path, key: str, rounds: int) -> dict[str, float]:
    """What ``plantgate trace`` does on a stopped agent's file: open read-only, trace, to JSON values, close."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        buffer = Buffer(path)
        await buffer.open(readonly=True)
        try:
            msgspec.to_builtins(await buffer.trace(key))
        finally:
            await buffer.close()
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


def trace_once(count: int, rounds: int) -> dict[str, Any]:
    with workdir("journal-trace") as tmp:
        data_dir = tmp / "agent"
        data_dir.mkdir()
        path = data_dir / "buffer.db"
        build = asyncio.run(_build(path, count))
        middle = count // 2
        keys = {"work_order": "WO-042", "id": f"00000000-0000-4000-8000-{middle:012d}"}
        traces = asyncio.run(_time_traces(path, keys, rounds))
        cli_equivalent = asyncio.run(_cli_equivalent(path, keys["work_order"], rounds))
        config = tmp / "plantgate.toml"
        config.write_text(_config(data_dir, free_port(), free_port(), journal=True), encoding="utf-8")
        t0 = time.perf_counter()
        process = subprocess.run(
            [str(PLANTGATE), "trace", keys["work_order"], "--json", "-c", str(config)],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        cli_ms = (time.perf_counter() - t0) * 1000
        cli_entries = len(msgspec.json.decode(process.stdout).get("entries", [])) if process.returncode == 0 else 0
    return {"events": count, "work_orders": WORK_ORDERS, "build": build, "traces": traces,
            "cli_equivalent": cli_equivalent, "cli_process_ms": round(cli_ms, 1), "cli_entries": cli_entries,
            "cli_exit": process.returncode}  # fmt: skip


# --- the scenario -----------------------------------------------------------------------------------------


def _combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one state as one: CPU and transactions summed over their windows; the runs kept."""
    cpu_s = sum(run["cpu_cores"] * run["measure_seconds"] for run in runs)
    seconds = sum(run["measure_seconds"] for run in runs)
    transactions = sum(run["transactions"] for run in runs)
    return {
        **runs[-1],
        "measure_seconds": round(seconds, 3),
        "cpu_cores": round(cpu_s / seconds, 4) if seconds else 0.0,
        "transactions": transactions,
        "transactions_per_s": round(transactions / seconds, 1) if seconds else 0.0,
        "cpu_us_per_transaction": round(cpu_s / transactions * 1e6, 1) if transactions else None,
        "runs": runs,
    }


def _ratio(on: float | None, off: float | None) -> float | None:
    return round(on / off, 3) if on and off else None


def run(quick: bool = False) -> ScenarioResult:
    """Scenario ``journal``; see the module docstring."""
    result = ScenarioResult("journal", "the delivery journal: its cost per transaction and trace times", quick=quick)
    warmup, measure = (3.0, 8.0) if quick else (5.0, 20.0)
    drain_count = 20_000 if quick else 200_000
    trace_count = 100_000 if quick else 1_000_000
    # Off and on alternately, twice (once with --quick): a shared machine's drift hits both alike.
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(1 if quick else 2):
        for state in ("off", "on"):
            runs[state].append(e2e_once(state == "on", warmup=warmup, measure=measure))
    e2e = {state: _combined(found) for state, found in runs.items()}
    drain = {state: drain_once(drain_count, state == "on") for state in ("off", "on")}
    trace = trace_once(trace_count, rounds=3 if quick else 7)
    result.figures = {"e2e": e2e, "drain": drain, "trace": trace}

    per_tx = {state: e2e[state]["cpu_us_per_transaction"] for state in e2e}
    ratio = _ratio(per_tx["on"], per_tx["off"])
    pairs = ", ".join(
        str(_ratio(on["cpu_us_per_transaction"], off["cpu_us_per_transaction"]))
        for off, on in zip(runs["off"], runs["on"], strict=True)
    )
    result.rows.append(Row(
        "journal e2e 5,000/s", "CPU per transaction on/off", ratio, "x", f"<= {MAX_RATIO}",
        target_max(ratio, MAX_RATIO), "", e2e["on"]["cpu_cores"], None,
        f"on {per_tx['on']} us ({e2e['on']['cpu_cores']:.3f} cores), off {per_tx['off']} us "
        f"({e2e['off']['cpu_cores']:.3f} cores); {e2e['on']['transactions_per_s']:.0f} transactions/s; "
        f"each pair: {pairs}",
    ))  # fmt: skip
    fill = {state: drain[state]["fill"]["cpu_us_per_event"] for state in drain}
    ratio = _ratio(fill["on"], fill["off"])
    result.rows.append(Row(
        f"journal ingest {drain_count:,}", "CPU per transaction on/off", ratio, "x", f"<= {MAX_RATIO}",
        target_max(ratio, MAX_RATIO), "", None, None,
        f"on {fill['on']} us ({drain['on']['fill']['events_per_s']:,.0f}/s), "
        f"off {fill['off']} us ({drain['off']['fill']['events_per_s']:,.0f}/s); in process, groups of 500",
    ))  # fmt: skip
    cost = {state: drain[state]["drain_cpu_us_per_event"] for state in drain}
    ratio = _ratio(cost["on"], cost["off"])
    result.rows.append(Row(
        f"journal drain {drain_count:,}", "CPU per transaction on/off", ratio, "x", f"<= {MAX_RATIO}",
        target_max(ratio, MAX_RATIO), "", None, None,
        f"on {cost['on']} us ({drain['on']['drain_events_per_s']}/s), off {cost['off']} us "
        f"({drain['off']['drain_events_per_s']}/s); MQTT QoS 1",
    ))  # fmt: skip
    for name, figures in trace["traces"].items():
        result.rows.append(Row(
            f"journal trace {trace_count:,}", f"Buffer.trace({name})", figures["median_ms"], "ms",
            f"< {TRACE_MS:g}", target_max(figures["max_ms"], TRACE_MS), "", None, None,
            f"{figures['entries']} entries; max {figures['max_ms']} ms",
        ))  # fmt: skip
    cli = trace["cli_equivalent"]
    result.rows.append(Row(
        f"journal trace {trace_count:,}", "plantgate trace (open, trace, close)", cli["median_ms"], "ms",
        f"< {TRACE_MS:g}", target_max(cli["max_ms"], TRACE_MS), "", None, None,
        f"the CLI as a process: {trace['cli_process_ms']} ms with interpreter start ({trace['cli_entries']} entries)",
    ))  # fmt: skip
    return result


if __name__ == "__main__":
    import sys

    from bench.common import machine_info

    outcome = run(quick="--quick" in sys.argv)
    for row in outcome.rows:
        print(row)
    with contextlib.suppress(OSError):
        print(outcome.write(machine_info()))
