"""Scenario ``tags`` (e), scale in tags: one OPC UA server with 10,000 tags -> agent -> mosquitto -> subscriber.

The same processes as ``e2e``: the OPC UA load server (``bench.opcua_load_server``
with 10,000 Double tags), the agent (``plantgate run -c``, one OPC UA source
subscribing every tag as ``telemetry``, no deadband, ``publishing_interval =
"100ms"``, one MQTT sink), mosquitto, the subscriber (``bench.subscriber`` in
``samples`` mode: every (tag, value) counted, so lost and duplicated are exact),
plus a watcher (``python -m bench.tags watch``, a second MQTT subscriber that notes
when each tag first delivered a sample and exits once all have).

One set-up, one load server and one agent for the whole scenario:

1. Start to flowing: the load server writes 10,000 changes/s (one round of all tags
   a second); the agent starts; the figure is the time from the agent's process
   start until every tag has delivered at least one sample to the watcher
   (with the times to ``/status`` running and the source connected, and the CPU the
   agent spent meanwhile).
2. Steady state at 10,000 changes/s: after a warm-up, the agent's CPU (split by
   thread) and RSS over the measured window, its buffer depth, latency, lost and
   duplicated (every round written after all tags flowed, +1 s, is checked).
3. Rate ladder: short runs at 20,000, 30,000, 40,000 ... changes/s (values continue
   the sequence) until one is not sustained. A rung is sustained when the load server
   achieved its rate (>= 97 %), nothing was lost or duplicated and the subscriber had
   every value within ``CATCH_UP_OK`` s of the last write (the agent kept pace). A
   rung that fails says what limited it: the load source (it did not achieve its
   rate) or the agent (loss, lag, buffer depth growing, its CPU near one core).

Every wait has a deadline; the ladder stops at the first failed rung or when the
scenario's time budget is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

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
    cpu_seconds,
    free_port,
    memory_mb,
    percentile,
    start_profile,
    stop_process,
    summarize_profile,
    target_max,
    thread_cpu,
    thread_split,
    wait_until,
    workdir,
)
from bench.e2e import LoadServer

TAGS = 10_000
RATE = 10_000  # changes/s for start-to-flowing and the steady window
LADDER = (20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000)
QUICK_LADDER = (20_000, 40_000)
# Targets (the foundation issue): start to every tag subscribed and flowing <= 30 s,
# and at 10,000 changes/s <= 0.2 core, <= 120 MB RSS, 0 lost.
FLOWING_S = 30.0
CPU_CORES = 0.2
RSS_MB = 120.0
FLOWING_DEADLINE = 90.0  # seconds from the agent's start: past this the scenario fails
CATCH_UP_OK = 2.0  # seconds from a rung's last write until the subscriber has every value
RATE_OK = 0.97  # share of the requested rate the load server must achieve
BUDGET_S = 240.0  # the ladder starts no rung once the scenario has run this long
TOPIC = "plantgate/bench/telemetry/#"


class Watcher:
    """``python -m bench.tags watch`` as a child process: when each tag first delivered a sample."""

    def __init__(self, tmp: Path, *, port: int, tags: int, deadline: float):
        self.out = tmp / "watcher.json"
        self.progress_path = tmp / "watcher.progress.json"
        self.log_path = tmp / "watcher.log"
        args = [
            sys.executable, "-m", "bench.tags", "watch", "--port", str(port), "--topic", TOPIC,
            "--tags", str(tags), "--out", str(self.out), "--progress", str(self.progress_path),
            "--deadline", str(deadline),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def progress(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.progress_path.read_text(encoding="utf-8"))
            return doc
        except (OSError, ValueError):
            return {}

    def wait_subscribed(self, timeout: float = 20) -> None:
        def subscribed() -> bool:
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the watcher exited with {self.proc.returncode}: {log}")
            return bool(self.progress().get("subscribed"))

        wait_until(subscribed, timeout, what="watcher SUBACK")

    def wait_done(self, timeout: float) -> dict[str, Any]:
        """Its result once every tag was seen (or its deadline passed); TimeoutError after ``timeout``."""
        wait_until(lambda: self.out.exists() or self.proc.poll() is not None, timeout, interval=0.1, what="watcher")
        if not self.out.exists():
            wait_until(self.out.exists, 5, what="watcher result")
        doc: dict[str, Any] = json.loads(self.out.read_text(encoding="utf-8"))
        return doc

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)


def _status_depth(agent: AgentProcess) -> int | None:
    with contextlib.suppress(RuntimeError, KeyError, TypeError):
        doc = agent.status(timeout=1.0)
        if doc is not None:
            return int(doc["sinks"]["bench"]["depth"])
    return None


class DepthSampler:
    """The agent's buffer depth for sink ``bench`` (``/status``) every ``interval`` s on a daemon thread."""

    def __init__(self, agent: AgentProcess, interval: float = 0.5):
        self.agent = agent
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="depth-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            depth = _status_depth(self.agent)
            if depth is not None:
                self.samples.append((time.monotonic(), depth))
            self._stop.wait(self.interval)

    def start(self) -> DepthSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def between(self, start: float, end: float) -> list[int]:
        return [d for t, d in self.samples if start <= t <= end]


def _depth_figures(depths: list[int]) -> dict[str, Any]:
    if not depths:
        return {"max": None, "last": None, "first_half_max": None, "second_half_max": None}
    half = len(depths) // 2
    return {
        "max": max(depths),
        "last": depths[-1],
        "first_half_max": max(depths[:half]) if half else depths[0],
        "second_half_max": max(depths[half:]),
    }


def _wait_items(sub: SubscriberProcess, expected: int, timeout: float) -> tuple[int, float | None]:
    """Until the subscriber counted ``expected`` samples (value > 0): (items, seconds it took or None)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    items = 0
    while True:
        items = int(sub.progress().get("items", 0))
        if items >= expected:
            return items, time.monotonic() - t0
        if time.monotonic() >= deadline:
            return items, None
        time.sleep(0.05)


def _settle(sub: SubscriberProcess, idle: float, timeout: float) -> int:
    """Until the subscriber's sample count has not moved for ``idle`` s (or ``timeout`` s)."""
    doc = sub.wait_items(1 << 62, idle=idle, timeout=timeout)
    return int(doc.get("items", 0))


def _windows(pids: dict[str, int | None]) -> dict[str, CpuWindow]:
    return {name: CpuWindow(pid).start() for name, pid in pids.items() if pid}


def _stop_windows(windows: dict[str, CpuWindow]) -> dict[str, float]:
    out = {}
    for name, w in windows.items():
        with contextlib.suppress(OSError, ValueError):
            w.stop()
            out[name] = round(w.cores, 3)
    return out


def run(quick: bool = False, profile: bool = False) -> ScenarioResult:
    """Scenario (e)."""
    warmup, measure, rung_s = (2.0, 5.0, 3.0) if quick else (5.0, 20.0, 8.0)
    ladder = QUICK_LADDER if quick else LADDER
    began = time.monotonic()
    result = ScenarioResult(
        "tags",
        f"OPC UA ({TAGS:,} telemetry tags) -> agent -> mosquitto QoS 1 -> subscriber: start, steady, ladder",
        quick=quick,
    )
    figures: dict[str, Any] = {"tags": TAGS, "publishing_interval": "100ms", "rate": RATE}
    with workdir("tags") as tmp:
        broker = Broker(tmp / "mosquitto").start()
        server: LoadServer | None = None
        sub: SubscriberProcess | None = None
        watcher: Watcher | None = None
        agent: AgentProcess | None = None
        sampler: MemorySampler | None = None
        depths: DepthSampler | None = None
        try:
            t_build = time.monotonic()
            server = LoadServer(0, 0, hold=120, tags=TAGS, wait_go=False, ready=180)
            server.next_line(30)  # the empty first run (rate 0)
            figures["server_build_seconds"] = round(time.monotonic() - t_build, 1)
            http_port = free_port()
            config = tmp / "plantgate.toml"
            config.write_text(
                agent_config(
                    data_dir=tmp / "agent",
                    http_port=http_port,
                    broker_port=broker.port,
                    opcua_endpoint=server.endpoint,
                    tags=TAGS,
                ),
                encoding="utf-8",
            )
            check_config(config)
            sub = SubscriberProcess(tmp, port=broker.port, topic=TOPIC, mode="samples", deadline=900).start()
            watcher = Watcher(tmp, port=broker.port, tags=TAGS, deadline=FLOWING_DEADLINE + 30)
            watcher.wait_subscribed()
            others = {"server": server.pid, "mosquitto": broker.pid, "subscriber": sub.pid}

            # 1. start to flowing, with the load already running
            server.send(f"run {RATE} {FLOWING_DEADLINE + warmup + measure + 60:g}")
            time.sleep(1.5)
            machine_start = SystemCpu().start()
            agent = AgentProcess(config, http_port, tmp / "agent.log")
            wall_started = time.time()
            agent.start()
            t_started = agent.started_at
            sampler = MemorySampler(agent.pid, 0.5).start()
            agent.wait_running(timeout=FLOWING_DEADLINE)
            t_running = time.monotonic()
            agent.wait_connected(timeout=FLOWING_DEADLINE)
            t_connected = time.monotonic()
            remaining = max(1.0, FLOWING_DEADLINE - (time.monotonic() - t_started))
            seen = watcher.wait_done(remaining + 5)
            startup_cpu = cpu_seconds(agent.pid)
            machine_start.stop()
            rss_flowing = memory_mb(agent.pid)[0]
            startup = _startup_figures(seen, wall_started, t_running - t_started, t_connected - t_started)
            startup.update(
                {
                    "agent_cpu_seconds": round(startup_cpu, 2),
                    "agent_cpu_cores_mean": round(startup_cpu / startup["flowing_s"], 3)
                    if startup.get("flowing_s")
                    else None,
                    "rss_at_flowing_mb": round(rss_flowing, 1),
                    "machine_busy_cores": round(machine_start.cores, 3),
                }
            )
            figures["startup"] = startup
            watcher.stop()
            depths = DepthSampler(agent, 0.5).start()

            # 2. steady state at RATE
            time.sleep(warmup)
            t_start, wall_start = time.monotonic(), time.time()
            window = CpuWindow(agent.pid).start()
            threads_start = thread_cpu(agent.pid)
            machine = SystemCpu().start()
            other_windows = _windows(others)
            prof = start_profile(agent.pid, measure, tmp / "profile.txt") if profile else None
            time.sleep(measure)
            window.stop()
            threads = thread_split(agent.pid, threads_start, thread_cpu(agent.pid), window.wall)
            machine.stop()
            other_cores = _stop_windows(other_windows)
            t_end, wall_end = time.monotonic(), time.time()
            server.send("stop")
            steady_run = server.next_line(timeout=30)
            items_a = _settle(sub, idle=2.0, timeout=30)
            rss_window = sampler.between(t_start, t_end)
            steady = {
                "server": steady_run,
                "warmup_seconds": warmup,
                "measure_seconds": round(wall_end - wall_start, 3),
                "window_wall": [round(wall_start, 3), round(wall_end, 3)],
                "cpu_cores": round(window.cores, 4),
                "cpu_seconds": round(window.cpu, 3),
                "cpu_by_thread": threads,
                "rss_mb": round(max(rss_window), 1) if rss_window else None,
                "rss_min_window_mb": round(min(rss_window), 1) if rss_window else None,
                "depth": _depth_figures(depths.between(t_start, t_end)),
                "other_processes_cores": other_cores,
                "machine_busy_cores": round(machine.cores, 3),
                "machine_pressure": machine.pressure,
                "subscriber_items_after": items_a,
            }
            if prof is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    prof.wait(timeout=30)
                stop_process(prof, timeout=5)
                steady["profile"] = summarize_profile(tmp / "profile.txt")
            figures["steady"] = steady

            # 3. the rate ladder
            rungs: list[dict[str, Any]] = []
            items = items_a
            for rate in ladder:
                if time.monotonic() - began > BUDGET_S:
                    figures["ladder_stopped"] = f"time budget ({BUDGET_S:g} s) spent before {rate:,}/s"
                    break
                rung = _rung(agent, server, sub, depths, sampler, others, rate, rung_s, items)
                rungs.append(rung)
                items = rung["subscriber_items_after"]
                if not rung["provisional_ok"]:
                    break
            figures["ladder"] = rungs
            status = agent.status() or {}
            figures["agent_status_end"] = {
                "sinks": {n: {"state": s["state"], "lanes": s["lanes"]} for n, s in status.get("sinks", {}).items()},
                "sources": {
                    n: {"state": s["state"], "degraded": s["degraded"]} for n, s in status.get("sources", {}).items()
                },
            }
            figures["agent_vmhwm_mb"] = round(memory_mb(agent.pid)[1], 1)
            figures["agent_log_tail"] = agent.log_tail(3000)
            sub_result = sub.finish(timeout=120)
        finally:
            if depths is not None:
                depths.stop()
            if sampler is not None:
                sampler.stop()
            if agent is not None:
                agent.stop()
            if watcher is not None:
                watcher.stop()
            if sub is not None:
                sub.kill()
            if server is not None:
                server.stop()
            broker.stop()

    _exact_figures(figures, sub_result)
    result.figures = figures
    result.rows.extend(_rows(figures))
    return result


def _startup_figures(seen: dict[str, Any], wall_started: float, running_s: float, connected_s: float) -> dict[str, Any]:
    firsts = sorted(t for t in seen.get("first_seen", []) if t is not None)
    missing = int(seen.get("tags", TAGS)) - len(firsts)

    def after(q: float) -> float | None:
        value = percentile(firsts, q)
        return None if value is None else round(value - wall_started, 2)

    return {
        "flowing_s": round(firsts[-1] - wall_started, 2) if firsts and not missing else None,
        "first_sample_s": round(firsts[0] - wall_started, 2) if firsts else None,
        "tags_flowing_p50_s": after(50),
        "tags_flowing_p90_s": after(90),
        "running_s": round(running_s, 2),
        "connected_s": round(connected_s, 2),
        "tags_never_seen": missing,
        "all_seen_wall": firsts[-1] if firsts and not missing else None,
        "watcher_messages": seen.get("messages"),
    }


def _rung(
    agent: AgentProcess,
    server: LoadServer,
    sub: SubscriberProcess,
    depths: DepthSampler,
    sampler: MemorySampler,
    others: dict[str, int | None],
    rate: int,
    seconds: float,
    items_before: int,
) -> dict[str, Any]:
    """One short run at ``rate``; its CPU, depth, the server's achieved rate and how soon everything arrived."""
    t_start = time.monotonic()
    window = CpuWindow(agent.pid).start()
    threads_start = thread_cpu(agent.pid)
    machine = SystemCpu().start()
    other_windows = _windows(others)
    server.send(f"run {rate} {seconds:g}")
    summary = server.next_line(timeout=seconds + 60)
    window.stop()
    threads = thread_split(agent.pid, threads_start, thread_cpu(agent.pid), window.wall)
    machine.stop()
    other_cores = _stop_windows(other_windows)
    t_end = time.monotonic()
    expected = items_before + int(summary["written"])
    items, catch_up = _wait_items(sub, expected, timeout=30)
    if catch_up is None or items > expected:
        items = _settle(sub, idle=2.0, timeout=30)
    else:
        items = _settle(sub, idle=1.0, timeout=10)
    rss = sampler.between(t_start, t_end)
    depth = _depth_figures(depths.between(t_start, t_end))
    load_ok = summary["rate"] >= RATE_OK * rate
    kept_pace = catch_up is not None and catch_up <= CATCH_UP_OK
    return {
        "rate_requested": rate,
        "server": summary,
        "cpu_cores": round(window.cores, 4),
        "cpu_by_thread": threads,
        "rss_mb": round(max(rss), 1) if rss else None,
        "depth": depth,
        "other_processes_cores": other_cores,
        "machine_busy_cores": round(machine.cores, 3),
        "machine_pressure": machine.pressure,
        "catch_up_s": None if catch_up is None else round(catch_up, 2),
        "subscriber_items_expected": expected,
        "subscriber_items_after": items,
        "load_ok": load_ok,
        "kept_pace": kept_pace,
        # Final verdict after the exact lost/duplicated count (see _exact_figures).
        "provisional_ok": load_ok and kept_pace and items == expected,
    }


def _exact_figures(figures: dict[str, Any], result: dict[str, Any]) -> None:
    """Lost, duplicated and latency of the steady window and every rung from the subscriber's raw result."""
    tags: dict[int, bytes] = result.get("tags", {})
    source = result.get("source_times", [])
    receive = result.get("receive_times", [])
    figures["subscriber"] = {
        "items": result.get("items"),
        "messages": result.get("messages"),
        "duplicates": result.get("duplicates"),
        "undecodable": result.get("undecodable"),
        "initial_samples": result.get("initial"),
    }

    def check(first: int, last: int) -> dict[str, int]:
        lost = dup = unseen = 0
        span = last - first + 1
        for tag in range(TAGS):
            counts = tags.get(tag)
            if counts is None:
                unseen += 1
                lost += span
                continue
            seg = counts[first : last + 1]
            present = len(seg) - seg.count(0)
            lost += span - present
            dup += sum(seg) - present
        return {"checked_values": span * TAGS, "lost": lost, "duplicates": dup, "tags_never_seen": unseen}

    def latency(start: float, end: float) -> dict[str, float | None]:
        values = [(r - s) * 1000 for s, r in zip(source, receive, strict=True) if start <= s < end]
        return {
            "count": len(values),
            "p50": _round(percentile(values, 50)),
            "p99": _round(percentile(values, 99)),
            "max": _round(max(values) if values else None),
        }

    steady = figures.get("steady")
    startup = figures.get("startup", {})
    if steady is not None:
        run = steady["server"]
        all_seen = startup.get("all_seen_wall")
        # Rounds due after every tag delivered a sample (+1 s) were written to subscribed items.
        k_from = math.ceil((all_seen + 1.0 - run["wall_t0"]) / run["interval"]) if all_seen else run["rounds"]
        first = run["first_value"] + max(0, k_from)
        steady["exact"] = check(first, run["last_value"]) if first <= run["last_value"] else None
        steady["checked_from_value"] = first
        steady["latency_ms"] = latency(*steady["window_wall"])
    for rung in figures.get("ladder", []):
        run = rung["server"]
        rung["exact"] = check(run["first_value"], run["last_value"]) if run["rounds"] else None
        end = run["wall_t0"] + run["rounds"] * run["interval"]
        # Latency of the rung's second half (past its ramp).
        rung["latency_ms"] = latency(run["wall_t0"] + (end - run["wall_t0"]) / 2, end)
        exact = rung["exact"] or {"lost": 0, "duplicates": 0}
        rung["zero_loss"] = exact["lost"] == 0 and exact["duplicates"] == 0
        rung["sustained"] = rung["zero_loss"] and rung["load_ok"] and rung["kept_pace"]
        rung["limit"] = _limit(rung)
    steady_exact = (steady or {}).get("exact") or {}
    candidates = [RATE] if steady_exact and steady_exact["lost"] == 0 and steady_exact["duplicates"] == 0 else []
    candidates += [r["rate_requested"] for r in figures.get("ladder", []) if r["sustained"]]
    figures["highest_sustained_rate"] = max(candidates) if candidates else None
    failed = [r for r in figures.get("ladder", []) if not r["sustained"]]
    if failed:
        figures["limited_by"] = failed[0]["limit"]
    elif figures.get("ladder_stopped"):
        figures["limited_by"] = figures["ladder_stopped"]
    else:
        figures["limited_by"] = "not reached: every rung of the ladder was sustained"


def _limit(rung: dict[str, Any]) -> str:
    """What limited a rung: the load source, the agent, or (said so) the subscriber measuring it."""
    if rung["sustained"]:
        return ""
    reasons = []
    server = rung["server"]
    if not rung["load_ok"]:
        reasons.append(
            f"load source: the server wrote {server['rate']:,.0f}/s of {rung['rate_requested']:,}/s "
            f"(its CPU {rung['other_processes_cores'].get('server', 0):.2f} core, "
            f"late max {server['late_max_ms']:.0f} ms)"
        )
    exact = rung.get("exact") or {}
    agent = []
    if exact.get("lost") or exact.get("duplicates"):
        agent.append(f"lost {exact.get('lost')}, duplicated {exact.get('duplicates')}")
    if not rung["kept_pace"]:
        agent.append(
            f"caught up {rung['catch_up_s']} s after the last write" if rung["catch_up_s"] else "never caught up"
        )
    depth = rung["depth"]
    growing = depth["max"] and depth["second_half_max"] and depth["first_half_max"] is not None
    if growing and depth["second_half_max"] > 2 * max(depth["first_half_max"], 1000):
        agent.append(f"buffer depth growing ({depth['first_half_max']:,} -> {depth['second_half_max']:,})")
    if agent:
        agent.append(f"agent CPU {rung['cpu_cores']:.2f} core")
        reasons.append("agent: " + ", ".join(agent))
    cores = len(os.sched_getaffinity(0))
    stalled = rung["machine_pressure"].get("cpu_some_share")
    if rung["machine_busy_cores"] >= 0.9 * cores or (stalled is not None and stalled >= 0.5):
        reasons.append(
            f"machine saturated: {rung['machine_busy_cores']:.2f} of {cores} cores busy, some task waiting for a CPU "
            f"{_share(stalled)} of the time (the bench's processes and everything else on the machine)"
        )
    if rung["other_processes_cores"].get("subscriber", 0) >= 0.9:
        reasons.append(
            f"subscriber near one core ({rung['other_processes_cores']['subscriber']:.2f}): measurement limit"
        )
    return "; ".join(reasons) or "unclear (see the rung's figures)"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _rows(f: dict[str, Any]) -> list[Row]:
    name = f"e tags {TAGS:,}"
    rows: list[Row] = []
    s = f.get("startup", {})
    rows.append(
        Row(name, "start to all flowing", s.get("flowing_s"), "s", f"<= {FLOWING_S:g}",
            target_max(s.get("flowing_s"), FLOWING_S) if s.get("tags_never_seen") == 0 else False, "",
            s.get("agent_cpu_cores_mean"), s.get("rss_at_flowing_mb"),
            f"/status running {s.get('running_s')} s, source connected {s.get('connected_s')} s, first sample "
            f"{s.get('first_sample_s')} s, half the tags {s.get('tags_flowing_p50_s')} s; "
            f"{s.get('agent_cpu_seconds')} CPU s; {s.get('tags_never_seen')} tags never seen")
    )  # fmt: skip
    st = f.get("steady")
    if st is not None:
        sname = f"{name} @ {RATE:,}/s"
        exact = st.get("exact") or {}
        lat = st.get("latency_ms", {})
        split = st["cpu_by_thread"]
        server_cores = st["other_processes_cores"].get("server", 0.0)
        rows += [
            Row(sname, "agent CPU", st["cpu_cores"], "cores", f"<= {CPU_CORES:g}",
                target_max(st["cpu_cores"], CPU_CORES), "", st["cpu_cores"], st["rss_mb"],
                f"event loop {split['main_thread_cores']:.3f}, other threads {split['other_threads_cores']:.3f}; "
                f"server wrote {st['server']['rate']:,.0f}/s ({server_cores:.2f} core); machine busy "
                f"{st['machine_busy_cores']:.2f} cores"),
            Row(sname, "agent RSS", st["rss_mb"], "MB", f"<= {RSS_MB:g}", target_max(st["rss_mb"], RSS_MB),
                note=f"VmHWM {f.get('agent_vmhwm_mb')} MB (whole run, ladder included)"),
            Row(sname, "lost / duplicated", (exact.get("lost", 0) + exact.get("duplicates", 0)) if exact else None,
                "samples", "0 / 0", (exact.get("lost") == 0 and exact.get("duplicates") == 0) if exact else None,
                note=f"lost {exact.get('lost')}, dup {exact.get('duplicates')} of {exact.get('checked_values', 0):,}; "
                f"latency p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms; depth max {st['depth']['max']}"),
        ]  # fmt: skip
    for rung in f.get("ladder", []):
        exact = rung.get("exact") or {}
        lat = rung.get("latency_ms", {})
        verdict = "sustained" if rung["sustained"] else f"not sustained: {rung['limit']}"
        rows.append(
            Row(f"{name} @ {rung['rate_requested']:,}/s", "delivered, lost+dup",
                (exact.get("lost", 0) + exact.get("duplicates", 0)) if exact else None, "samples", "", None, "",
                rung["cpu_cores"], rung["rss_mb"],
                f"{verdict}; server {rung['server']['rate']:,.0f}/s "
                f"({rung['other_processes_cores'].get('server', 0):.2f} core), catch-up {rung['catch_up_s']} s, "
                f"depth max {rung['depth']['max']}, p99 {lat.get('p99')} ms, "
                f"subscriber {rung['other_processes_cores'].get('subscriber', 0):.2f} core")
        )  # fmt: skip
    highest = f.get("highest_sustained_rate")
    rows.append(Row(name, "highest 0-loss rate", highest, "/s", "", None, note=f"limited by: {f.get('limited_by')}"))
    return rows


# --- the watcher process -------------------------------------------------------------------------------------


class _Sample(msgspec.Struct):
    tag: str


class _Data(msgspec.Struct):
    samples: list[_Sample]


class _Event(msgspec.Struct):
    type: str
    data: _Data


def watch(args: argparse.Namespace) -> None:
    """Subscribe; note the first receive time of a sample of each tag; exit once every tag was seen."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    decoder = msgspec.json.Decoder(_Event)
    first: list[float | None] = [None] * args.tags
    state = {"seen": 0, "messages": 0, "subscribed": False}
    done = threading.Event()

    def progress() -> None:
        tmp = args.progress + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, args.progress)

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(args.topic, qos=0)

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        state["subscribed"] = True
        progress()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        now = time.time()
        state["messages"] += 1
        try:
            event = decoder.decode(message.payload)
        except msgspec.DecodeError:
            return
        for sample in event.data.samples:
            try:
                tag = int(sample.tag.rsplit("t", 1)[1])
            except (IndexError, ValueError):
                continue
            if 0 <= tag < args.tags and first[tag] is None:
                first[tag] = now
                state["seen"] += 1
        if state["seen"] >= args.tags:
            done.set()
            client.disconnect()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{os.getpid()}", clean_session=True)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    timer = threading.Timer(args.deadline, client.disconnect)
    timer.daemon = True
    timer.start()
    client.connect(args.host, args.port, keepalive=60)
    client.loop_forever()
    timer.cancel()
    progress()
    doc = {"tags": args.tags, "seen": state["seen"], "messages": state["messages"], "first_seen": first}
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tags", description="the tags scenario's watcher process")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="note when each load tag first delivered a sample; exit once all did")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--topic", required=True)
    w.add_argument("--tags", type=int, required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--progress", required=True)
    w.add_argument("--deadline", type=float, default=120.0, help="exit after this many seconds whatever was seen")
    args = parser.parse_args()
    watch(args)


if __name__ == "__main__":
    main()
