"""The Modbus source against real servers on loopback: pymodbus (TCP and RTU over a pty pair) and pyModbusTCP."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pyModbusTCP.server import ModbusServer

from agent.events import CloudEvent, Reading
from agent.source import BufferUnavailable, SourceError
from protocols.modbus import ModbusSourceConfig
from protocols.modbus.source import ModbusSource
from tests.build import context
from tests.peers.modbus_server import ModbusPeer, NullModem, free_port
from tests.peers.waiting import wait_for


class Recorder:
    """The agent side of ``output.readings``: keeps every committed batch; ``refuse`` makes commits fail."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []
        self.refuse = False
        self.refused = 0

    async def readings(self, batch: Sequence[Reading]) -> None:
        if self.refuse:
            self.refused += 1
            raise BufferUnavailable("disk full")
        self.batches.append(list(batch))

    def of(self, tag: str) -> list[Reading]:
        return [r for batch in self.batches for r in batch if r.tag == tag]

    def values(self, tag: str) -> list[Any]:
        return [r.value for r in self.of(tag) if r.quality == "good"]

    def latest(self, tag: str, value: Any) -> Callable[[], bool]:
        """A condition: the last good value of ``tag`` is ``value``."""
        return lambda: self.values(tag)[-1:] == [value]

    def turned_bad(self, tag: str) -> bool:
        found = self.of(tag)
        return bool(found) and found[-1].quality == "bad"

    async def events(self, batch: Sequence[CloudEvent], *, state: Mapping[str, str | None] | None = None) -> None:
        raise NotImplementedError

    def tag_value(self, tag: str) -> Reading | None:
        found = self.of(tag)
        return found[-1] if found else None

    def refusing(self) -> str | None:
        return "disk full" if self.refuse else None

    async def load_state(self, key: str) -> str | None:
        return None

    async def save_state(self, key: str, value: str | None) -> None:
        return None


def make_config(endpoint: str, tags: list[dict[str, Any]], **overrides: Any) -> ModbusSourceConfig:
    settings: dict[str, Any] = {
        "name": "filler2",
        "endpoint": endpoint,
        "poll_interval": "50ms",
        "timeout": "300ms",
        "reconnect_max_backoff": "300ms",
        "error_max_backoff": "300ms",
        "tags": tags,
    }
    settings.update(overrides)
    return ModbusSourceConfig.model_validate(settings)


@contextlib.asynccontextmanager
async def polling(source: ModbusSource) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    task = asyncio.create_task(source.run(recorder))
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build(config: ModbusSourceConfig, tmp_path: Path) -> ModbusSource:
    source = config.build(context(tmp_path))
    assert isinstance(source, ModbusSource)
    return source


@pytest.fixture
async def peer() -> AsyncIterator[ModbusPeer]:
    server = ModbusPeer((1,)).tcp()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- every type and order, against two independent server implementations ---------------------------

# (tag settings, registers to put at the address, expected value)
CASES: list[tuple[dict[str, Any], list[int], Any]] = [
    ({"type": "int16"}, [0xFFFE], -2),
    ({"type": "uint16"}, [0xFFFE], 65534),
    ({"type": "uint16", "byte_order": "little"}, [0x3412], 0x1234),
    ({"type": "int32"}, [0xFFFF, 0xFFFD], -3),
    ({"type": "uint32"}, [0x0001, 0x0002], 65538),
    ({"type": "uint32", "word_order": "little"}, [0x0002, 0x0001], 65538),
    ({"type": "uint32", "word_order": "little", "byte_order": "little"}, [0x0200, 0x0100], 65538),
    ({"type": "float32"}, list(struct.unpack(">HH", struct.pack(">f", 12.3))), 12.3),
    ({"type": "float32", "word_order": "little"}, list(struct.unpack(">HH", struct.pack(">f", -0.5)))[::-1], -0.5),
    ({"type": "float64"}, list(struct.unpack(">HHHH", struct.pack(">d", 1234.5678))), 1234.5678),
    ({"type": "float64", "word_order": "little"}, list(struct.unpack(">HHHH", struct.pack(">d", 2.25)))[::-1], 2.25),
    ({"type": "uint16", "scale": 0.1, "offset": -40.0}, [650], 650 * 0.1 - 40.0),
    ({"type": "int16", "scale": 10.0}, [0xFFFF], -10.0),
    ({"type": "string:4"}, [0x4649, 0x4C4C, 0x2D35, 0x2000], "FILL-5"),
    ({"type": "string:3", "byte_order": "little"}, [0x4241, 0x0043, 0x0000], "ABC"),
    ({"type": "bool"}, [7], True),
]


def _case_tags(table: str = "holding") -> tuple[list[dict[str, Any]], dict[int, list[int]], dict[str, Any]]:
    tags: list[dict[str, Any]] = []
    memory: dict[int, list[int]] = {}
    expected: dict[str, Any] = {}
    address = 10
    for index, (settings, registers, value) in enumerate(CASES):
        name = f"t{index}.{settings['type']}"
        tags.append({"tag": name, "register": f"{table}:{address}", **settings})
        memory[address] = registers
        expected[name] = value
        address += len(registers) + 1
    return tags, memory, expected


async def test_types_orders_scale_and_offset_decode_against_pymodbus(peer: ModbusPeer, tmp_path: Path) -> None:
    tags, memory, expected = _case_tags("holding")
    input_tags, input_memory, input_expected = _case_tags("input")
    input_tags = [{**tag, "tag": "in." + tag["tag"]} for tag in input_tags]
    for address, registers in memory.items():
        peer.set("holding", address, registers)
    for address, registers in input_memory.items():
        peer.set("input", address, registers)
    peer.set("coil", 3, [True])
    peer.set("discrete", 17, [True])
    tags += [
        *input_tags,
        {"tag": "coil3", "register": "coil:3", "type": "bool"},
        {"tag": "coil4", "register": "coil:4"},  # bool is the default on a coil
        {"tag": "di17", "register": "discrete:17", "type": "bool"},
    ]
    source = build(make_config(peer.endpoint, tags), tmp_path)
    async with polling(source) as out:
        await wait_for(lambda: out.batches, timeout=5)
    first = {r.tag: r.value for r in out.batches[0]}
    for name, value in expected.items():
        assert first[name] == pytest.approx(value), name
        assert first["in." + name] == pytest.approx(input_expected[name]), name
    assert first["t7.float32"] == 12.3  # the float32 as written, not 12.300000190734863
    assert first["coil3"] is True and first["coil4"] is False and first["di17"] is True
    assert all(r.quality == "good" for r in out.batches[0])


async def test_types_decode_against_pymodbustcp_server(tmp_path: Path) -> None:
    """pyModbusTCP's server is an independent implementation: same values, same merged reads."""
    port = free_port()
    server = ModbusServer("127.0.0.1", port, no_block=True)
    tags, memory, expected = _case_tags("holding")
    for address, registers in memory.items():
        server.data_bank.set_holding_registers(address, registers)
    server.data_bank.set_coils(5, [True, False, True])
    tags += [{"tag": f"coil{n}", "register": f"coil:{n}"} for n in (5, 6, 7)]
    server.start()
    try:
        source = build(make_config(f"tcp://127.0.0.1:{port}", tags), tmp_path)
        async with polling(source) as out:
            await wait_for(lambda: out.batches, timeout=5)
            server.data_bank.set_holding_registers(10, [0xFFFD])  # t0.int16
            await wait_for(lambda: out.values("t0.int16")[-1:] == [-3], timeout=5)
            assert source.status.state == "connected"
        first = {r.tag: r.value for r in out.batches[0]}
        for name, value in expected.items():
            assert first[name] == pytest.approx(value), name
        assert [first["coil5"], first["coil6"], first["coil7"]] == [True, False, True]
        # Unchanged values produce nothing: only the int16 changed after the first poll.
        assert {r.tag for batch in out.batches[1:] for r in batch} == {"t0.int16"}
    finally:
        server.stop()


# --- read merging -----------------------------------------------------------------------------------


async def test_contiguous_tags_are_read_in_the_fewest_requests(peer: ModbusPeer, tmp_path: Path) -> None:
    tags = [{"tag": f"h{n}", "register": f"holding:{n}"} for n in range(250)]  # 250 registers: 2 reads
    tags += [
        {"tag": f"f{n}", "register": f"holding:{300 + 2 * n + (4 if n >= 5 else 0)}", "type": "float32"}
        for n in range(10)
    ]  # a gap of 4 <= gap_max 8: bridged, one read
    tags += [{"tag": f"c{n}", "register": f"coil:{n * 3}"} for n in range(100)]  # bits with gaps: one read
    tags += [{"tag": "far", "register": "holding:400"}]  # 80 registers past the floats: its own read
    source = build(make_config(peer.endpoint, tags, gap_max=8), tmp_path)
    assert [read.key for read in source.reads] == [
        "coil:0-297",
        "holding:0-124",
        "holding:125-249",
        "holding:300-323",
        "holding:400",
    ]
    async with polling(source) as out:
        await wait_for(lambda: source.polls >= 5, timeout=10)
    polls = source.polls
    reads = peer.count(write=False)
    assert 5 * polls <= reads < 5 * (polls + 1), f"{reads} requests for {polls} polls"
    assert source.status.info["requests_per_poll"] == "5"
    assert len(out.batches[0]) == len(tags)
    assert all(len(batch) == 0 for batch in out.batches[1:]) or len(out.batches) == 1  # nothing changed


# --- errors: per read, per device ---------------------------------------------------------------------


async def test_an_exception_marks_its_tags_bad_while_the_others_keep_flowing(peer: ModbusPeer, tmp_path: Path) -> None:
    tags = [
        {"tag": "good", "register": "holding:1"},
        {"tag": "beyond", "register": "holding:600"},  # the device holds 512 registers
        {"tag": "busy", "register": "input:5"},
    ]
    source = build(make_config(peer.endpoint, tags), tmp_path)
    async with polling(source) as out:
        await wait_for(lambda: out.values("good") == [0], timeout=5)
        assert source.status.degraded["holding:600"] == "exception 2 (illegal data address)"
        assert source.status.degraded["beyond"] == "exception 2 (illegal data address)"
        assert source.status.state == "connected"
        peer.busy.add((1, "input"))
        await wait_for(lambda: source.status.degraded.get("busy") == "exception 6 (server device busy)", timeout=5)
        for value in (5, 6, 7):
            peer.set("holding", 1, [value])
            await wait_for(out.latest("good", value), timeout=5)
        peer.busy.clear()
        peer.set("input", 5, [99])
        await wait_for(lambda: out.values("busy")[-1:] == [99], timeout=5)
        assert "busy" not in source.status.degraded and "input:5" not in source.status.degraded
        assert "beyond" in source.status.degraded  # still failing, still listed
    # A bad reading once, when the tag turns bad, not every poll.
    assert [r.quality for r in out.of("beyond")] == ["bad"]
    assert [r.quality for r in out.of("busy")] == ["good", "bad", "good"]
    assert int(source.status.info["errors"]) >= 2


async def test_a_restarted_server_is_polled_again(peer: ModbusPeer, tmp_path: Path) -> None:
    source = build(make_config(peer.endpoint, [{"tag": "count", "register": "holding:2", "type": "uint16"}]), tmp_path)
    peer.set("holding", 2, [10])
    async with polling(source) as out:
        await wait_for(lambda: out.values("count") == [10], timeout=5)
        await peer.stop()
        await wait_for(lambda: source.status.state == "reconnecting", timeout=5)
        assert source.status.last_error and "unit 1" in source.status.last_error
        await wait_for(lambda: out.turned_bad("count"), timeout=5)
        restarted = ModbusPeer((1,)).tcp(peer.port)
        restarted.set("holding", 2, [11])
        await restarted.start()
        try:
            await wait_for(lambda: source.status.state == "connected", timeout=10)
            await wait_for(lambda: out.values("count")[-1:] == [11], timeout=5)
        finally:
            await restarted.stop()
    assert source.line.connects >= 2


async def test_values_refused_by_the_buffer_are_offered_again(peer: ModbusPeer, tmp_path: Path) -> None:
    source = build(make_config(peer.endpoint, [{"tag": "level", "register": "holding:3"}]), tmp_path)
    peer.set("holding", 3, [1])
    async with polling(source) as out:
        await wait_for(lambda: out.values("level") == [1], timeout=5)
        out.refuse = True
        peer.set("holding", 3, [2])
        await wait_for(lambda: out.refused >= 2, timeout=5)
        out.refuse = False
        await wait_for(lambda: out.values("level") == [1, 2], timeout=5)
    assert source.uncommitted >= 2


async def test_polls_keep_their_schedule(peer: ModbusPeer, tmp_path: Path) -> None:
    source = build(make_config(peer.endpoint, [{"tag": "x", "register": "holding:0"}], poll_interval="100ms"), tmp_path)
    async with polling(source):
        await wait_for(lambda: source.polls >= 1, timeout=5)
        start, polls = asyncio.get_running_loop().time(), source.polls
        await wait_for(lambda: source.polls >= polls + 10, timeout=5)
        elapsed = asyncio.get_running_loop().time() - start
    # Ten ticks of 100 ms: no drift (each poll's own time is not added), no burst.
    assert 0.85 <= elapsed <= 1.3, elapsed


async def test_a_slow_device_skips_missed_polls_instead_of_bursting(peer: ModbusPeer, tmp_path: Path) -> None:
    peer.delay = 0.12  # each poll takes longer than the 50 ms interval
    source = build(make_config(peer.endpoint, [{"tag": "x", "register": "holding:0"}], timeout="1s"), tmp_path)
    async with polling(source):
        await wait_for(lambda: source.polls >= 2, timeout=5)
        start, polls = asyncio.get_running_loop().time(), source.polls
        await wait_for(lambda: source.polls >= polls + 5, timeout=5)
        elapsed = asyncio.get_running_loop().time() - start
    assert source.skipped_polls >= 5
    assert source.status.info["skipped_polls"] == str(source.skipped_polls)
    # One poll per 150 ms tick at most (120 ms poll, next free 50 ms tick): no catch-up burst.
    assert elapsed >= 5 * 0.12, elapsed


async def test_a_tag_may_name_another_unit_on_the_same_endpoint(tmp_path: Path) -> None:
    peer = ModbusPeer((1, 2)).tcp()
    peer.set("holding", 0, [11], unit=1)
    peer.set("holding", 0, [22], unit=2)
    async with peer:
        tags: list[dict[str, Any]] = [
            {"tag": "one", "register": "holding:0"},
            {"tag": "two", "register": "holding:0", "unit": 2},
            {"tag": "two.beyond", "register": "holding:600", "unit": 2},
        ]
        source = build(make_config(peer.endpoint, tags), tmp_path)
        assert [read.key for read in source.reads] == ["holding:0", "holding:0", "holding:600"]
        async with polling(source) as out:
            await wait_for(lambda: out.values("one") == [11] and out.values("two") == [22], timeout=5)
            await wait_for(lambda: "unit 2 holding:600" in source.status.degraded, timeout=5)
        assert peer.count(unit=2) >= 1 and peer.count(unit=1) >= 1  # out-of-range reads never reach the memory


# --- writes (the PLC handshake) ---------------------------------------------------------------------------


async def test_acks_are_written_to_coils_and_holding_registers(peer: ModbusPeer, tmp_path: Path) -> None:
    tags: list[dict[str, Any]] = [
        {"tag": "ack_coil", "register": "coil:8"},
        {"tag": "ack_word", "register": "holding:20", "type": "uint16"},
        {"tag": "ack_bool_word", "register": "holding:21", "type": "bool"},
        {"tag": "setpoint", "register": "holding:22", "type": "float32", "word_order": "little"},
        {"tag": "scaled", "register": "holding:24", "type": "int16", "scale": 0.1},
        {"tag": "input", "register": "input:0"},
        {"tag": "discrete", "register": "discrete:0"},
    ]
    source = build(make_config(peer.endpoint, tags), tmp_path)
    async with polling(source) as out:
        await wait_for(lambda: out.batches, timeout=5)
        await source.write("ack_coil", True)
        await source.write("ack_word", True)
        await source.write("ack_bool_word", True)
        await source.write("setpoint", 2.5)
        await source.write("scaled", -1.5)
        assert peer.get("coil", 8) == [True]
        assert peer.get("holding", 20, 6) == [1, 1, 0, 0x4020, 0xFFF1, 0]
        await wait_for(lambda: out.values("setpoint")[-1:] == [2.5], timeout=5)
        await wait_for(lambda: out.values("scaled")[-1:] == [pytest.approx(-1.5)], timeout=5)
        for read_only in ("input", "discrete"):
            with pytest.raises(SourceError, match="cannot be written"):
                await source.write(read_only, True)
        with pytest.raises(SourceError, match="does not fit"):
            await source.write("ack_word", 70000)
    await peer.stop()
    with pytest.raises(SourceError, match="writing ack_coil"):
        await source.write("ack_coil", True)


async def test_a_refused_write_is_a_source_error(tmp_path: Path) -> None:
    peer = ModbusPeer((1,), size=16).tcp()
    async with peer:
        source = build(make_config(peer.endpoint, [{"tag": "ack", "register": "holding:100"}]), tmp_path)
        with pytest.raises(SourceError, match=r"exception 2 \(illegal data address\)"):
            await source.write("ack", 1)


# --- RTU: a serial line shared by two unit ids -----------------------------------------------------------


async def test_two_units_on_one_serial_line_share_one_worker(tmp_path: Path) -> None:
    cable = NullModem()
    cable.start()
    server_port, agent_port = cable.ports
    peer = ModbusPeer((1, 2)).serial(server_port)
    peer.set("holding", 0, [101, 102], unit=1)
    peer.set("holding", 0, [201, 202], unit=2)
    peer.set("coil", 0, [True], unit=2)
    await peer.start()
    endpoint = f"rtu://{agent_port}?baudrate=115200&parity=N"
    build_context = context(tmp_path)
    first = make_config(
        endpoint, [{"tag": "u1.a", "register": "holding:0", "type": "uint32"}], unit=1, poll_interval="20ms"
    )
    second = make_config(
        endpoint,
        [
            {"tag": "u2.a", "register": "holding:0"},
            {"tag": "u2.b", "register": "holding:1"},
            {"tag": "u2.run", "register": "coil:0"},
        ],
        name="unit2",
        unit=2,
        poll_interval="20ms",
    )
    a, b = first.build(build_context), second.build(build_context)
    assert isinstance(a, ModbusSource) and isinstance(b, ModbusSource)
    assert a.line is b.line, "sources naming one serial device share its worker"
    try:
        async with polling(a) as out_a, polling(b) as out_b:
            await wait_for(lambda: out_a.batches and out_b.batches, timeout=10)
            await wait_for(lambda: a.polls >= 10 and b.polls >= 10, timeout=10)
            peer.set("holding", 1, [555], unit=2)
            await wait_for(lambda: out_b.values("u2.b")[-1:] == [555], timeout=5)
            await b.write("u2.run", False)
            assert peer.get("coil", 0, unit=2) == [False]
            assert a.status.state == "connected" and b.status.state == "connected"
        assert out_a.values("u1.a") == [(101 << 16) + 102]
        assert out_b.values("u2.a") == [201]
        assert a.line.max_in_flight == 1, "never two requests on the line at once"
        assert peer.max_serving == 1
        assert peer.count(unit=1) >= 10 and peer.count(unit=2) >= 20
        assert a.line.requests >= peer.count(write=False)
    finally:
        await peer.stop()
        cable.stop()


async def test_a_unit_that_does_not_answer_backs_off_while_its_neighbour_keeps_polling(tmp_path: Path) -> None:
    cable = NullModem()
    cable.start()
    server_port, agent_port = cable.ports
    peer = ModbusPeer((1, 5, 9)).serial(server_port)
    peer.silent.add(9)
    peer.garbled.add(5)  # answers with a broken CRC
    peer.set("holding", 0, [55], unit=5)
    peer.set("holding", 0, [7])
    await peer.start()
    endpoint = f"rtu://{agent_port}?baudrate=115200"
    build_context = context(tmp_path)
    present = make_config(endpoint, [{"tag": "p", "register": "holding:0"}], unit=1, poll_interval="20ms").build(
        build_context
    )
    absent = make_config(
        endpoint, [{"tag": "q", "register": "holding:0"}], name="absent", unit=9, timeout="100ms"
    ).build(build_context)
    garbled = make_config(
        endpoint, [{"tag": "r", "register": "holding:0"}], name="garbled", unit=5, timeout="100ms"
    ).build(build_context)
    assert isinstance(present, ModbusSource) and isinstance(absent, ModbusSource)
    assert isinstance(garbled, ModbusSource)
    try:
        async with polling(present) as out_p, polling(absent) as out_q, polling(garbled) as out_r:
            await wait_for(lambda: absent.status.state == "reconnecting", timeout=5)
            assert "no valid response" in (absent.status.last_error or "")
            await wait_for(lambda: garbled.status.state == "reconnecting", timeout=5)
            assert "CRC" in (garbled.status.last_error or "")
            peer.garbled.clear()
            await wait_for(lambda: out_r.values("r") == [55], timeout=10)
            assert garbled.status.state == "connected"
            for value in (8, 9):
                peer.set("holding", 0, [value])
                await wait_for(out_p.latest("p", value), timeout=5)
            assert present.status.state == "connected"
        assert out_q.values("q") == []
        assert peer.dropped >= 1
    finally:
        await peer.stop()
        cable.stop()


async def test_a_pymodbus_client_sees_the_peer_as_the_source_does(peer: ModbusPeer) -> None:
    """The test peer itself: what ``set`` queues a plain pymodbus client reads back."""
    peer.set("holding", 5, [1, 2, 3])
    client = AsyncModbusTcpClient("127.0.0.1", port=peer.port, timeout=1, retries=0, reconnect_delay=0)
    assert await client.connect()
    try:
        response = await client.read_holding_registers(5, count=3, device_id=1)
        assert response.registers == [1, 2, 3]
    finally:
        client.close()
