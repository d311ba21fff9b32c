"""Scenario ``drain`` (b): a backlog of transaction events drained to a local mosquitto at QoS 1.

For each backlog size: a buffer is filled (not timed) with canonical
``production.completed`` events for a sink named ``bench`` (its cursor is created
first, so the backlog belongs to it), then ``plantgate run -c`` starts as a
subprocess with no sources and one MQTT sink (lane ``transaction``). The agent
process alone is measured: CPU from ``/proc/<pid>/stat`` over the drain window
(from /status answering ``running`` until ``sinks.bench.depth`` is 0), RSS from
``/proc/<pid>/status`` sampled every 0.25 s. A separate paho subscriber (QoS 1)
counts every event by id, so lost and duplicated events are exact.

Run with two backlog sizes to show that RSS does not grow with the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
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
    start_profile,
    stop_process,
    summarize_profile,
    target_max,
    target_min,
    thread_cpu,
    thread_split,
    workdir,
)
from bench.ingest import transactions
from buffer import Buffer

SINK = "bench"
# paho-mqtt through its public API costs 35-40 us of agent CPU per QoS 1 event; on two cores shared
# with mosquitto and the subscriber that leaves room for 15-20k events/s.
TARGET = 15_000
RSS_GROWTH_LIMIT_MB = 10.0  # "flat" (the bench's own threshold): large-backlog RSS within this of the small one


async def fill(path: Path, count: int) -> float:
    """Append ``count`` transaction events for sink ``bench``; returns the seconds it took."""
    t0 = time.monotonic()
    buffer = Buffer(path)
    await buffer.open()
    try:
        buffer.cursor(SINK, ["transaction"])  # the backlog belongs to this sink (a new cursor starts at the head)
        await buffer.commit_now()
        futures = []
        for group in transactions(0, count, group=1000):
            await buffer.wait_writable()
            futures.append(buffer.append(group))
            if len(futures) >= 50:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await buffer.close()
    return time.monotonic() - t0


def drain_once(count: int, *, quick: bool, profile: bool = False, subscriber: bool = True) -> dict[str, Any]:
    """Fill a backlog of ``count`` events, start the agent, time the drain; every figure of one run.

    ``subscriber=False`` drains to a broker nobody subscribes to (a diagnostic: the agent
    without the subscriber's CPU on the same machine; nothing is verified then).
    """
    with workdir(f"drain-{count}") as tmp:
        data_dir = tmp / "agent"
        data_dir.mkdir()
        fill_s = asyncio.run(fill(data_dir / "buffer.db", count))
        file_mb = (data_dir / "buffer.db").stat().st_size / 1e6
        broker = Broker(tmp / "mosquitto").start()
        sub: SubscriberProcess | None = None
        agent: AgentProcess | None = None
        try:
            http_port = free_port()
            config = tmp / "plantgate.toml"
            config.write_text(
                agent_config(data_dir=data_dir, http_port=http_port, broker_port=broker.port, lanes=["transaction"]),
                encoding="utf-8",
            )
            check_config(config)
            deadline = max(60.0, count / 2_000)
            if subscriber:
                sub = SubscriberProcess(
                    tmp, port=broker.port, topic="plantgate/bench/transaction/#", mode="ids", expected=count,
                    deadline=deadline + 120,
                ).start()  # fmt: skip
            agent = AgentProcess(config, http_port, tmp / "agent.log").start()
            spawn = time.monotonic()
            startup_cpu = CpuWindow(agent.pid).start()
            sampler = MemorySampler(agent.pid, 0.25).start()
            doc = agent.wait_running(timeout=120)
            t_running = time.monotonic()
            startup_cpu.stop()
            rss_start, _ = memory_mb(agent.pid)
            depth_start = int(doc["sinks"][SINK]["depth"])
            window = CpuWindow(agent.pid).start()
            threads_start = thread_cpu(agent.pid)
            others = {"mosquitto": broker.pid, "subscriber": sub.pid if sub else None}
            other_windows = {name: CpuWindow(pid).start() for name, pid in others.items() if pid}
            machine = SystemCpu().start()
            prof = start_profile(agent.pid, min(15.0, count / 40_000), tmp / "profile.txt") if profile else None
            timeline: list[tuple[float, int]] = [(0.0, depth_start)]
            depth = depth_start
            end = t_running + deadline
            while depth > 0 and time.monotonic() < end:
                time.sleep(0.2)
                status = agent.status()
                if status is not None:
                    depth = int(status["sinks"][SINK]["depth"])
                    timeline.append((round(time.monotonic() - t_running, 3), depth))
            t_empty = time.monotonic()
            window.stop()
            threads = thread_split(agent.pid, threads_start, thread_cpu(agent.pid), window.wall)
            machine.stop()
            for other in other_windows.values():
                other.stop()
            rss_end, hwm = memory_mb(agent.pid)
            drained = depth == 0
            result: dict[str, Any] = {}
            if sub is not None:
                sub.wait_items(count, idle=10, timeout=max(60.0, count / 5_000))
                result = sub.finish()
            samples = sampler.stop()
            stop_code = agent.stop()
            profile_summary = _finish_profile(prof, tmp / "profile.txt")
        finally:
            if sub is not None:
                sub.kill()
            if agent is not None:
                agent.stop()
            broker.stop()
        drain_s = t_empty - t_running
        rss_drain = [rss for t, rss in samples if t_running <= t <= t_empty]
        return {
            "backlog": count,
            "fill_seconds": round(fill_s, 2),
            "buffer_file_mb": round(file_mb, 1),
            "startup_seconds": round(t_running - spawn, 3),
            "startup_cpu_seconds": round(startup_cpu.cpu, 2),
            "drained": drained,
            "depth_start": depth_start,
            "depth_end": depth,
            "drain_seconds": round(drain_s, 3),
            "events_per_s": round(depth_start / drain_s, 1) if drain_s > 0 and drained else None,
            "events_per_s_including_startup": round(count / (t_empty - spawn), 1) if drained else None,
            "cpu_cores": round(window.cores, 3),
            "cpu_seconds": round(window.cpu, 2),
            "cpu_by_thread": threads,
            "other_processes_cores": {name: round(w.cores, 3) for name, w in other_windows.items()},
            "machine_busy_cores": round(machine.cores, 3),
            "machine_pressure": machine.pressure,
            "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_max_during_drain_mb": round(max(rss_drain), 1) if rss_drain else None,
            "vmhwm_mb": round(hwm, 1),
            "rss_samples_mb": [round(rss, 1) for _, rss in samples[:: max(1, len(samples) // 60)]],
            "depth_timeline": timeline[:: max(1, len(timeline) // 60)],
            **(_verify(result, count) if subscriber else {"verified": False}),
            "agent_exit_code": stop_code,
            "quick": quick,
            **({"profile": profile_summary} if profile_summary else {}),
        }


def _verify(result: dict[str, Any], count: int) -> dict[str, Any]:
    """Lost and duplicated events by id from the subscriber's counts."""
    counts: bytes = result["counts"]
    seen = sum(1 for c in counts[:count] if c)
    span = (result["last_receive"] or 0) - (result["first_receive"] or 0)
    return {
        "verified": True,
        "subscriber_messages": result["messages"],
        "subscriber_distinct": seen,
        "lost": count - seen,
        "duplicates": sum(c - 1 for c in counts if c > 1),
        "unexpected_ids": sum(1 for c in counts[count:] if c),
        "subscriber_undecodable": result["undecodable"],
        "subscriber_span_seconds": round(span, 3),
        "subscriber_events_per_s": round(result["items"] / span, 1) if span > 0 else None,
    }


def _finish_profile(prof: subprocess.Popen[bytes] | None, path: Path) -> dict[str, Any]:
    if prof is None:
        return {}
    with contextlib.suppress(subprocess.TimeoutExpired):
        prof.wait(timeout=30)
    stop_process(prof, timeout=5)
    return summarize_profile(path)


def run(quick: bool = False, profile: bool = False) -> ScenarioResult:
    """Scenario (b): the large backlog and a small one; see the module docstring."""
    sizes = (50_000, 20_000) if quick else (1_000_000, 200_000)
    result = ScenarioResult("drain", "backlog drain to mosquitto at QoS 1 (agent subprocess, no sources)", quick=quick)
    runs = [drain_once(size, quick=quick, profile=profile and size == sizes[0]) for size in sizes]
    result.figures = {"runs": runs, "target_events_per_s": TARGET}
    big, small = runs
    for r in runs:
        others = r["other_processes_cores"]
        rate = r["events_per_s"]
        ok = target_min(rate, TARGET)
        if ok and (r["lost"] or r["duplicates"]):
            ok = False
        result.rows.append(
            Row(
                f"b drain {r['backlog']:,}",
                "events/s drained",
                rate,
                "ev/s",
                f">= {TARGET:,}, 0 lost",
                ok,
                "",
                r["cpu_cores"],
                r["rss_max_during_drain_mb"],
                f"lost {r['lost']}, dup {r['duplicates']}, startup {r['startup_seconds']:.1f} s, "
                f"RSS start {r['rss_start_mb']:.0f} / end {r['rss_end_mb']:.0f} / HWM {r['vmhwm_mb']:.0f} MB; "
                f"machine busy {r['machine_busy_cores']:.2f} cores "
                f"(mosquitto {others.get('mosquitto', 0):.2f}, subscriber {others.get('subscriber', 0):.2f})",
            )
        )
    for label, key in (("RSS during drain", "rss_max_during_drain_mb"), ("peak RSS (VmHWM)", "vmhwm_mb")):
        growth = (big[key] or 0) - (small[key] or 0)
        result.figures[f"growth_{key}"] = round(growth, 1)
        result.rows.append(
            Row(
                "b drain RSS",
                f"{label}: {big['backlog'] // 1000}k minus {small['backlog'] // 1000}k",
                round(growth, 1),
                "MB",
                f"<= {RSS_GROWTH_LIMIT_MB:g} (flat)",
                target_max(growth, RSS_GROWTH_LIMIT_MB),
                "",
                None,
                big[key],
                f"{big[key]:.0f} vs {small[key]:.0f} MB",
            )
        )
    return result
