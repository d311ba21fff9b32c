"""Scenario ``modbus``: the agent polling Modbus TCP devices served by a pymodbus load server.

1. **One device, 1,000 holding registers, every 100 ms**: a load server process
   (``python -m bench.modbus serve``) holds 1,000 holding registers on one unit
   and changes ``changes`` of them per second (spread over 10 ticks a second); the
   agent (``plantgate run``, one ``[[sources.modbus]]`` with 1,000 ``uint16``
   telemetry tags, ``poll_interval = "100ms"``, one MQTT sink) polls it. Measured:
   the agent's CPU (cores) and RSS over the window, requests per poll (from
   ``/status``: 1,000 contiguous registers take 8 reads of at most 125), polls
   achieved per second and polls skipped.
2. **50 devices x 100 registers, every second**: the load server serves 50
   devices (one TCP port each), the agent has 50 sources. Same figures.

Target: scenario 1 at <= 0.05 core. The load server and the broker run in their
own processes; only the agent is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    AgentProcess,
    Broker,
    CpuWindow,
    MemorySampler,
    Row,
    ScenarioResult,
    agent_header,
    check_config,
    free_port,
    stop_process,
    target_max,
    wait_until,
    workdir,
)

TARGET_CORES = 0.05


# --- the load server (a subprocess) -------------------------------------------------------------------


async def _serve(ports: list[int], registers: int, changes_per_second: int, ready: Path) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    memories = [[0] * registers for _ in ports]
    dirty = [True] * len(ports)
    requests = [0]

    def device(index: int) -> SimDevice:
        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            block: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> None:
            requests[0] += 1
            if function_code == 3 and dirty[index]:
                block[0 - start_address : registers - start_address] = memories[index]
                dirty[index] = False

        return SimDevice(
            id=1,
            simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=registers, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    servers = [ModbusTcpServer([device(i)], address=(HOST, port)) for i, port in enumerate(ports)]
    for server in servers:
        await server.serve_forever(background=True)
    _announce(ready, ports)
    rng = random.Random(1)
    tick = 0.1
    per_tick = changes_per_second * tick
    owed = 0.0
    next_tick = time.monotonic()
    while True:
        owed += per_tick
        while owed >= 1:
            owed -= 1
            index = rng.randrange(len(ports))
            memories[index][rng.randrange(registers)] = rng.randrange(65536)
            dirty[index] = True
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


def _announce(ready: Path, ports: list[int]) -> None:
    """Tell the bench the server listens (a tiny file, written once)."""
    ready.write_text(json.dumps({"ports": ports}), encoding="utf-8")


def serve_main(argv: list[str]) -> None:
    """``python -m bench.modbus serve --ports P1,P2 --registers N --changes C --ready FILE``."""
    parser = argparse.ArgumentParser(prog="bench.modbus serve")
    parser.add_argument("--ports", required=True)
    parser.add_argument("--registers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--ready", type=Path, required=True)
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    ports = [int(p) for p in args.ports.split(",")]
    asyncio.run(_serve(ports, args.registers, args.changes, args.ready))


# --- the agent ----------------------------------------------------------------------------------------------


def _config(data_dir: Path, http_port: int, broker_port: int, ports: list[int], registers: int, interval: str) -> str:
    lines = agent_header(data_dir, http_port)
    for device, port in enumerate(ports):
        lines += [
            "[[sources.modbus]]",
            f'name = "dev{device:02d}"',
            f'endpoint = "tcp://{HOST}:{port}"',
            f'poll_interval = "{interval}"',
            'timeout = "1s"',
            "",
        ]
        for address in range(registers):
            lines += [
                "  [[sources.modbus.tags]]",
                f'  tag = "dev{device:02d}.r{address:04d}"',
                f'  register = "holding:{address}"',
                "",
            ]
    lines += [
        "[[sinks.mqtt]]",
        'name = "bench"',
        f'url = "mqtt://{HOST}:{broker_port}"',
        'client_id = "plantgate-bench-modbus"',
        'topic_prefix = "plantgate/bench"',
        "",
    ]
    return "\n".join(lines)


def _sources(agent: AgentProcess) -> dict[str, Any]:
    doc = agent.status()
    return doc["sources"] if doc else {}


def measure(
    base: Path, *, devices: int, registers: int, interval: str, changes: int, warmup: float, window: float
) -> dict[str, Any]:
    """One set-up: load server, broker, agent; CPU and RSS of the agent over ``window`` seconds."""
    base.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(devices)]
    ready = base / "server.ready"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.modbus", "serve", "--ports", ",".join(map(str, ports)),
         "--registers", str(registers), "--changes", str(changes), "--ready", str(ready)],
        stdout=subprocess.DEVNULL, stderr=(base / "server.log").open("wb"),
    )  # fmt: skip
    agent: AgentProcess | None = None
    try:
        wait_until(lambda: ready.exists() or server.poll() is not None, 60, what="Modbus load server listening")
        if server.poll() is not None:
            log = (base / "server.log").read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"the Modbus load server exited with {server.returncode}: {log}")
        with Broker(base / "broker") as broker:
            http_port = free_port()
            config_path = base / "plantgate.toml"
            config_path.write_text(
                _config(base / "data", http_port, broker.port, ports, registers, interval), encoding="utf-8"
            )
            check_config(config_path)
            agent = AgentProcess(config_path, http_port, base / "agent.log").start()
            agent.wait_running(60)
            agent.wait_connected(60)
            time.sleep(warmup)
            before = _sources(agent)
            sampler = MemorySampler(agent.pid).start()
            cpu = CpuWindow(agent.pid).start()
            time.sleep(window)
            cpu.stop()
            after = _sources(agent)
            samples = sampler.stop()
        polls = [
            int(after[name]["info"]["polls"]) - int(before[name]["info"]["polls"])
            for name in after
            if "polls" in after[name].get("info", {}) and "polls" in before.get(name, {}).get("info", {})
        ]
        requests = sorted({int(s["info"].get("requests_per_poll", 0)) for s in after.values()})
        skipped = sum(int(s["info"].get("skipped_polls", 0)) for s in after.values())
        states = sorted({s["state"] for s in after.values()})
        poll_ms = [float(s["info"].get("last_poll_ms", 0)) for s in after.values()]
        return {
            "devices": devices,
            "registers_per_device": registers,
            "poll_interval": interval,
            "changes_per_second": changes,
            "cpu_cores": round(cpu.cores, 4),
            "rss_mb": round(max((rss for _, rss in samples), default=0.0), 1),
            "requests_per_poll": requests,
            "polls_per_second_per_device": round(sum(polls) / len(polls) / cpu.wall, 2) if polls else None,
            "skipped_polls": skipped,
            "last_poll_ms_max": max(poll_ms, default=None),
            "source_states": states,
            "measure_seconds": round(cpu.wall, 2),
        }
    finally:
        if agent is not None:
            agent.stop()
        stop_process(server)


def run(quick: bool = False) -> ScenarioResult:
    """Scenario ``modbus``: one device of 1,000 registers at 100 ms; 50 devices of 100 registers at 1 s."""
    warmup, window = (2.0, 5.0) if quick else (5.0, 20.0)
    result = ScenarioResult("modbus", "modbus: TCP devices polled by the agent (pymodbus load server)", quick=quick)
    with workdir("modbus") as base:
        one = measure(
            base / "one", devices=1, registers=1000, interval="100ms", changes=100, warmup=warmup, window=window
        )
        fifty = measure(
            base / "fifty", devices=50, registers=100, interval="1s", changes=100, warmup=warmup, window=window
        )
    result.figures = {"one_device_1000_registers": one, "fifty_devices_100_registers": fifty}
    result.rows.append(
        Row("modbus", "1 device x 1,000 regs @100ms: agent CPU", one["cpu_cores"], "cores", f"<= {TARGET_CORES}",
            target_max(one["cpu_cores"], TARGET_CORES), "", one["cpu_cores"], one["rss_mb"],
            f"{one['requests_per_poll']} requests/poll, {one['polls_per_second_per_device']} polls/s, "
            f"{one['changes_per_second']} changes/s, {one['skipped_polls']} skipped")
    )  # fmt: skip
    result.rows.append(
        Row("modbus", "50 devices x 100 regs @1s: agent CPU", fifty["cpu_cores"], "cores", "", None, "",
            fifty["cpu_cores"], fifty["rss_mb"],
            f"{fifty['requests_per_poll']} requests/poll each, {fifty['polls_per_second_per_device']} polls/s each, "
            f"{fifty['skipped_polls']} skipped")
    )  # fmt: skip
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_main(sys.argv[2:])
    else:
        from bench.common import machine_info

        outcome = run(quick="--quick" in sys.argv)
        for row in outcome.rows:
            print(row)
        print(f"written to {outcome.write(machine_info())}")
