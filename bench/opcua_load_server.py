"""OPC UA load server for the bench: 100 Double tags changing at a requested total rate.

Run as ``python -m bench.opcua_load_server --rate 5000 --seconds 30``. An asyncua
server on 127.0.0.1 (a free port unless ``--port``) with the Double variables
``ns=2;s=Load.T000`` .. ``Load.T099`` (initial value 0). It prints one JSON line
``{"endpoint": ..., "tags": ...}`` once it listens, then (after a ``go`` line on
stdin with ``--wait-go``) writes in rounds: each round writes the next sequence
number (1, 2, 3, ...) to every tag, with a fresh SourceTimestamp, through the
server's local write API (``Server.write_attribute_value``: no client, no
network), ``rate / tags`` rounds a second on a fixed schedule, for ``--seconds``
(at low rates a round is spread over its interval in slices at least 5 ms apart).
Then it prints ``{"written": n, "rounds": r, "seconds": s, "rate": n/s, ...}`` and
keeps serving (so the last changes are published) until ``quit`` or EOF on stdin,
or ``--hold`` seconds pass. With ``--rate 0`` nothing changes (the idle scenario).
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


SLICE_SPACING = 0.005
"""Seconds between the slices of one round, at least: at low rates a round is spread over its interval."""


async def _write_load(server: Server, nodes: list[ua.NodeId], rate: float, seconds: float) -> dict[str, Any]:
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
    t0 = last_start = time.monotonic()
    for k in range(rounds):
        value = float(k + 1)
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
        "written": rounds * tags,
        "rounds": rounds,
        "tags": tags,
        "slices_per_round": slices,
        "requested_rate": rate,
        "seconds": round(elapsed, 3),
        "rate": round(rounds * tags / span, 1),
        "late_max_ms": round(late_max * 1000, 1),
        "late_slices": late_slices,
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
    for i in range(args.tags):
        node_id = ua.NodeId(ua.String(f"Load.T{i:03d}"), ua.Int16(idx))
        await folder.add_variable(node_id, f"T{i:03d}", 0.0, varianttype=ua.VariantType.Double)
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
        if args.rate > 0:
            summary = await _write_load(server, nodes, args.rate, args.seconds)
            summary["gc_max_pause_ms"] = round(_GC["max"] * 1000, 1)
            summary["gc_collections"] = _GC["count"]
            _say(summary)
        else:
            _say({"written": 0, "rounds": 0, "tags": len(nodes), "rate": 0.0, "seconds": 0.0})
        if stdin is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.hold):
                    while True:
                        line = await stdin.readline()
                        if not line or line.strip() == b"quit":
                            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tags", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="value changes per second, all tags together")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the values change")
    parser.add_argument("--wait-go", action="store_true", help="start writing after a 'go' line on stdin")
    parser.add_argument("--go-timeout", type=float, default=120.0)
    parser.add_argument("--hold", type=float, default=60.0, help="serve at most this long after the writes")
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
