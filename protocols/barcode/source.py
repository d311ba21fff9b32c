"""Barcode source: scanners on TCP (as server or client) or a serial port; each scan one event.

Every connection has its own ``Framer``; the frames of one read become one batch
of events handed to ``output.events``, which returns once they are committed. While
it waits (the buffer refusing writes) nothing more is read from that connection,
so the scanner is held by TCP or serial flow control instead of filling memory. A
batch that cannot be committed (``BufferUnavailable``) is offered again, the same
events with the same ids, after a backoff: a framed scan is never lost.

``ScanReader`` turns frames into events and is shared by the connections of one
source: the duplicate window spans every scanner of the station.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from agent.backoff import Backoff
from agent.events import (
    BarcodeRejected,
    BarcodeScanned,
    CloudEvent,
    identifier_string,
    make_event,
    stable_id,
)
from agent.health import ComponentStatus
from agent.source import BufferUnavailable, SourceError, SourceOutput
from protocols.barcode import BarcodeSourceConfig, parse_address
from protocols.barcode.framing import Frame, Framer
from protocols.barcode.gs1 import Garbled, escape_raw, read_scan

logger = logging.getLogger(__name__)

_READ_SIZE = 65536
_MAX_REMEMBERED = 10_000  # codes kept for the duplicate window; the oldest go first beyond this
_LOG_INTERVAL = 10.0  # at most one log line per kind of trouble per source in this many seconds
_ONE_MICROSECOND = timedelta(microseconds=1)
# Scanners send nothing between scans: without probes a half-open connection stays "connected".
_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_PROBES = 30, 10, 3


class ScanReader:
    """Frames -> canonical events for one station: GS1 reading, duplicate suppression, ids, times.

    ``time`` is when the frame was read; each frame of a source gets a later time
    than the one before (a microsecond later when the clock did not move), so the
    id, ``stable_id(source, station, raw, time)``, is unique per scan and the same
    on every retry of it.
    """

    def __init__(self, config: BarcodeSourceConfig, *, source_uri: str, site: str):
        self._config = config
        self._source_uri = source_uri
        self._site = site
        self._window = config.duplicate_window
        self._seen: dict[bytes, float] = {}  # frame -> monotonic time of its last read
        self._last_time = datetime.min.replace(tzinfo=UTC)
        self.duplicates = 0
        self.rejected = 0

    def events(
        self, frames: Sequence[Frame], *, work_order: Callable[[], str | None] | None = None
    ) -> list[CloudEvent]:
        """One event per frame, except double reads (counted in ``duplicates``)."""
        events: list[CloudEvent] = []
        now = time.monotonic()
        for frame in frames:
            if frame.problem is None and self._duplicate(frame.data, now):
                self.duplicates += 1
                continue
            scanned_at = self._next_time()
            if frame.problem is not None:
                events.append(self._rejected(frame.data, frame.problem, scanned_at))
                continue
            try:
                content = read_scan(frame.data)
            except Garbled as exc:
                events.append(self._rejected(frame.data, str(exc), scanned_at))
                continue
            order = work_order() if work_order is not None else None
            data = BarcodeScanned(
                station=self._config.station,
                raw=content.text,
                gtin=content.gtin,
                lot=content.lot,
                serial=content.serial,
                expiry=content.expiry,
                quantity=content.quantity,
                sscc=content.sscc,
                work_order=order,
            )
            subject = order or content.lot or self._config.station
            events.append(
                make_event(
                    self._config.event,
                    id=stable_id(self._config.name, self._config.station, content.text, scanned_at.isoformat()),
                    source=self._source_uri,
                    time=scanned_at,
                    site=self._site,
                    # A plain dict, as a transaction's data is: the agent maps its quantity's unit.
                    data=msgspec.to_builtins(data),
                    subject=subject,
                    partitionkey=subject,
                )
            )
        return events

    def _duplicate(self, data: bytes, now: float) -> bool:
        if self._window <= 0:
            return False
        seen = self._seen
        last = seen.pop(data, None)
        seen[data] = now  # re-inserted last: the dict stays in order of last read
        if len(seen) > _MAX_REMEMBERED:
            for key in list(seen)[: len(seen) - _MAX_REMEMBERED]:
                del seen[key]
        # Measured from the last read, suppressed or not: a code held in front of a
        # scanner in presentation mode is one scan however long it stays there.
        return last is not None and now - last < self._window

    def _next_time(self) -> datetime:
        current = datetime.now(UTC)
        if current <= self._last_time:
            current = self._last_time + _ONE_MICROSECOND
        self._last_time = current
        return current

    def _rejected(self, data: bytes, reason: str, scanned_at: datetime) -> CloudEvent:
        self.rejected += 1
        raw = escape_raw(data)
        station = self._config.station
        return make_event(
            "barcode.rejected",
            id=stable_id(self._config.name, station, raw, scanned_at.isoformat()),
            source=self._source_uri,
            time=scanned_at,
            site=self._site,
            data=BarcodeRejected(station=station, raw=raw, reason=reason),
            subject=station,
            partitionkey=station,
        )


class BarcodeSource:
    """Scans from a station's scanners, as the station's configured event.

    ``status.state`` is ``connected`` while listening (tcp-server, however many
    scanners are connected) or while the scanner's connection or port is open,
    ``reconnecting`` while it is being (re)opened. ``status.info`` counts
    ``scans`` (committed), ``rejected``, ``duplicates_suppressed`` and
    ``empty_frames``, gives ``last_scan`` (its time) and, for tcp-server,
    ``scanners`` connected now, ``refused_connections`` and ``listen``.
    """

    def __init__(self, config: BarcodeSourceConfig, *, source_uri: str, site: str):
        self.name = config.name
        self.config = config
        self.status = ComponentStatus(name=config.name, kind="barcode")
        self.reader = ScanReader(config, source_uri=source_uri, site=site)
        self._terminator = config.terminator_bytes()
        self._scans = 0
        self._empty = 0
        self._refused = 0
        self._connections: set[asyncio.Task[Any]] = set()
        self._work_order_missing = False
        self._last_log: dict[str, float] = {}
        self.status.info.update({"mode": config.mode, "station": config.station})
        self._update_counts()

    def tags(self) -> Sequence[str]:
        """A scanner has no tags."""
        return ()

    async def write(self, tag: str, value: Any) -> None:
        """Scanners take no writes."""
        raise SourceError(f"barcode source {self.name!r} has no tag {tag!r} to write")

    async def run(self, output: SourceOutput) -> None:
        """Read scans until cancelled, in the configured mode."""
        runners: dict[str, Callable[[SourceOutput], Awaitable[None]]] = {
            "tcp-server": self._serve,
            "tcp-client": self._connect,
            "serial": self._open_serial,
        }
        try:
            await runners[self.config.mode](output)
        finally:
            for task in list(self._connections):
                task.cancel()
            for task in list(self._connections):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.status.set_state("stopped")

    # --- modes ----------------------------------------------------------------------------------

    async def _serve(self, output: SourceOutput) -> None:
        assert self.config.listen is not None
        host, port = parse_address(self.config.listen, key="listen")
        backoff = _backoff(self.config.reconnect_max_backoff)

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            peer = _peer(writer)
            if len(self._connections) >= self.config.max_connections:
                self._refused += 1
                self._update_counts()
                logger.warning(
                    "Scanner connection refused: too many scanners connected",
                    extra={"source": self.name, "peer": peer, "max_connections": self.config.max_connections},
                )
                writer.close()
                return
            self._connections.add(task)
            _keepalive(writer)
            self._update_counts()
            logger.info("Scanner connected", extra={"source": self.name, "peer": peer})
            try:
                await self._read(reader, peer, output)
            except OSError as exc:
                logger.info("Scanner connection lost", extra={"source": self.name, "peer": peer, "error": str(exc)})
            finally:
                self._connections.discard(task)
                self._update_counts()
                writer.close()

        while True:
            try:
                server = await asyncio.start_server(connected, host, port)
            except OSError as exc:
                self.status.set_state("reconnecting", f"cannot listen on {host}:{port}: {exc.strerror or exc}")
                self._log_rate_limited(
                    "listen", "Cannot listen for scanners", {"listen": f"{host}:{port}", "error": str(exc)}
                )
                await backoff.wait()
                continue
            break
        async with server:
            bound = server.sockets[0].getsockname()
            self.status.info["listen"] = f"{bound[0]}:{bound[1]}"
            self.status.set_state("connected")
            logger.info("Listening for scanners", extra={"source": self.name, "listen": self.status.info["listen"]})
            await asyncio.Event().wait()  # until cancelled; the connections run as the server's tasks

    async def _connect(self, output: SourceOutput) -> None:
        assert self.config.connect is not None
        host, port = parse_address(self.config.connect, key="connect")
        peer = f"{host}:{port}"

        async def open_connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.wait_for(asyncio.open_connection(host, port), self.config.connect_timeout)

        await self._keep_open(output, peer, open_connection)

    async def _open_serial(self, output: SourceOutput) -> None:
        import serial_asyncio_fast

        assert self.config.device is not None
        device = str(self.config.device)

        async def open_port() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await serial_asyncio_fast.open_serial_connection(url=device, **self.config.serial_options())

        await self._keep_open(output, device, open_port)

    async def _keep_open(
        self,
        output: SourceOutput,
        peer: str,
        open_stream: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
    ) -> None:
        """Open the scanner's stream, read it until it ends, open it again after a backoff."""
        backoff = _backoff(self.config.reconnect_max_backoff)
        while True:
            try:
                reader, writer = await open_stream()
            except (OSError, TimeoutError) as exc:
                error = f"cannot open {peer}: {_describe(exc)}"
                self.status.set_state("reconnecting", error)
                self._log_rate_limited("open", "Cannot reach the scanner", {"peer": peer, "error": _describe(exc)})
                await backoff.wait()
                continue
            backoff.reset()
            _keepalive(writer)
            self.status.set_state("connected")
            logger.info("Scanner connected", extra={"source": self.name, "peer": peer})
            try:
                await self._read(reader, peer, output)
                error = f"{peer} closed the connection"
            except OSError as exc:
                error = f"{peer}: {_describe(exc)}"
            finally:
                writer.close()
            self.status.set_state("reconnecting", error)
            logger.warning("Scanner connection lost", extra={"source": self.name, "peer": peer, "error": error})
            await backoff.wait()

    # --- reading --------------------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, peer: str, output: SourceOutput) -> None:
        """Frame and hand over what one connection sends, until it ends (or raises OSError)."""
        framer = Framer(self._terminator, self.config.max_length)
        try:
            while data := await reader.read(_READ_SIZE):
                await self._hand_over(framer.feed(data), framer, peer, output)
        except OSError:
            # Also when the connection failed: a scan without its terminator is reported, not dropped.
            await self._hand_over(framer.close(), framer, peer, output)
            raise
        await self._hand_over(framer.close(), framer, peer, output)

    async def _hand_over(self, frames: list[Frame], framer: Framer, peer: str, output: SourceOutput) -> None:
        if framer.empty:
            self._empty += framer.empty
            framer.empty = 0
        if not frames:
            self._update_counts()
            return
        work_order = self._work_order(output) if self.config.work_order_tag else None
        batch = self.reader.events(frames, work_order=work_order)
        if batch:
            await self._commit(batch, output)
            self.status.info["last_scan"] = batch[-1].time.isoformat()
        reasons = [e.data.reason for e in batch if isinstance(e.data, BarcodeRejected)]
        self._scans += len(batch) - len(reasons)
        if reasons:
            self._log_rate_limited(
                "rejected", "Scan rejected", {"peer": peer, "count": len(reasons), "reason": reasons[0]}
            )
        self._update_counts()

    async def _commit(self, batch: list[CloudEvent], output: SourceOutput) -> None:
        """Hand ``batch`` over until it is committed: the same events, the same ids, after a backoff."""
        backoff = _backoff(5.0)
        while True:
            try:
                await output.events(batch)
            except BufferUnavailable as exc:
                self.status.degraded["buffer"] = f"scans waiting: {exc}"
                self._log_rate_limited("buffer", "Scans not committed, retrying", {"error": str(exc)})
                await backoff.wait()
                continue
            self.status.degraded.pop("buffer", None)
            return

    def _work_order(self, output: SourceOutput) -> Callable[[], str | None]:
        tag = self.config.work_order_tag
        assert tag is not None

        def current() -> str | None:
            reading = output.tag_value(tag)
            value = None if reading is None else reading.value
            order = identifier_string(value) if value is not None else ""
            if not order:
                if not self._work_order_missing:
                    self._work_order_missing = True
                    logger.warning(
                        "Scan without work order: its tag has no value",
                        extra={"source": self.name, "tag": tag},
                    )
                return None
            self._work_order_missing = False
            return order

        return current

    def _update_counts(self) -> None:
        info = self.status.info
        info["scans"] = str(self._scans)
        info["rejected"] = str(self.reader.rejected)
        info["duplicates_suppressed"] = str(self.reader.duplicates)
        info["empty_frames"] = str(self._empty)
        if self.config.mode == "tcp-server":
            info["scanners"] = str(len(self._connections))
            info["refused_connections"] = str(self._refused)

    def _log_rate_limited(self, kind: str, message: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            self._last_log[kind] = now
            logger.warning(message, extra={"source": self.name, **fields})


def _backoff(cap: float) -> Backoff:
    return Backoff(base=min(0.2, cap), cap=cap)


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keep-alive, so a scanner that lost power is noticed within about a minute, not never."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a serial port
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_PROBES)


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
