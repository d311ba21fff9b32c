"""A real pymodbus server (TCP on loopback, or RTU on a serial port) whose memory the test edits.

The memory lives in the server's own register blocks. pymodbus calls the device's
public ``action`` hook with the live block on every request; the hook applies the
edits the test queued (``set``), records the request (unit, function code,
address, count) and how many requests were being served at once, and can answer
with an exception code. ``get`` reads a block as the last request left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tty
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

_BLOCK_OF_FUNCTION = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding"}
_BLOCK_OF_FUNCTION[4] = "input"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Request:
    """One request the server served."""

    unit: int
    function: int
    address: int
    count: int
    write: bool


@dataclass
class _Unit:
    pending: dict[str, list[tuple[int, list[int] | list[bool]]]] = field(default_factory=dict)
    blocks: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # live (start, registers)


class ModbusPeer:
    """Holding and input registers ``0..size-1``, coils and discrete inputs ``0..size-1``, per unit id.

    ``tcp()`` / ``serial(port)`` pick the transport; ``start``/``stop`` run it in this event loop.
    Addresses at or beyond ``size`` answer exception 2 (illegal data address).
    """

    def __init__(self, units: Sequence[int] = (1,), *, size: int = 512):
        self.size = size
        self.units = {unit: _Unit() for unit in units}
        self.requests: list[Request] = []
        self.serving = 0
        self.max_serving = 0
        self.busy: set[tuple[int, str]] = set()  # (unit, block) answering exception 6 (device busy)
        self.silent: set[int] = set()  # units whose answers are never sent (a device that is away)
        self.garbled: set[int] = set()  # units whose answers go out with a broken checksum / frame
        self.dropped = 0
        self.delay = 0.0  # seconds each request takes to answer (a slow device)
        self.host = "127.0.0.1"
        self.port = 0
        self._serial_port: str | None = None
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    # --- editing the memory -----------------------------------------------------------------------

    def set(self, block: str, address: int, values: Sequence[int] | Sequence[bool], *, unit: int | None = None) -> None:
        """Queue ``values`` for ``block`` ("coil", "discrete", "input", "holding") from ``address``.

        Applied by the server before it serves the next request of that block.
        """
        target = self.units[unit if unit is not None else next(iter(self.units))]
        target.pending.setdefault(block, []).append((address, list(values)))

    def get(self, block: str, address: int, count: int = 1, *, unit: int | None = None) -> list[int] | list[bool]:
        """Values of ``block`` as the server holds them now (after the last request of that block)."""
        target = self.units[unit if unit is not None else next(iter(self.units))]
        start, registers = target.blocks[block]
        if block in ("coil", "discrete"):
            out_bits: list[bool] = []
            for bit in range(address, address + count):
                word = registers[bit // 16 - start]
                out_bits.append(bool(word >> (bit % 16) & 1))
            return out_bits
        return [registers[address - start + i] for i in range(count)]

    def count(self, *, unit: int | None = None, write: bool | None = None) -> int:
        """Requests served (of one unit, reads or writes only)."""
        return sum(
            1
            for request in self.requests
            if (unit is None or request.unit == unit) and (write is None or request.write == write)
        )

    # --- the server ----------------------------------------------------------------------------------

    def _device(self, unit: int) -> SimDevice:
        state = self.units[unit]

        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            block = _BLOCK_OF_FUNCTION.get(function_code, "holding")
            state.blocks[block] = (start_address, registers)
            self.serving += 1
            self.max_serving = max(self.max_serving, self.serving)
            try:
                self.requests.append(Request(unit, function_code, address, count, set_values is not None))
                for edit_address, values in state.pending.pop(block, []):
                    _apply(block, start_address, registers, edit_address, values)
                if (unit, block) in self.busy:
                    return ExcCodes.DEVICE_BUSY
                await asyncio.sleep(self.delay)  # let a second request in, if the client would send one
                return None
            finally:
                self.serving -= 1

        bits = [SimData(0, count=self.size, values=False, datatype=DataType.BITS)]
        registers = [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(
            id=unit,
            simdata=(
                bits,
                [SimData(0, count=self.size, values=False, datatype=DataType.BITS)],
                registers,
                [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    def _outgoing(self, sending: bool, packet: bytes) -> bytes:
        """pymodbus's public packet trace hook: silence or garble the answers of chosen units."""
        if not sending or not packet:
            return packet
        unit = packet[0] if self._serial_port is not None else packet[6] if len(packet) > 6 else -1
        if unit in self.silent:
            self.dropped += 1
            return b""
        if unit in self.garbled:
            return packet[:-1] + bytes([packet[-1] ^ 0xFF])
        return packet

    def tcp(self, port: int | None = None) -> ModbusPeer:
        """Serve Modbus TCP on 127.0.0.1 (a free port unless given)."""
        self.port = port or self.port or free_port()
        self._serial_port = None
        return self

    def serial(self, port: str) -> ModbusPeer:
        """Serve Modbus RTU on the serial device ``port`` (one side of a pty pair)."""
        self._serial_port = port
        return self

    @property
    def endpoint(self) -> str:
        """The ``endpoint`` the source config names (TCP only)."""
        return f"tcp://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start serving; returns once the server listens."""
        devices = [self._device(unit) for unit in self.units]
        if self._serial_port is not None:
            self._server = ModbusSerialServer(
                devices, port=self._serial_port, baudrate=115200, timeout=0.5, trace_packet=self._outgoing
            )
        else:
            self._server = ModbusTcpServer(devices, address=(self.host, self.port), trace_packet=self._outgoing)
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        """Stop serving and close every connection."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.shutdown()

    async def __aenter__(self) -> ModbusPeer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


def _apply(block: str, start: int, registers: list[int], address: int, values: list[int] | list[bool]) -> None:
    if block in ("coil", "discrete"):
        for offset, value in enumerate(values):
            bit = address + offset
            index = bit // 16 - start
            mask = 1 << (bit % 16)
            registers[index] = registers[index] | mask if value else registers[index] & ~mask
        return
    for offset, value in enumerate(values):
        registers[address - start + offset] = int(value) & 0xFFFF


class NullModem:
    """Two pseudo-terminals joined like a null-modem cable: bytes written to one come out of the other.

    ``ports`` are the two device paths (a serial server opens one, the source the
    other). Started and stopped in this event loop; no external tool needed.
    """

    def __init__(self) -> None:
        self._fds: list[int] = []
        masters: list[int] = []
        paths: list[str] = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)
            masters.append(master)
            paths.append(os.ttyname(slave))
            self._fds += [master, slave]
        self._masters = masters
        self.ports = (paths[0], paths[1])
        self.bytes_carried = 0

    def start(self) -> None:
        """Carry bytes both ways from now on."""
        loop = asyncio.get_running_loop()
        a, b = self._masters
        loop.add_reader(a, self._carry, a, b)
        loop.add_reader(b, self._carry, b, a)

    def _carry(self, source: int, target: int) -> None:
        try:
            data = os.read(source, 4096)
        except OSError:  # the other side closed its end
            return
        self.bytes_carried += len(data)
        os.write(target, data)

    def stop(self) -> None:
        """Stop carrying and close both pseudo-terminals."""
        loop = asyncio.get_running_loop()
        for master in self._masters:
            loop.remove_reader(master)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
