"""Scenarios ``e2e`` (c) and ``idle`` (d): a real OPC UA server -> ``plantgate run`` -> mosquitto -> subscriber.

Four processes besides the harness: the OPC UA load server
(``bench.opcua_load_server``, 100 Double tags of kind ``telemetry``, no deadband),
the agent (``plantgate run -c``, OPC UA source with ``publishing_interval = "100ms"``,
MQTT sink), mosquitto, and the subscriber (``bench.subscriber`` in ``samples``
mode). Each tag's values are 1, 2, 3, ... so the subscriber knows exactly which
(tag, value) arrived how often: lost and duplicated are exact.

``e2e``: per rate, the server writes for ``warmup + measure`` seconds. Delivered/s
counts samples received in the steady window; latency is receive time minus the
sample's ``time`` (its OPC UA SourceTimestamp) for samples whose source time lies
in the steady window; the agent's CPU (``/proc/<pid>/stat``) and RSS are taken over
the steady window only. ``idle``: same set-up, values not changing, CPU over 20 s
after a 5 s settle.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    AgentProcess,
    Broker,
    CpuWindow,
    MemorySampler,
    Row,
    ScenarioResult,
    SubscriberProcess,
    SystemCpu,
    agent_config,
    check_config,
    free_port,
    memory_mb,
    percentile,
    start_profile,
    stop_process,
    summarize_profile,
    target_max,
    thread_cpu,
    thread_split,
    workdir,
)

TAGS = 100
RATES = (1_000, 5_000, 15_000)
# Targets (the foundation issue's floors): 0 lost and 0 duplicated at every rate, and
CPU_TARGET = {5_000: 0.1, 15_000: 0.25}  # agent cores
P99_5000_MS = 150  # latency p99 at 5,000 changes/s, source time to the subscriber
RSS_5000_MB = 80  # agent RSS at 5,000 changes/s
PEER = {  # ThingsBoard IoT Gateway 3.8.5 on the same kind of machine
    5_000: {"cpu": "0.41 core", "rss": "90 MB", "p99": "464 ms", "dup": ""},
    15_000: {"cpu": "0.78 core", "rss": "", "p99": "", "dup": "2.1 %"},
}


class LoadServer:
    """``python -m bench.opcua_load_server`` as a child process, its stdout read line by line."""

    def __init__(
        self, rate: float, seconds: float, hold: float, *, tags: int = TAGS, wait_go: bool = True, ready: float = 30
    ):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.opcua_load_server", "--rate", str(rate), "--seconds", str(seconds),
             "--tags", str(tags), "--hold", str(hold), *(["--wait-go"] if wait_go else [])],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, name="load-server-stdout", daemon=True).start()
        try:
            hello = self.next_line(ready)
        except BaseException:
            stop_process(self.proc, timeout=5)
            raise
        self.endpoint: str = hello["endpoint"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._lines.put(json.loads(raw))

    def next_line(self, timeout: float) -> dict[str, Any]:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the OPC UA load server said nothing within {timeout:g} s") from None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        self.send("quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        stop_process(self.proc, timeout=5)


class Setup:
    """Broker, load server, subscriber and agent for one run; ``close()`` stops them all by PID."""

    def __init__(self, tmp: Path, *, rate: float, seconds: float, hold: float, primed: bool = False):
        self.tmp = tmp
        self.broker = Broker(tmp / "mosquitto").start()
        self.server: LoadServer | None = None
        self.sub: SubscriberProcess | None = None
        self.agent: AgentProcess | None = None
        try:
            self.server = LoadServer(rate, seconds, hold)
            data_dir = tmp / "agent"
            http_port = free_port()
            config = tmp / "plantgate.toml"
            config.write_text(
                agent_config(
                    data_dir=data_dir,
                    http_port=http_port,
                    broker_port=self.broker.port,
                    opcua_endpoint=self.server.endpoint,
                    tags=TAGS,
                ),
                encoding="utf-8",
            )
            check_config(config)
            self.sub = SubscriberProcess(
                tmp, port=self.broker.port, topic="plantgate/bench/telemetry/#", mode="samples", deadline=seconds + 300
            ).start()
            if primed:
                # Run the agent once and stop it, so its sink cursors exist before the measured run.
                first = AgentProcess(config, http_port, tmp / "agent-prime.log").start()
                self.agent = first
                first.wait_running(timeout=60)
                first.wait_connected(timeout=30)
                time.sleep(0.5)
                first.stop()
            self.agent = AgentProcess(config, http_port, tmp / "agent.log").start()
            self.agent.wait_running(timeout=60)
            self.agent.wait_connected(timeout=30)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        if self.sub is not None:
            self.sub.kill()
        if self.server is not None:
            self.server.stop()
        self.broker.stop()


def e2e_once(
    rate: int, *, warmup: float, measure: float, profile: bool = False, primed: bool = False
) -> dict[str, Any]:
    """One rate of scenario (c); every raw figure."""
    with workdir(f"e2e-{rate}") as tmp:
        setup = Setup(tmp, rate=rate, seconds=warmup + measure, hold=120, primed=primed)
        try:
            assert setup.agent is not None and setup.sub is not None and setup.server is not None
            agent, sub, server = setup.agent, setup.sub, setup.server
            # The initial values (0) of every tag arrive first: the path is up end to end.
            with contextlib.suppress(TimeoutError):
                _wait_progress(sub, lambda p: p.get("messages", 0) >= 1, 15)
            time.sleep(1.0)
            others = {"server": server.pid, "mosquitto": setup.broker.pid, "subscriber": sub.pid}
            sampler = MemorySampler(agent.pid, 0.5).start()
            wall_go = time.time()
            server.send("go")
            time.sleep(warmup)
            t_start, wall_start = time.monotonic(), time.time()
            window = CpuWindow(agent.pid).start()
            threads_start = thread_cpu(agent.pid)
            delivery_start = _delivery_latency(agent)
            buckets_start = _delivery_buckets(agent)
            machine = SystemCpu().start()
            other_windows = {name: CpuWindow(pid).start() for name, pid in others.items() if pid}
            prof = start_profile(agent.pid, measure, tmp / "profile.txt") if profile else None
            time.sleep(measure)
            window.stop()
            threads = thread_split(agent.pid, threads_start, thread_cpu(agent.pid), window.wall)
            machine.stop()
            for w in other_windows.values():
                w.stop()
            t_end, wall_end = time.monotonic(), time.time()
            delivery_end = _delivery_latency(agent)
            buckets_end = _delivery_buckets(agent)
            rss_end, hwm = memory_mb(agent.pid)
            written = server.next_line(timeout=warmup + measure + 60)
            sub.wait_items(int(written["written"]), idle=5, timeout=60)
            status = _settled_status(agent)
            log_tail = agent.log_tail(3000)
            result = sub.finish()
            samples = sampler.stop()
            profile_summary: dict[str, Any] = {}
            if prof is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    prof.wait(timeout=30)
                stop_process(prof, timeout=5)
                profile_summary = summarize_profile(tmp / "profile.txt")
        finally:
            setup.close()
        rss_window = [rss for t, rss in samples if t_start <= t <= t_end]
        figures = _sample_figures(result, rounds=int(written["rounds"]), start=wall_start, end=wall_end)
        figures.update(
            {
                "rate_requested": rate,
                "server": written,
                "warmup_seconds": warmup,
                "measure_seconds": round(wall_end - wall_start, 3),
                "go_to_window_seconds": round(wall_start - wall_go, 3),
                "cpu_cores": round(window.cores, 4),
                "cpu_seconds": round(window.cpu, 3),
                "cpu_by_thread": threads,
                "rss_mb": round(max(rss_window), 1) if rss_window else round(rss_end, 1),
                "rss_end_mb": round(rss_end, 1),
                "rss_min_window_mb": round(min(rss_window), 1) if rss_window else None,
                "vmhwm_mb": round(hwm, 1),
                "other_processes_cores": {name: round(w.cores, 3) for name, w in other_windows.items()},
                "machine_busy_cores": round(machine.cores, 3),
                "machine_pressure": machine.pressure,
                "agent_delivery_latency_mean_ms": _mean_between(delivery_start, delivery_end),
                "agent_delivery_latency_buckets_s": _bucket_counts(buckets_start, buckets_end),
                "agent_status_end": status,
                "agent_log_tail": log_tail,
                "profiled": profile,
                "primed": primed,
            }
        )  # fmt: skip
        if profile_summary:
            figures["profile"] = profile_summary
        return figures


def _delivery_buckets(agent: AgentProcess) -> dict[str, float]:
    return agent.histogram("plantgate_delivery_latency_seconds", sink="bench", lane="telemetry")


def _bucket_counts(start: dict[str, float], end: dict[str, float]) -> dict[str, int]:
    """Events per latency bucket (non-cumulative, ``<= le`` seconds) acknowledged between two readings."""
    out: dict[str, int] = {}
    previous = 0.0
    for le in sorted(end, key=lambda b: float("inf") if b == "+Inf" else float(b)):
        cumulative = end[le] - start.get(le, 0.0)
        count = int(cumulative - previous)
        previous = cumulative
        if count:
            out[f"<= {le}"] = count
    return out


def _delivery_latency(agent: AgentProcess) -> tuple[float, float] | None:
    """(sum, count) of the agent's buffer-to-PUBACK latency histogram for telemetry."""
    total = agent.metric("plantgate_delivery_latency_seconds_sum", sink="bench", lane="telemetry")
    count = agent.metric("plantgate_delivery_latency_seconds_count", sink="bench", lane="telemetry")
    return None if total is None or count is None else (total, count)


def _mean_between(start: tuple[float, float] | None, end: tuple[float, float] | None) -> float | None:
    """Mean latency (ms) of the events acknowledged between two histogram readings."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]) * 1000, 1)


def _settled_status(agent: AgentProcess, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's /status once every sink's depth is 0 (or after ``timeout``), trimmed to the useful parts."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = agent.status() or {}
        if doc and all(sink["depth"] == 0 for sink in doc["sinks"].values()):
            break
        time.sleep(0.2)
    sources: dict[str, Any] = doc.get("sources", {})
    return {
        "buffer": doc.get("buffer"),
        "sinks": {name: {"state": s["state"], "lanes": s["lanes"]} for name, s in doc.get("sinks", {}).items()},
        "sources": {name: {"state": s["state"], "degraded": s["degraded"]} for name, s in sources.items()},
    }


def _wait_progress(sub: SubscriberProcess, cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond(sub.progress()):
        if time.monotonic() > deadline:
            raise TimeoutError("subscriber progress")
        time.sleep(0.05)


def _sample_figures(result: dict[str, Any], *, rounds: int, start: float, end: float) -> dict[str, Any]:
    """Lost, duplicated, delivered/s and latency from the subscriber's raw result."""
    tags: dict[int, bytes] = result.get("tags", {})
    lost = duplicates = unexpected = 0
    missing_tags = 0
    for tag in range(TAGS):
        counts = tags.get(tag)
        if counts is None:
            missing_tags += 1
            lost += rounds
            continue
        lost += rounds - sum(1 for c in counts[1 : rounds + 1] if c)
        duplicates += sum(c - 1 for c in counts if c > 1)
        unexpected += sum(1 for c in counts[rounds + 1 :] if c)
    source = result.get("source_times", [])
    receive = result.get("receive_times", [])
    span = end - start
    delivered_in_window = sum(1 for r in receive if start <= r < end)
    written_in_window = sum(1 for s in source if start <= s < end)
    latencies = [(r - s) * 1000 for s, r in zip(source, receive, strict=True) if start <= s < end]
    # Per second of source time in the window: how many samples and their worst latency (to spot stalls).
    buckets: dict[int, list[float]] = {}
    for s, r in zip(source, receive, strict=True):
        if start <= s < end:
            buckets.setdefault(int(s - start), []).append((r - s) * 1000)
    timeline = [
        {"second": sec, "samples": len(values), "p50_ms": _round(percentile(values, 50)), "max_ms": _round(max(values))}
        for sec, values in sorted(buckets.items())
    ]
    return {
        "written_total": rounds * TAGS,
        "received_samples": result.get("items", 0),
        "received_messages": result.get("messages", 0),
        "initial_samples": result.get("initial", 0),
        "lost": lost,
        "duplicates": duplicates,
        "unexpected_values": unexpected,
        "tags_never_seen": missing_tags,
        "undecodable": result.get("undecodable", 0),
        "delivered_per_s": round(delivered_in_window / span, 1) if span > 0 else None,
        "written_per_s_in_window": round(written_in_window / span, 1) if span > 0 else None,
        "samples_per_message": round(result.get("items", 0) / max(1, result.get("messages", 1)), 1),
        "latency_ms": {
            "count": len(latencies),
            "p50": _round(percentile(latencies, 50)),
            "p90": _round(percentile(latencies, 90)),
            "p99": _round(percentile(latencies, 99)),
            "max": _round(max(latencies) if latencies else None),
            "min": _round(min(latencies) if latencies else None),
        },
        "latency_timeline": timeline,
    }


def _bucket_above(label: str, seconds: float) -> bool:
    """True for a ``"<= le"`` bucket whose lower bound is at least ``seconds`` (i.e. ``le > seconds``)."""
    le = label.removeprefix("<= ")
    return le == "+Inf" or float(le) > seconds


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def run(quick: bool = False, profile: bool = False, primed: bool = False) -> ScenarioResult:
    """Scenario (c) at every rate of ``RATES``."""
    warmup, measure = (3.0, 5.0) if quick else (5.0, 22.0)
    result = ScenarioResult("e2e", "OPC UA (100 telemetry tags) -> agent -> mosquitto QoS 1 -> subscriber", quick=quick)
    runs = []
    for rate in RATES:
        figures = e2e_once(rate, warmup=warmup, measure=measure, profile=profile, primed=primed)
        runs.append(figures)
        result.rows.extend(_rows(rate, figures))
    result.figures = {"runs": runs, "tags": TAGS, "publishing_interval": "100ms"}
    return result


def _rows(rate: int, f: dict[str, Any]) -> list[Row]:
    peer = PEER.get(rate, {})
    lat = f["latency_ms"]
    name = f"c e2e {rate:,}/s"
    server_cores = f["other_processes_cores"].get("server", 0.0)
    slow = sum(n for le, n in f["agent_delivery_latency_buckets_s"].items() if _bucket_above(le, 0.1))
    exact_ok = f["lost"] == 0 and f["duplicates"] == 0 and f["tags_never_seen"] == 0
    rows = [
        Row(
            name, "delivered/s", f["delivered_per_s"], "/s", f"written {f['server']['rate']:,.0f}/s", None,
            "", f["cpu_cores"], f["rss_mb"],
            f"write rate in window {f['written_per_s_in_window']:,.0f}/s (server late max "
            f"{f['server']['late_max_ms']:.0f} ms); {f['samples_per_message']:.0f} samples/msg; "
            f"machine busy {f['machine_busy_cores']:.2f} cores (server {server_cores:.2f}), "
            f"I/O stall {_share(f['machine_pressure'].get('io_some_share'))}",
        ),
        Row(name, "lost / duplicated", f["lost"] + f["duplicates"], "samples", "0 / 0", exact_ok, peer.get("dup", ""),
            note=f"lost {f['lost']}, dup {f['duplicates']} of {f['written_total']:,}"),
        Row(name, "latency p50 / p99", lat["p99"], "ms p99", f"p99 <= {P99_5000_MS}" if rate == 5_000 else "",
            target_max(lat["p99"], P99_5000_MS) if rate == 5_000 else None, peer.get("p99", ""),
            note=f"p50 {lat['p50']} ms, p90 {lat['p90']} ms, max {lat['max']} ms; "
            f"in agent buffer->PUBACK mean {f['agent_delivery_latency_mean_ms']} ms, {slow} events > 100 ms"),
    ]  # fmt: skip
    split = f["cpu_by_thread"]
    cpu_note = (
        f"event loop thread {split['main_thread_cores']:.3f}, other threads (SQLite) {split['other_threads_cores']:.3f}"
    )
    if rate == 5_000:
        rows.append(Row(name, "agent CPU", f["cpu_cores"], "cores", f"<= {CPU_TARGET[rate]}",
                        target_max(f["cpu_cores"], CPU_TARGET[rate]),
                        peer.get("cpu", ""), note=cpu_note))  # fmt: skip
        rows.append(Row(name, "agent RSS", f["rss_mb"], "MB", f"<= {RSS_5000_MB}", target_max(f["rss_mb"], RSS_5000_MB),
                        peer.get("rss", ""), note=f"VmHWM {f['vmhwm_mb']:.1f} MB"))  # fmt: skip
    elif rate == 15_000:
        rows.append(Row(name, "agent CPU", f["cpu_cores"], "cores", f"<= {CPU_TARGET[rate]}",
                        target_max(f["cpu_cores"], CPU_TARGET[rate]),
                        peer.get("cpu", ""), note=cpu_note))  # fmt: skip
    else:
        rows.append(Row(name, "agent CPU", f["cpu_cores"], "cores", "", None, "", rss_mb=f["rss_mb"], note=cpu_note))
    return rows


# --- idle ------------------------------------------------------------------------------------------------------


def idle_once(settle: float, measure: float, primed: bool = False) -> dict[str, Any]:
    """Scenario (d): the agent connected to a server whose values do not change."""
    with workdir("idle") as tmp:
        setup = Setup(tmp, rate=0, seconds=0, hold=settle + measure + 120, primed=primed)
        try:
            assert setup.agent is not None and setup.server is not None
            agent = setup.agent
            setup.server.send("go")
            time.sleep(settle)
            window = CpuWindow(agent.pid).start()
            sampler = MemorySampler(agent.pid, 1.0).start()
            time.sleep(measure)
            window.stop()
            samples = sampler.stop()
            rss_end, hwm = memory_mb(agent.pid)
            status = agent.status() or {}
        finally:
            setup.close()
    return {
        "settle_seconds": settle,
        "measure_seconds": round(window.wall, 3),
        "cpu_cores": round(window.cores, 4),
        "cpu_seconds": round(window.cpu, 3),
        "rss_mb": round(max((rss for _, rss in samples), default=rss_end), 1),
        "rss_end_mb": round(rss_end, 1),
        "vmhwm_mb": round(hwm, 1),
        "sources": {k: v["state"] for k, v in status.get("sources", {}).items()},
        "sinks": {k: {"state": v["state"], "lanes": v["lanes"]} for k, v in status.get("sinks", {}).items()},
        "primed": primed,
    }


def run_idle(quick: bool = False, primed: bool = False) -> ScenarioResult:
    """Scenario (d)."""
    settle, measure = (2.0, 5.0) if quick else (5.0, 20.0)
    f = idle_once(settle, measure, primed=primed)
    result = ScenarioResult("idle", "idle: OPC UA source connected, values unchanged, MQTT sink connected", quick=quick)
    result.figures = f
    result.rows.append(
        Row("d idle", "agent CPU", f["cpu_cores"], "cores", "<= 0.01", target_max(f["cpu_cores"], 0.01), "",
            f["cpu_cores"], f["rss_mb"], f"over {f['measure_seconds']:.0f} s after {settle:g} s settle")
    )  # fmt: skip
    return result
