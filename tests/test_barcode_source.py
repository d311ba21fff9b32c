"""The barcode source over real sockets and a real pty: scanners as TCP clients, as a TCP server, on a serial port."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import msgspec
from hypothesis import HealthCheck, given, settings

from agent.events import CloudEvent, Reading
from agent.source import BufferUnavailable
from protocols.barcode import BarcodeSourceConfig
from protocols.barcode.framing import Framer
from protocols.barcode.simulator import ScannerSimulator
from protocols.barcode.source import BarcodeSource
from tests.build import context
from tests.peers.mosquitto import free_port
from tests.peers.waiting import wait_for

GS = "\x1d"
GTIN = "05012345678900"


class Recorder:
    """The agent side of ``output.events``: keeps every committed batch; can refuse the first calls."""

    def __init__(self, *, refuse: int = 0, tags: Mapping[str, Any] | None = None) -> None:
        self.batches: list[list[CloudEvent]] = []
        self.attempts: list[list[str]] = []
        self.refuse = refuse
        self.tags = dict(tags or {})

    async def readings(self, batch: Sequence[Reading]) -> None:
        raise AssertionError("a scanner produces events, not readings")

    async def events(self, batch: Sequence[CloudEvent], *, state: Mapping[str, str | None] | None = None) -> None:
        self.attempts.append([e.id for e in batch])
        if self.refuse > 0:
            self.refuse -= 1
            raise BufferUnavailable("disk full")
        self.batches.append(list(batch))

    def tag_value(self, tag: str) -> Reading | None:
        if tag not in self.tags:
            return None
        return Reading(tag, self.tags[tag], datetime.now(UTC))

    def refusing(self) -> str | None:
        return None

    async def load_state(self, key: str) -> str | None:
        return None

    async def save_state(self, key: str, value: str | None) -> None:
        return None

    @property
    def events_seen(self) -> list[CloudEvent]:
        return [event for batch in self.batches for event in batch]

    def data(self) -> list[dict[str, Any]]:
        return [msgspec.to_builtins(e.data) for e in self.events_seen]


def build(tmp_path: Path, **overrides: Any) -> BarcodeSource:
    values: dict[str, Any] = {
        "name": "dock1",
        "mode": "tcp-server",
        "listen": "127.0.0.1:0",
        "station": "receiving-dock-1",
        "event": "goods.received",
        "reconnect_max_backoff": "200ms",
    }
    values.update(overrides)
    source = BarcodeSourceConfig.model_validate(values).build(context(tmp_path))
    assert isinstance(source, BarcodeSource)
    return source


@contextlib.asynccontextmanager
async def running(source: BarcodeSource, output: Recorder, *, connect: bool = True) -> AsyncIterator[Recorder]:
    task = asyncio.create_task(source.run(output))
    try:
        if connect:
            await wait_for(lambda: source.status.state == "connected", message=lambda: str(source.status))
        yield output
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert source.status.state == "stopped"


def listen_port(source: BarcodeSource) -> int:
    return int(source.status.info["listen"].rpartition(":")[2])


async def test_tcp_server_two_scanners_at_once_with_interleaved_partial_frames(tmp_path: Path) -> None:
    source = build(tmp_path, work_order_tag="press7.work_order")
    async with running(source, Recorder(tags={"press7.work_order": 4711.0})) as out:
        port = listen_port(source)
        _, first = await asyncio.open_connection("127.0.0.1", port)
        _, second = await asyncio.open_connection("127.0.0.1", port)
        await wait_for(lambda: source.status.info["scanners"] == "2")
        first.write(f"]C101{GTIN}".encode())
        await first.drain()
        second.write(b"PALLET-")
        await second.drain()
        first.write(f"{GS}10LOT-A{GS}3712\r".encode())
        await first.drain()
        await wait_for(lambda: len(out.events_seen) == 1)
        second.write(b"0042\r\n")
        await second.drain()
        await wait_for(lambda: len(out.events_seen) == 2, message=lambda: str(out.data()))
        first.close()
        await wait_for(lambda: source.status.info["scanners"] == "1")
        second.close()
        await wait_for(lambda: source.status.info["scanners"] == "0")
    gs1, plain = out.data()
    assert gs1 == {
        "station": "receiving-dock-1",
        "raw": f"]C101{GTIN}{GS}10LOT-A{GS}3712",
        "gtin": GTIN,
        "lot": "LOT-A",
        "quantity": {"value": "12", "uom": "EA"},
        "work_order": "4711",
    }
    assert plain == {"station": "receiving-dock-1", "raw": "PALLET-0042", "work_order": "4711"}
    assert all(e.subject == "4711" and e.type == "io.plantgate.goods.received" for e in out.events_seen)
    assert source.status.info["scans"] == "2"


async def test_tcp_server_garbage_overlong_and_double_reads(tmp_path: Path) -> None:
    source = build(tmp_path, max_length=64, duplicate_window="10m")
    async with running(source, Recorder()) as out:
        _, scanner = await asyncio.open_connection("127.0.0.1", listen_port(source))
        scanner.write(b"\x00\x01\xfe\r" + b"A" * 5000 + b"\rOK-1\rOK-1\rOK-1\r]C1notgs1\rUNTERMINATED")
        await scanner.drain()
        await wait_for(lambda: len(out.events_seen) >= 4, message=lambda: str(out.data()))
        scanner.close()
        await wait_for(lambda: len(out.events_seen) == 5, message=lambda: str(out.data()))
        assert source.status.state == "connected", "a bad scanner does not stop the source"
    rejected = [e for e in out.events_seen if e.type == "io.plantgate.barcode.rejected"]
    reasons = [e.data.reason for e in rejected]
    assert rejected[0].data.raw == "\\x00\\x01\\xfe"
    assert "neither printable ASCII nor GS" in reasons[0]
    assert "longer than max_length 64" in reasons[1]
    assert "]C1 is a GS1 symbology" in reasons[2]
    assert reasons[3] == "the connection ended before the terminator" and rejected[3].data.raw == "UNTERMINATED"
    assert [d["raw"] for d in out.data() if "reason" not in d] == ["OK-1"]
    info = source.status.info
    assert (info["scans"], info["rejected"], info["duplicates_suppressed"]) == ("1", "4", "2")


async def test_tcp_server_refuses_scanners_beyond_max_connections(tmp_path: Path) -> None:
    source = build(tmp_path, max_connections=1)
    async with running(source, Recorder()) as out:
        port = listen_port(source)
        _, kept = await asyncio.open_connection("127.0.0.1", port)
        await wait_for(lambda: source.status.info["scanners"] == "1")
        refused_reader, refused = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(refused_reader.read(), 5) == b"", "the extra connection is closed"
        refused.close()
        kept.write(b"STILL-HERE\r")
        await kept.drain()
        await wait_for(lambda: len(out.events_seen) == 1)
        kept.close()


async def test_uncommitted_scans_are_offered_again_with_the_same_ids(tmp_path: Path) -> None:
    source = build(tmp_path)
    async with running(source, Recorder(refuse=2)) as out:
        _, scanner = await asyncio.open_connection("127.0.0.1", listen_port(source))
        scanner.write(b"A-1\rA-2\r")
        await scanner.drain()
        await wait_for(lambda: len(out.events_seen) == 2, timeout=10)
        scanner.close()
    assert len(out.attempts) == 3
    assert out.attempts[0] == out.attempts[1] == out.attempts[2] == [e.id for e in out.events_seen]
    assert "buffer" not in source.status.degraded


async def test_tcp_client_reconnects_to_a_scanner_that_went_away(tmp_path: Path) -> None:
    port = free_port()
    connections: list[asyncio.StreamWriter] = []

    async def scanner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        writer.write(f"]d201{GTIN}10L{len(connections)}{GS}21S-{len(connections)}\r\n".encode())
        await writer.drain()

    source = build(tmp_path, mode="tcp-client", listen=None, connect=f"127.0.0.1:{port}", terminator="CRLF")
    async with running(source, Recorder(), connect=False) as out:
        await wait_for(lambda: source.status.state == "reconnecting", message=lambda: str(source.status))
        assert "cannot open 127.0.0.1" in (source.status.last_error or "")
        server = await asyncio.start_server(scanner, "127.0.0.1", port)
        await wait_for(lambda: len(out.events_seen) == 1, timeout=10)
        assert source.status.state == "connected"
        server.close()
        for writer in connections:
            writer.close()
        await server.wait_closed()
        await wait_for(lambda: source.status.state == "reconnecting", message=lambda: str(source.status))
        server = await asyncio.start_server(scanner, "127.0.0.1", port)
        await wait_for(lambda: len(out.events_seen) == 2, timeout=10, message=lambda: str(source.status))
        server.close()
        for writer in connections:
            writer.close()
        await server.wait_closed()
    assert [(d["lot"], d["serial"]) for d in out.data()] == [("L1", "S-1"), ("L2", "S-2")]
    assert len(connections) == 2


async def test_serial_scanner_on_a_pty(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        device = os.ttyname(slave)
        source = build(tmp_path, mode="serial", listen=None, device=device, baudrate=115200, terminator="\\x03")
        async with running(source, Recorder()) as out:
            os.write(master, f"]Q301{GTIN}17271231".encode())
            os.write(master, b"3005\x03]E04006381333931\x03")
            await wait_for(lambda: len(out.events_seen) == 2, message=lambda: str(out.data()))
        first, second = out.data()
        assert first["expiry"] == "2027-12-31" and first["quantity"] == {"value": "5", "uom": "EA"}
        assert second["gtin"] == "04006381333931"
    finally:
        os.close(master)
        os.close(slave)


async def test_serial_device_missing_is_retried(tmp_path: Path) -> None:
    source = build(tmp_path, mode="serial", listen=None, device=str(tmp_path / "ttyNOPE"))
    async with running(source, Recorder(), connect=False):
        await wait_for(lambda: source.status.state == "reconnecting", message=lambda: str(source.status))
        assert "ttyNOPE" in (source.status.last_error or "")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=200), st.sampled_from([b"\r", b"\r\n", b"]C1", GS.encode(), b"01" + GTIN.encode()])
        ),
        max_size=20,
    )
)
def test_arbitrary_bytes_over_tcp_never_stop_the_source(tmp_path: Path, chunks: list[bytes]) -> None:
    async def scenario() -> None:
        source = build(tmp_path, max_length=128, duplicate_window="1h")
        async with running(source, Recorder()) as out:
            _, scanner = await asyncio.open_connection("127.0.0.1", listen_port(source))
            await wait_for(lambda: source.status.info["scanners"] == "1", timeout=5)
            for chunk in chunks:
                scanner.write(chunk)
                await scanner.drain()
            scanner.close()
            await wait_for(lambda: source.status.info["scanners"] == "0", timeout=5)
            assert source.status.state == "connected"
        reference = Framer(b"\r", 128)
        frames = [f for chunk in chunks for f in reference.feed(chunk)] + reference.close()
        assert len(out.events_seen) + int(source.status.info["duplicates_suppressed"]) == len(frames)
        assert len({e.id for e in out.events_seen}) == len(out.events_seen)

    asyncio.run(scenario())


async def test_demo_scanner_feeds_a_tcp_server_source(tmp_path: Path) -> None:
    source = build(tmp_path)
    async with running(source, Recorder()) as out:
        simulator = ScannerSimulator(connect=source.status.info["listen"])
        stop = asyncio.Event()
        demo = asyncio.create_task(simulator.run_demo(stop, interval=0.03))
        try:
            await wait_for(lambda: int(source.status.info["rejected"]) >= 1, timeout=10)  # the smudged read of round 7
        finally:
            stop.set()
            await asyncio.wait_for(demo, 5)
        await wait_for(lambda: source.status.info["scanners"] == "0")
    types = {e.type for e in out.events_seen}
    assert types == {"io.plantgate.goods.received", "io.plantgate.barcode.rejected"}
    assert int(source.status.info["duplicates_suppressed"]) >= 1  # the double read of round 6
    assert any("lot" in d and "serial" in d for d in out.data())


async def test_serial_port_that_fails_is_retried(tmp_path: Path) -> None:
    master, slave = os.openpty()
    closed = False
    try:
        source = build(tmp_path, mode="serial", listen=None, device=os.ttyname(slave))
        async with running(source, Recorder()) as out:
            os.write(master, b"BEFORE\r")
            await wait_for(lambda: len(out.events_seen) == 1)
            os.close(master)  # the adapter unplugged: reads fail, and so does reopening
            closed = True
            await wait_for(lambda: source.status.state == "reconnecting", message=lambda: str(source.status))
            assert source.status.last_error
    finally:
        if not closed:
            os.close(master)
        os.close(slave)
