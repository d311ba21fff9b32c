"""Modbus source: polls a device's registers on a fixed schedule, hands over what changed, writes acks.

Reads are planned once (``protocols.modbus.registers.plan_reads``): per unit id and
table, contiguous and nearby tags share one request. Every poll sends those
requests through the device's ``ModbusLine`` and hands the values that changed
since the last committed poll to ``output.readings`` in one batch (the first poll:
all). A value counts as seen only once that batch is committed, so a batch the
buffer refuses is offered again by the next poll.

Failures are kept apart by what they say about the device:

- an exception response (illegal address, device busy, ...) or no answer to one
  request while the device answers others: that request's tags go bad (one bad
  reading each, when they change from good), the range and each tag are listed in
  ``status.degraded``, and the request is retried with capped jittered backoff
  while the other requests keep polling;
- no answer at all (connection refused, every request timed out, the serial port
  gone): the device is away, ``status.state`` is ``reconnecting``, and the whole
  device is retried with capped jittered backoff (``reconnect_max_backoff``).

Polls run on a fixed schedule (``poll_interval`` after the previous tick, not
after the previous poll ended); a poll that overruns skips the ticks it missed
instead of bursting to catch up (counted in ``status.info["skipped_polls"]``).

One ``ModbusLine`` exists per serial device (and per TCP peer), shared through the
build context by every source naming it: it owns the port and sends one request
at a time, so the unit ids on an RS-485 line are polled in turn, never two
requests on the wire at once, however many sources name the line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from agent.backoff import Backoff
from agent.events import Quality, Reading
from agent.health import ComponentStatus
from agent.source import BufferUnavailable, SourceError, SourceOutput
from protocols.modbus import Endpoint, ModbusSourceConfig, ModbusTagConfig
from protocols.modbus.registers import (
    BIT_TABLES,
    EXCEPTION_NAMES,
    Point,
    ReadRequest,
    ValueType,
    decode,
    encode,
    plan_reads,
)

logger = logging.getLogger(__name__)

ModbusClient = AsyncModbusTcpClient | AsyncModbusSerialClient
Call = Callable[[ModbusClient], Awaitable[ModbusPDU]]

_TRANSPORT_ERRORS = (ModbusException, OSError, TimeoutError)


def exception_text(code: int) -> str:
    """``exception 2 (illegal data address)``: how /status and logs name a Modbus exception code."""
    name = EXCEPTION_NAMES.get(code)
    return f"exception {code} ({name})" if name else f"exception {code}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionException | ConnectionError):
        return f"cannot connect ({exc})" if str(exc) else "cannot connect"
    if isinstance(exc, ModbusIOException | TimeoutError):
        return "no valid response (timeout or CRC error)"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _PymodbusNoiseFilter(logging.Filter):
    """Drops pymodbus's own reports of what this source reports once itself (no answer, cannot connect).

    pymodbus logs every unanswered request as an ERROR with a dump of the last frames;
    the source's single WARNING per failing read (and per device away) says the same.
    Anything else from pymodbus passes unchanged.
    """

    _EXPECTED = (
        "No response received",
        "Failed to connect",
        "Not connected, trying to connect",
        "Cancel send, because not connected",
        "Repeating....",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        return not message.startswith(self._EXPECTED)


_NOISE_FILTER = _PymodbusNoiseFilter()


def _install_noise_filter() -> None:
    log = logging.getLogger("pymodbus.logging")
    if _NOISE_FILTER not in log.filters:
        log.addFilter(_NOISE_FILTER)


class ModbusLine:
    """One connection to a Modbus TCP peer, or one serial port: the only way requests reach it.

    Requests go out one at a time, in the order they were asked for (a FIFO
    lock), whichever source asks. The connection is opened on the first request
    and again after it broke. ``max_in_flight`` records the most requests ever
    outstanding at once: 1 by construction, and monitoring can see it.
    """

    def __init__(self, endpoint: Endpoint, *, timeout: float, retries: int):
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self._client: ModbusClient | None = None
        self._lock = asyncio.Lock()
        self.requests = 0
        """Requests sent on this line (reads and writes, every unit)."""
        self.in_flight = 0
        self.max_in_flight = 0
        self.connects = 0
        self.users = 0
        """Running sources on this line; the connection closes when the last one stops."""

    def _new_client(self) -> ModbusClient:
        endpoint = self.endpoint
        # reconnect_delay=0: the library does not reconnect behind our back; the next
        # request does, after the source's own backoff.
        if endpoint.scheme == "tcp":
            return AsyncModbusTcpClient(
                endpoint.host,
                port=endpoint.port,
                timeout=self.timeout,
                retries=self.retries,
                reconnect_delay=0,
                name=str(endpoint),
            )
        return AsyncModbusSerialClient(
            endpoint.device,
            framer=FramerType.RTU,
            baudrate=endpoint.baudrate,
            bytesize=endpoint.bytesize,
            parity=endpoint.parity,
            stopbits=endpoint.stopbits,
            timeout=self.timeout,
            retries=self.retries,
            reconnect_delay=0,
            name=str(endpoint),
        )

    async def _connected(self) -> ModbusClient:
        client = self._client
        if client is not None and client.connected:
            return client
        if client is not None:
            client.close()
            self._client = None
        client = self._new_client()
        try:
            async with asyncio.timeout(self.timeout + 1.0):
                ok = await client.connect()
        except TimeoutError:
            ok = False
        if not ok:
            client.close()
            raise ConnectionError(f"{self.endpoint} does not accept a connection")
        self.connects += 1
        self._client = client
        return client

    async def execute(self, call: Call) -> ModbusPDU:
        """Send one request (connecting first if needed) and return its response, exception responses included.

        Raises ``ConnectionError`` when the line cannot be opened, pymodbus's
        ``ModbusIOException`` when no valid response came (timeout, CRC error), and
        ``ConnectionException`` when the connection broke.
        """
        async with self._lock:
            client = await self._connected()
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await call(client)
            except ConnectionException:
                self._drop()
                raise
            finally:
                self.in_flight -= 1

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def attach(self) -> None:
        """A source starts using the line."""
        self.users += 1

    def detach(self) -> None:
        """A source stopped; the last one closes the connection."""
        self.users = max(0, self.users - 1)
        if self.users == 0:
            self._drop()


@dataclass
class _Slot:
    """One tag: where it is, how to decode it, and what was last committed for it."""

    config: ModbusTagConfig
    unit: int
    table: str
    address: int
    vtype: ValueType
    raw: Any = None  # registers (tuple) or bit of the last committed value
    value: Any = None
    quality: Quality | None = None  # None: nothing committed yet

    def scaled(self, raw_value: bool | int | float | str) -> bool | int | float | str:
        config = self.config
        if isinstance(raw_value, bool | str) or (config.scale == 1.0 and config.offset == 0.0):
            return raw_value
        return raw_value * config.scale + config.offset


@dataclass
class _Read:
    """One planned request and its failure state."""

    unit: int
    request: ReadRequest
    backoff: Backoff
    retry_at: float = 0.0
    error: str | None = None
    failures: int = 0
    slots: list[_Slot] = field(default_factory=list)

    async def send(self, client: ModbusClient) -> ModbusPDU:
        request = self.request
        table, start, count, unit = request.table, request.start, request.count, self.unit
        if table == "holding":
            return await client.read_holding_registers(start, count=count, device_id=unit)
        if table == "input":
            return await client.read_input_registers(start, count=count, device_id=unit)
        if table == "coil":
            return await client.read_coils(start, count=count, device_id=unit)
        return await client.read_discrete_inputs(start, count=count, device_id=unit)


class ModbusSource:
    """Polls one Modbus device (a unit id, with per-tag unit overrides) and writes its handshake tags.

    Implements ``agent.source.Source``; see the module docstring for the polling,
    failure and serial-line rules. ``status.info`` shows ``requests_per_poll``,
    ``last_poll_ms``, ``polls``, ``skipped_polls``, ``errors`` (failed requests since
    start) and ``uncommitted`` (polls whose batch the buffer refused).
    """

    kind = "modbus"

    def __init__(self, config: ModbusSourceConfig, *, line: ModbusLine):
        self.config = config
        self.name = config.name
        self.line = line
        self.status = ComponentStatus(name=config.name, kind=self.kind)
        self._slots = [
            _Slot(
                config=tag,
                unit=tag.unit if tag.unit is not None else config.unit,
                table=tag.location[0],
                address=tag.location[1],
                vtype=tag.value_type,
            )
            for tag in config.tags
        ]
        self._by_tag = {slot.config.tag: slot for slot in self._slots}
        self._reads: list[_Read] = []
        for unit in sorted({slot.unit for slot in self._slots}):
            points = [
                Point(slot.table, slot.address, slot.vtype.registers if slot.table not in BIT_TABLES else 1, index)  # type: ignore[arg-type]
                for index, slot in enumerate(self._slots)
                if slot.unit == unit
            ]
            for request in plan_reads(
                points, gap_max=config.gap_max, max_registers=config.max_registers, max_bits=config.max_bits
            ):
                read = _Read(
                    unit=unit,
                    request=request,
                    backoff=Backoff(base=min(1.0, config.error_max_backoff), cap=config.error_max_backoff),
                )
                read.slots = [self._slots[index] for index, _, _ in request.members]
                self._reads.append(read)
        cap = config.reconnect_max_backoff
        self._device_backoff = Backoff(base=min(0.5, cap), cap=cap, minimum=min(0.1, cap))
        self._multi_unit = len({read.unit for read in self._reads}) > 1
        self.polls = 0
        self.skipped_polls = 0
        self.errors = 0
        self.uncommitted = 0
        self.requests_per_poll = 0
        self.status.info["reads_planned"] = str(len(self._reads))

    @property
    def reads(self) -> Sequence[ReadRequest]:
        """The planned requests of one full poll."""
        return [read.request for read in self._reads]

    def tags(self) -> Sequence[str]:
        """The tag names of this source, in config order."""
        return [slot.config.tag for slot in self._slots]

    # --- polling --------------------------------------------------------------------------------

    async def run(self, output: SourceOutput) -> None:
        """Poll until cancelled; back off while the device does not answer."""
        interval = self.config.poll_interval
        _install_noise_filter()
        self.line.attach()
        log = {"source": self.name, "endpoint": str(self.line.endpoint), "unit": self.config.unit}
        reachable_before: bool | None = None
        down_since = time.monotonic()
        try:
            next_tick = time.monotonic()
            while True:
                reachable = await self._poll(output)
                if not reachable:
                    if reachable_before is not False:
                        down_since = time.monotonic()
                        logger.warning(
                            "Modbus device does not answer, retrying", extra={**log, "error": self.status.last_error}
                        )
                    reachable_before = False
                    await self._device_backoff.wait()
                    next_tick = time.monotonic()
                    continue
                if reachable_before is False:
                    downtime = round(time.monotonic() - down_since, 1)
                    logger.info("Modbus device answers again", extra={**log, "downtime_s": downtime})
                elif reachable_before is None:
                    logger.info("Polling Modbus device", extra={**log, "reads": len(self._reads)})
                reachable_before = True
                self._device_backoff.reset()
                next_tick += interval
                now = time.monotonic()
                if now > next_tick:
                    missed = math.ceil((now - next_tick) / interval)
                    self.skipped_polls += missed
                    next_tick += missed * interval
                    self.status.info["skipped_polls"] = str(self.skipped_polls)
                await asyncio.sleep(next_tick - now)
        except asyncio.CancelledError:
            self.status.set_state("stopped")
            raise
        finally:
            self.line.detach()

    async def _poll(self, output: SourceOutput) -> bool:
        """One poll: every due read, then one batch of what changed. False when the device did not answer at all."""
        started = time.monotonic()
        seen_at = datetime.now(UTC)
        batch: list[Reading] = []
        updates: list[tuple[_Slot, Any, Any, Quality]] = []
        attempted = answered = 0
        unanswered: list[tuple[_Read, str]] = []
        for read in self._reads:
            if read.retry_at > started:
                continue
            if not answered and len(unanswered) >= 2:
                break  # nothing answered twice in a row: the device is away, do not wait out every timeout
            attempted += 1
            try:
                response = await self.line.execute(read.send)
            except ConnectionError as exc:  # the line cannot be opened: the rest would fail the same way
                unanswered.append((read, _describe(exc)))
                break
            except _TRANSPORT_ERRORS as exc:
                unanswered.append((read, _describe(exc)))
                continue
            answered += 1
            if response.isError():
                self._failed(read, exception_text(response.exception_code), seen_at, batch, updates)
                continue
            self._succeeded(read, response, seen_at, batch, updates)
        self.polls += 1
        self.requests_per_poll = attempted
        reachable = answered > 0 or attempted == 0
        if reachable:
            for read, error in unanswered:
                self._failed(read, error, seen_at, batch, updates)
            self.status.set_state("connected")
            # Reads that failed while others answered wait out their own backoff.
            now = time.monotonic()
            for read in self._reads:
                if read.error is not None and read.retry_at <= started:
                    read.retry_at = now + read.backoff.next_delay()
        else:
            self.errors += len(unanswered)
            for read in self._reads:
                self._mark_bad(read, seen_at, batch, updates)
            error = unanswered[-1][1] if unanswered else "no answer"
            self.status.set_state("reconnecting", f"{self.line.endpoint} unit {self.config.unit}: {error}")
        if batch:
            await self._commit(output, batch, updates)
        info = self.status.info
        info["requests_per_poll"] = str(attempted)
        info["last_poll_ms"] = f"{(time.monotonic() - started) * 1000:.1f}"
        info["polls"] = str(self.polls)
        info["errors"] = str(self.errors)
        info["line_requests"] = str(self.line.requests)
        return reachable

    def _succeeded(
        self,
        read: _Read,
        response: ModbusPDU,
        seen_at: datetime,
        batch: list[Reading],
        updates: list[tuple[_Slot, Any, Any, Quality]],
    ) -> None:
        request = read.request
        bits = request.table in BIT_TABLES
        values: Sequence[Any] = response.bits if bits else response.registers
        if len(values) < request.count:
            self._failed(read, f"short response ({len(values)} of {request.count})", seen_at, batch, updates)
            return
        if read.error is not None:
            logger.info(
                "Modbus read works again",
                extra={"source": self.name, "unit": read.unit, "range": request.key, "failures": read.failures},
            )
            read.error = None
            read.failures = 0
            read.backoff.reset()
            read.retry_at = 0.0
            self._clear_degraded(read)
        for (_, offset, count), slot in zip(request.members, read.slots, strict=True):
            raw = bool(values[offset]) if bits else tuple(values[offset : offset + count])
            if slot.quality == "good" and raw == slot.raw:
                continue
            if bits:
                value: Any = raw
            else:
                config = slot.config
                value = slot.scaled(
                    decode(raw, slot.vtype, byte_order=config.byte_order, word_order=config.word_order)  # type: ignore[arg-type]
                )
            if slot.quality == "good" and value == slot.value:
                continue  # a float NaN pattern or string padding that changed nothing visible
            batch.append(Reading(slot.config.tag, value, seen_at, "good"))
            updates.append((slot, raw, value, "good"))

    def _failed(
        self,
        read: _Read,
        error: str,
        seen_at: datetime,
        batch: list[Reading],
        updates: list[tuple[_Slot, Any, Any, Quality]],
    ) -> None:
        self.errors += 1
        read.failures += 1
        first = read.error is None
        read.error = error
        if first:
            logger.warning(
                "Modbus read failed; its tags are bad until it works again",
                extra={
                    "source": self.name,
                    "unit": read.unit,
                    "range": read.request.key,
                    "tags": len(read.slots),
                    "error": error,
                },
            )
        degraded = self.status.degraded
        prefix = f"unit {read.unit} " if self._multi_unit else ""
        degraded[f"{prefix}{read.request.key}"] = error
        for slot in read.slots:
            degraded[slot.config.tag] = error
        self._mark_bad(read, seen_at, batch, updates)

    @staticmethod
    def _mark_bad(
        read: _Read, seen_at: datetime, batch: list[Reading], updates: list[tuple[_Slot, Any, Any, Quality]]
    ) -> None:
        for slot in read.slots:
            if slot.quality == "bad":
                continue
            if any(update[0] is slot for update in updates):
                continue
            batch.append(Reading(slot.config.tag, slot.value, seen_at, "bad"))
            updates.append((slot, slot.raw, slot.value, "bad"))

    def _clear_degraded(self, read: _Read) -> None:
        degraded = self.status.degraded
        prefix = f"unit {read.unit} " if self._multi_unit else ""
        degraded.pop(f"{prefix}{read.request.key}", None)
        for slot in read.slots:
            degraded.pop(slot.config.tag, None)

    async def _commit(
        self, output: SourceOutput, batch: list[Reading], updates: list[tuple[_Slot, Any, Any, Quality]]
    ) -> None:
        try:
            await output.readings(batch)
        except BufferUnavailable as exc:
            # Not seen: the next poll offers these values again.
            self.uncommitted += 1
            self.status.info["uncommitted"] = str(self.uncommitted)
            if self.uncommitted == 1 or self.uncommitted % 100 == 0:
                logger.warning(
                    "Modbus poll not committed; offered again next poll",
                    extra={"source": self.name, "error": str(exc) or type(exc).__name__, "count": self.uncommitted},
                )
            return
        for slot, raw, value, quality in updates:
            slot.raw, slot.value, slot.quality = raw, value, quality

    # --- writes (PLC handshake) -----------------------------------------------------------------

    async def write(self, tag: str, value: Any) -> None:
        """Write ``value`` to a coil (write_coil) or holding register(s) (encoded per the tag's type).

        Raises ``SourceError`` for a read-only table, a value that does not fit, no
        answer, or an exception response.
        """
        slot = self._by_tag.get(tag)
        if slot is None:
            raise SourceError(f"{self.name}: no tag {tag!r} on this source")
        config = slot.config
        if slot.table == "coil":

            async def call(client: ModbusClient) -> ModbusPDU:
                return await client.write_coil(slot.address, bool(value), device_id=slot.unit)

        elif slot.table == "holding":
            try:
                registers = encode(
                    self._raw_for_write(slot, value),
                    slot.vtype,
                    byte_order=config.byte_order,
                    word_order=config.word_order,
                )
            except (ValueError, TypeError) as exc:
                where = f"{tag} ({config.register_text})"
                raise SourceError(f"{self.name}: cannot write {value!r} to {where}: {exc}") from exc

            async def call(client: ModbusClient) -> ModbusPDU:
                if len(registers) == 1:
                    return await client.write_register(slot.address, registers[0], device_id=slot.unit)
                return await client.write_registers(slot.address, registers, device_id=slot.unit)

        else:
            raise SourceError(f"{self.name}: {tag} is a {slot.table} ({config.register_text}), which cannot be written")
        try:
            response = await self.line.execute(call)
        except _TRANSPORT_ERRORS as exc:
            raise SourceError(f"{self.name}: writing {tag} ({config.register_text}) failed: {_describe(exc)}") from exc
        if response.isError():
            raise SourceError(
                f"{self.name}: device refused the write to {tag} ({config.register_text}): "
                f"{exception_text(response.exception_code)}"
            )

    @staticmethod
    def _raw_for_write(slot: _Slot, value: Any) -> bool | int | float | str:
        config = slot.config
        if slot.vtype.name == "bool" or slot.vtype.is_string:
            return value if isinstance(value, str) and slot.vtype.is_string else bool(value)
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int | float):
            raise ValueError(f"{value!r} is not a number")
        raw = (value - config.offset) / config.scale if (config.scale != 1.0 or config.offset != 0.0) else value
        if slot.vtype.integer:
            return round(raw)
        return float(raw)
