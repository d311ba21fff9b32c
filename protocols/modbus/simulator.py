"""A filling machine behind a real Modbus TCP server (pymodbus) on loopback, for the demo and tests.

Register map (unit 1, protocol addresses):

==================  ===========  =========================================================
register            type         meaning
==================  ===========  =========================================================
``holding:0``       uint32       good count: a counter of filled bottles (wraps at 2**32)
``holding:2``       uint16       state: 0 stopped, 1 running, 2 fault
``holding:4``       float32      fill weight of the last bottle, grams
``holding:10``      uint32       work order number of the current cycle
``holding:12``      uint16       quantity of the current cycle (bottles)
``holding:20``      string:8     item code of the current cycle (``FILL-500``)
``coil:0``          bool         cycle done: set by the machine when a cycle completes
``coil:1``          bool         cycle ack: written true by the agent once the cycle is committed
==================  ===========  =========================================================

The server's memory lives in pymodbus's own register blocks; the machine's changes
reach them through the device's public ``action`` hook, which pymodbus calls with
the live block on every request (so a change shows from the next request on).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import struct
from collections.abc import Sequence

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

STOPPED, RUNNING, FAULT = 0, 1, 2
GOOD_COUNT, STATE, FILL_WEIGHT, WORK_ORDER, QUANTITY, ITEM = 0, 2, 4, 10, 12, 20
CYCLE_DONE, CYCLE_ACK = 0, 1
_SIZE = 64
_COIL_FUNCTIONS = frozenset({1, 5, 15})


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class FillerSimulator:
    """A filler PLC: counts bottles, reports state and fill weight, completes cycles with an ack handshake.

    ``start``/``stop`` run the server in the current event loop; ``complete_cycle``
    plays one cycle the way the PLC program does; ``run_demo`` animates it.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, unit: int = 1):
        self.host = host
        self.port = port or _free_port(host)
        self.unit = unit
        self.holding = [0] * _SIZE
        self.coils = [False] * 16
        self.good_count = 0
        self.acknowledged: list[tuple[str, int]] = []
        """(work order, quantity) of every cycle the agent acknowledged."""
        self._dirty_holding = True
        self._dirty_coils = True
        self._ack = asyncio.Event()
        self._seen_reset = asyncio.Event()
        self._seen_reset.set()
        self._server: ModbusTcpServer | None = None

    @property
    def endpoint(self) -> str:
        """The ``endpoint`` of a ``[[sources.modbus]]`` entry that reads this machine."""
        return f"tcp://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Serve on ``host:port``; returns once it listens."""
        if self._server is not None:
            return
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        device = SimDevice(
            id=self.unit,
            simdata=(
                bits,
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=_SIZE, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=_SIZE, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._on_request,
        )
        self._dirty_holding = self._dirty_coils = True
        self._server = ModbusTcpServer([device], address=(self.host, self.port))
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        """Stop serving and drop every connection."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.shutdown()

    async def __aenter__(self) -> FillerSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the machine's memory ----------------------------------------------------------------------

    async def _on_request(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code in _COIL_FUNCTIONS:
            if set_values is not None:
                for offset, value in enumerate(set_values):
                    self.coils[address + offset] = bool(value)
                if address <= CYCLE_ACK < address + len(set_values) and self.coils[CYCLE_ACK]:
                    self._ack.set()
            if self._dirty_coils or set_values is not None:
                word = sum(1 << n for n, on in enumerate(self.coils) if on)
                registers[0 - start_address] = word
                self._dirty_coils = False
            if set_values is None and not self.coils[CYCLE_DONE]:
                self._seen_reset.set()  # a reader saw the cycle bit low: the next cycle is a new edge
        elif function_code in (3, 6, 16):
            if set_values is not None:
                for offset, value in enumerate(set_values):
                    self.holding[address + offset] = int(value)
            if self._dirty_holding:
                registers[0 - start_address : _SIZE - start_address] = self.holding
                self._dirty_holding = False
        return None

    def _set_holding(self, address: int, words: Sequence[int]) -> None:
        self.holding[address : address + len(words)] = list(words)
        self._dirty_holding = True

    def _set_coil(self, address: int, value: bool) -> None:
        self.coils[address] = value
        self._dirty_coils = True

    def set_state(self, state: int) -> None:
        """The machine's state register (0 stopped, 1 running, 2 fault)."""
        self._set_holding(STATE, [state])

    def set_fill_weight(self, grams: float) -> None:
        """The last bottle's fill weight (float32)."""
        self._set_holding(FILL_WEIGHT, list(struct.unpack(">HH", struct.pack(">f", grams))))

    def add_good(self, bottles: int) -> None:
        """Count ``bottles`` more good bottles (the counter wraps at 2**32 like the PLC's)."""
        self.good_count = (self.good_count + bottles) % 2**32
        self._set_holding(GOOD_COUNT, [self.good_count >> 16, self.good_count & 0xFFFF])

    def reset_counter(self) -> None:
        """The operator resets the counter to zero (a new shift)."""
        self.good_count = 0
        self._set_holding(GOOD_COUNT, [0, 0])

    async def complete_cycle(
        self, work_order: int, quantity: int, *, item: str = "FILL-500", wait_ack: float | None = None
    ) -> bool:
        """Finish a cycle: count the bottles, set work order, quantity and item, raise the cycle bit.

        With ``wait_ack`` waits up to that many seconds for the agent's ``cycle ack`` and
        returns whether it came; then resets both bits and holds the cycle bit low until
        a reader has seen it low (a polled PLC handshake: otherwise the next cycle would
        be no edge to a poller).
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._seen_reset.wait(), wait_ack or 5.0)
        self.add_good(quantity)
        data = item.encode()[:16].ljust(16, b"\x00")
        self._set_holding(WORK_ORDER, [work_order >> 16, work_order & 0xFFFF])
        self._set_holding(QUANTITY, [quantity])
        self._set_holding(ITEM, [int.from_bytes(data[i : i + 2], "big") for i in range(0, 16, 2)])
        self._ack.clear()
        self._set_coil(CYCLE_DONE, True)
        acked = False
        if wait_ack:
            try:
                await asyncio.wait_for(self._ack.wait(), wait_ack)
                acked = True
            except TimeoutError:
                acked = False
        if acked:
            self.acknowledged.append((str(work_order), quantity))
        self._seen_reset.clear()
        self._set_coil(CYCLE_ACK, False)
        self._set_coil(CYCLE_DONE, False)
        return acked

    # --- demo ------------------------------------------------------------------------------------------

    async def run_demo(self, stop: asyncio.Event) -> None:
        """Animate the filler until ``stop`` is set (for ``plantgate demo``).

        Fill weights vary around 500 g several times a second; the filler runs, now
        and then stops or faults briefly; while running it fills 20-30 bottles and
        completes a cycle about every three seconds (work orders 81001, 81002, ...)
        and waits briefly for the agent's ack.
        """
        await self.start()
        rng = random.Random()
        self.set_state(RUNNING)
        orders = itertools.count(81001)
        work_order = next(orders)
        cycles = 0
        elapsed = 0.0
        next_state_change = rng.uniform(10, 20)
        tick = 0.25
        while not await _stopped(stop, tick):
            elapsed += tick
            running = self.holding[STATE] == RUNNING
            if running:
                self.set_fill_weight(round(rng.gauss(500.0, 1.5), 1))
            if elapsed >= next_state_change:
                elapsed = 0.0
                if running:
                    self.set_state(FAULT if rng.random() < 0.3 else STOPPED)
                    next_state_change = rng.uniform(2, 4)
                else:
                    self.set_state(RUNNING)
                    next_state_change = rng.uniform(10, 20)
            if running and rng.random() < tick / 3.0:
                await self.complete_cycle(work_order, rng.randint(20, 30), wait_ack=2.0)
                cycles += 1
                if cycles % 5 == 0:
                    work_order = next(orders)
        await self.stop()


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), delay)
        return True
    except TimeoutError:
        return False
