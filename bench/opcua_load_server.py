"""OPC UA load server for the bench: N Double tags (``--tags``, 100 by default) changing at a requested total rate.

Run as ``python -m bench.opcua_load_server --rate 5000 --seconds 30``. An asyncua
server on 127.0.0.1 (a free port unless ``--port``) with the Double variables
``ns=2;s=Load.T000`` .. ``Load.T099`` (``Load.T9999`` with 10,000 tags; initial
value 0). More than 100 tags are grouped in folders of 100 under ``Load`` (asyncua
adds a node in time linear in its parent's references: 10,000 siblings would take a
minute to build); the node ids are the same either way. It prints one JSON line
``{"endpoint": ..., "tags": ...}`` once it listens, then (after a ``go`` line on
stdin with ``--wait-go``) writes in rounds: each round writes the next sequence
number (1, 2, 3, ...) to every tag, with a fresh SourceTimestamp, through the
server's local write API (``Server.write_attribute_value``: no client, no
network), ``rate / tags`` rounds a second on a fixed schedule, for ``--seconds``
(at low rates a round is spread over its interval in slices at least 5 ms apart).
Then it prints ``{"written": n, "rounds": r, "seconds": s, "rate": n/s, ...}`` and
keeps serving (so the last changes are published) until ``quit`` or EOF on stdin,
or ``--hold`` seconds pass. With ``--rate 0`` nothing changes (the idle scenario).

More runs on the same server (the ``tags`` scenario): a ``run RATE SECONDS`` line on
stdin (after the ``go`` run, or instead of it with ``--rate 0``) writes another run
of rounds whose values continue the sequence; its summary line adds ``first_value``,
``last_value``, ``wall_t0`` (``time.time()`` when round 0 was due) and ``interval``
(seconds per round). A ``stop`` line ends the current run at the next round boundary
(no tag is left a round behind the others). ``--hold`` is then the longest wait for
the next line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import socket
import sys
import time
from datetime import UTC, datetime
from typing import Any, cast

from asyncua import Server, ua
from asyncua.server.monitored_item_service import MonitoredItemValues

NAMESPACE = "urn:plantgate:bench:load"


def _keep_reference(self: MonitoredItemValues, cur_val: ua.DataValue) -> None:
    # asyncua deep-copies every written DataValue once per monitored item (half of this server's
    # CPU at 15,000 writes/s). Every write here is a fresh DataValue that nobody mutates, so a
    # reference is equivalent; without this the load server, not the agent, limits the rate.
    self.old_dvalue = self.current_dvalue
    self.current_dvalue = cur_val


MonitoredItemValues.set_current_datavalue = _keep_reference  # type: ignore[method-assign]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


_GC = {"start": 0.0, "max": 0.0, "count": 0}


def _gc_pause(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _GC["start"] = time.perf_counter()
    else:
        _GC["max"] = max(_GC["max"], time.perf_counter() - _GC["start"])
        _GC["count"] += 1


GROUP = 100
"""Tags per folder when there are more than this many."""

SLICE_SPACING = 0.005
"""Seconds between the slices of one round, at least: at low rates a round is spread over its interval."""


async def _write_load(
    server: Server,
    nodes: list[ua.NodeId],
    rate: float,
    seconds: float,
    first_value: int = 1,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Write rounds on a fixed schedule; late slices catch up (and are counted).

    Round k (value k + 1 to every tag) is due at ``t0 + k * interval``. A round is written
    in ``slices`` equal parts spread evenly over its interval (each with its own fresh
    timestamp), so at low rates the changes do not all land at one phase of the
    publishing interval (1,000/s in single bursts every 100 ms would phase-lock with a
    100 ms publishing interval and give every sample the same latency).
    """
    tags = len(nodes)
    rounds = max(1, round(rate * seconds / tags))
    interval = tags / rate
    slices = max(1, min(tags, int(interval / SLICE_SPACING)))
    bounds = [round(i * tags / slices) for i in range(slices + 1)]
    parts = [nodes[bounds[i] : bounds[i + 1]] for i in range(slices)]
    step = interval / slices
    write = server.write_attribute_value
    double = ua.VariantType.Double
    late_max = 0.0
    late_slices = 0
    wall_t0 = time.time()
    t0 = last_start = time.monotonic()
    done = 0
    for k in range(rounds):
        if stop is not None and stop.is_set():
            break  # at a round boundary: every tag has the same last value
        done += 1
        value = float(first_value + k)
        for j, part in enumerate(parts):
            due = t0 + k * interval + j * step
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
            else:
                late = now - due
                if late > step:
                    late_slices += 1
                late_max = max(late_max, late)
                await asyncio.sleep(0)  # let the server publish even while catching up
            last_start = time.monotonic()
            stamp = cast(ua.DateTime, datetime.now(UTC))  # asyncua types it as its own alias
            for node in part:
                await write(node, ua.DataValue(ua.Variant(value, double), SourceTimestamp=stamp, ServerTimestamp=stamp))
    elapsed = time.monotonic() - t0
    # Achieved rate: writes per the span they were written in (the last slice starts one step before its end).
    span = last_start - t0 + step
    return {
        "written": done * tags,
        "rounds": done,
        "tags": tags,
        "slices_per_round": slices,
        "requested_rate": rate,
        "seconds": round(elapsed, 3),
        "rate": round(done * tags / span, 1) if done else 0.0,
        "late_max_ms": round(late_max * 1000, 1),
        "late_slices": late_slices,
        "first_value": first_value,
        "last_value": first_value + done - 1,
        "wall_t0": round(wall_t0, 6),
        "interval": interval,
    }


async def serve(args: argparse.Namespace) -> None:
    port = args.port or _free_port(args.host)
    endpoint = f"opc.tcp://{args.host}:{port}"
    server = Server()
    await server.init()
    server.set_endpoint(endpoint)
    server.set_server_name("plantgate bench load")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(NAMESPACE)
    folder = await server.nodes.objects.add_folder(ua.NodeId(ua.String("Load"), ua.Int16(idx)), "Load")
    nodes: list[ua.NodeId] = []
    parent = folder
    for i in range(args.tags):
        if args.tags > GROUP and i % GROUP == 0:
            group = f"G{i // GROUP:03d}"
            parent = await folder.add_folder(ua.NodeId(ua.String(f"Load.{group}"), ua.Int16(idx)), group)
        node_id = ua.NodeId(ua.String(f"Load.T{i:03d}"), ua.Int16(idx))
        await parent.add_variable(node_id, f"T{i:03d}", 0.0, varianttype=ua.VariantType.Double)
        nodes.append(node_id)
    async with server:
        # The address space is tens of thousands of long-lived objects: keep them out of the
        # collector's full passes, so the load server's own GC pauses do not delay publishes.
        gc.collect()
        gc.freeze()
        gc.callbacks.append(_gc_pause)
        _say({"endpoint": endpoint, "namespace_index": idx, "tags": len(nodes)})
        stdin = await _stdin_lines() if (args.wait_go or args.hold) else None
        if args.wait_go and stdin is not None:
            line = await asyncio.wait_for(stdin.readline(), timeout=args.go_timeout)
            if line.strip() != b"go":
                _say({"error": f"expected 'go', got {line!r}"})
                return
        next_value = 1
        if args.rate > 0:
            summary = await _write_load(server, nodes, args.rate, args.seconds)
            next_value = summary["last_value"] + 1
            _say(_with_gc(summary))
        else:
            _say({"written": 0, "rounds": 0, "tags": len(nodes), "rate": 0.0, "seconds": 0.0})
        if stdin is not None:
            await _commands(server, nodes, stdin, next_value, args.hold)


def _with_gc(summary: dict[str, Any]) -> dict[str, Any]:
    summary["gc_max_pause_ms"] = round(_GC["max"] * 1000, 1)
    summary["gc_collections"] = _GC["count"]
    return summary


async def _commands(
    server: Server, nodes: list[ua.NodeId], stdin: asyncio.StreamReader, next_value: int, hold: float
) -> None:
    """``run RATE SECONDS`` / ``stop`` / ``quit`` lines until EOF, ``quit`` or ``hold`` s without a line."""
    stop = asyncio.Event()
    current: asyncio.Task[None] | None = None

    async def one_run(rate: float, seconds: float) -> None:
        nonlocal next_value
        summary = await _write_load(server, nodes, rate, seconds, first_value=next_value, stop=stop)
        next_value = summary["last_value"] + 1
        _say(_with_gc(summary))

    try:
        while True:
            try:
                line = await asyncio.wait_for(stdin.readline(), timeout=hold)
            except TimeoutError:
                if current is not None and not current.done():
                    continue  # a run is still writing: the hold counts from its end
                break
            words = line.split()
            if not line or words[:1] == [b"quit"]:
                break
            if words[:1] == [b"stop"]:
                stop.set()
            elif words[:1] == [b"run"] and len(words) == 3:
                if current is not None and not current.done():
                    _say({"error": "a run is still writing"})
                    continue
                stop.clear()
                current = asyncio.create_task(one_run(float(words[1]), float(words[2])))
            else:
                _say({"error": f"unknown command {line!r}"})
    finally:
        if current is not None and not current.done():
            stop.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(current, timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tags", type=int, default=100, help="how many Double tags (Load.T000 ...)")
    parser.add_argument("--rate", type=float, default=1000.0, help="value changes per second, all tags together")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the values change")
    parser.add_argument("--wait-go", action="store_true", help="start writing after a 'go' line on stdin")
    parser.add_argument("--go-timeout", type=float, default=120.0)
    parser.add_argument(
        "--hold", type=float, default=60.0, help="serve at most this long after the writes (or the last stdin line)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("asyncua", "asyncua.server"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
