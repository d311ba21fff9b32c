"""A simulated barcode scanner on loopback TCP, for ``plantgate demo`` and the tests.

``ScannerSimulator`` behaves like a networked scanner in either role:

- ``ScannerSimulator(connect="127.0.0.1:9101")`` connects to an agent's
  ``tcp-server`` barcode source (``listen``), as most fixed-mount scanners do;
- ``ScannerSimulator()`` listens on a free loopback port (``address``) and sends its
  scans to whoever connects, like a scanner an agent's ``tcp-client`` source
  connects to.

``scan(code)`` sends one code followed by the terminator. ``run_demo(stop)`` sends,
every second or two, a mix a receiving dock sees: GS1-128 (``]C1``), GS1 DataMatrix
(``]d2``) and GS1 QR (``]Q3``) codes with GTIN, lot, serial, expiry and quantity, a
plain Code 128 label, a double read (the same code twice within a few
milliseconds) and now and then a garbled read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random

logger = logging.getLogger(__name__)

GS = "\x1d"

DEMO_GTINS = ("05012345678900", "04006381333931", "09501101530003")


def demo_scans(rng: random.Random, number: int) -> list[bytes]:
    """The codes of demo round ``number``: usually one, two for a double read."""
    gtin = rng.choice(DEMO_GTINS)
    lot = f"L{2600 + number % 7}"
    kind = number % 8
    if kind in (0, 3):
        return [f"]C101{gtin}{GS}10{lot}{GS}17271231{GS}37{rng.choice((6, 12, 24))}".encode()]
    if kind in (1, 5):
        return [f"]d201{gtin}17270630{GS}10{lot}{GS}21SN{number:06d}".encode()]
    if kind == 2:
        return [f"]Q301{gtin}30{rng.randint(1, 40)}".encode()]
    if kind == 4:
        return [f"]C0PALLET-{number:05d}".encode()]
    if kind == 6:
        code = f"]C101{gtin}{GS}10{lot}{GS}3705".encode()
        return [code, code]  # the scanner reads the label twice
    return [b"]C101" + gtin[:9].encode() + b"\x00\x7f" + gtin[9:].encode()]  # a smudged read


class ScannerSimulator:
    """A TCP barcode scanner: connects to ``connect`` (host:port), or listens when ``connect`` is None."""

    def __init__(
        self, *, connect: str | None = None, host: str = "127.0.0.1", port: int = 0, terminator: bytes = b"\r"
    ):
        self.connect = connect
        self.terminator = terminator
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.sent = 0

    @property
    def address(self) -> str:
        """``host:port`` the simulator listens on (listening role, after ``start``)."""
        if self._server is None:
            raise RuntimeError("the scanner simulator is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    @property
    def connected(self) -> int:
        """How many connections the scans go to now."""
        return sum(1 for writer in self._writers if not writer.is_closing())

    async def start(self) -> None:
        """Listen, or connect to the agent (``OSError`` when it does not answer)."""
        if self.connect is None:
            self._server = await asyncio.start_server(self._accepted, self._host, self._port)
            return
        host, _, port = self.connect.rpartition(":")
        _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        self._writers.add(writer)

    async def stop(self) -> None:
        """Close every connection, and stop listening."""
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._writers.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ScannerSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def scan(self, code: str | bytes) -> int:
        """Send ``code`` and the terminator to every connection; returns how many it went to."""
        data = (code.encode("latin-1") if isinstance(code, str) else code) + self.terminator
        return await self.send(data)

    async def send(self, data: bytes) -> int:
        """Send raw bytes (a partial frame, garbage) to every connection."""
        sent = 0
        for writer in list(self._writers):
            if writer.is_closing():
                self._writers.discard(writer)
                continue
            try:
                writer.write(data)
                await writer.drain()
                sent += 1
            except OSError:
                self._writers.discard(writer)
                writer.close()
        self.sent += sent
        return sent

    async def run_demo(self, stop: asyncio.Event, *, interval: float = 1.5) -> None:
        """Scan the demo mix about every ``interval`` seconds until ``stop`` is set; reconnects as needed."""
        rng = random.Random()
        if self._server is None and not self._writers:
            with contextlib.suppress(OSError):
                await self.start()
        try:
            for number in itertools.count():
                if await _stopped(stop, rng.uniform(interval * 2 / 3, interval * 4 / 3)):
                    return
                if self.connect is not None and not self.connected:
                    try:
                        await self.start()
                    except OSError as exc:
                        logger.debug("Scanner simulator cannot connect", extra={"error": str(exc)})
                        continue
                for code in demo_scans(rng, number):
                    await self.scan(code)
        finally:
            await self.stop()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        # Scanners send only; reading tells when the agent hangs up.
        with contextlib.suppress(OSError):
            while await reader.read(1024):
                pass
        self._writers.discard(writer)
        writer.close()


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return False
    return True
