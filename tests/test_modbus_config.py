"""``[[sources.modbus]]`` config, value decoding and read planning: no peer needed."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient

from agent.settings import ConfigError, parse_settings
from protocols.modbus import ModbusSourceConfig, parse_endpoint
from protocols.modbus.registers import (
    MAX_REGISTERS_PER_READ,
    Point,
    decode,
    encode,
    parse_type,
    plan_reads,
)
from tests.build import context

BASE = """
[agent]
site = "plant-01"
id = "gw"

[[sources.modbus]]
name = "filler2"
endpoint = "{endpoint}"
unit = 1
poll_interval = "250ms"

  [[sources.modbus.tags]]
  tag = "filler2.good_count"
  register = "{register}"
  type = "{type}"
  word_order = "big"
  scale = 1.0
  kind = "counter"
"""


def config_text(endpoint: str = "tcp://10.1.3.20:502", register: str = "holding:100", type: str = "uint32") -> str:
    return BASE.format(endpoint=endpoint, register=register, type=type)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, path=Path("plantgate.toml"))
    return str(info.value)


def test_the_design_example_is_valid() -> None:
    source = parse_settings(config_text()).source_configs()[0]
    assert isinstance(source, ModbusSourceConfig)
    tag = source.tags[0]
    assert tag.location == ("holding", 100)
    assert tag.value_type.registers == 2
    lines = source.describe(context(Path("/tmp")))
    assert lines[0].startswith("filler2 tcp://10.1.3.20:502 unit=1 poll_interval=250ms tags=1")
    assert "filler2.good_count <- holding:100 kind=counter type=uint32" in lines[1]


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (config_text(type="float32", register="coil:3"), "sources.modbus.0.tags.0", "does not fit a coil"),
        (config_text(register="holding:70000"), "sources.modbus.0.tags.0.register", "0 to 65535"),
        (config_text(register="holdings:1"), "sources.modbus.0.tags.0.register", "not a Modbus register"),
        (config_text(register="holding:65535"), "sources.modbus.0.tags.0", "runs past address 65535"),
        (config_text(type="int64"), "sources.modbus.0.tags.0.type", "not a Modbus value type"),
        (config_text(type="string:0"), "sources.modbus.0.tags.0.type", "string:N takes N registers"),
        (config_text(type="float32"), "sources.modbus.0.tags.0", "a counter is an integer register"),
        (config_text(endpoint="http://x"), "sources.modbus.0.endpoint", "not a Modbus endpoint"),
        (config_text(endpoint="rtu://dev/ttyUSB0"), "sources.modbus.0.endpoint", "absolute path"),
        (config_text(endpoint="rtu:///dev/ttyUSB0?parity=X"), "sources.modbus.0.endpoint", "parity is N, E or O"),
        (config_text(endpoint="rtu:///dev/ttyUSB0?speed=9600"), "sources.modbus.0.endpoint", "unknown serial option"),
    ],
)
def test_invalid_tags_and_endpoints_name_their_key(text: str, key: str, message: str) -> None:
    error = config_error(text)
    assert f": {key}: " in error or f": {key}." in error, error
    assert message in error


def test_a_duplicate_tag_name_is_an_error_but_a_shared_address_is_not() -> None:
    text = (
        config_text()
        + """
  [[sources.modbus.tags]]
  tag = "filler2.good_count_low"
  register = "holding:101"
  type = "uint16"
"""
    )
    source = parse_settings(text).source_configs()[0]
    assert isinstance(source, ModbusSourceConfig)
    assert source.tags[1].location == ("holding", 101)
    error = config_error(text.replace("filler2.good_count_low", "filler2.good_count"))
    assert "sources.modbus.0.tags" in error and "appears twice" in error


def test_serial_endpoints_and_defaults() -> None:
    endpoint = parse_endpoint("rtu:///dev/ttyUSB0?baudrate=9600&parity=e&stopbits=2")
    assert (endpoint.device, endpoint.baudrate, endpoint.parity, endpoint.stopbits) == ("/dev/ttyUSB0", 9600, "E", 2)
    assert endpoint.line_key == ("modbus-serial", "/dev/ttyUSB0")
    assert parse_endpoint("tcp://plc.local").port == 502
    assert parse_endpoint("tcp://[::1]:1502").line_key == ("modbus-tcp", "::1", "1502")


def test_warnings_for_a_timeout_longer_than_the_poll_and_a_serial_broadcast_unit() -> None:
    text = config_text(endpoint="rtu:///dev/ttyUSB0").replace("unit = 1", 'unit = 0\ntimeout = "1s"')
    warnings = parse_settings(text).source_configs()[0].warnings()
    assert any("poll_interval" in warning for warning in warnings)
    assert any("1-247" in warning for warning in warnings)


def test_sources_on_one_serial_device_share_one_line_and_tcp_peers_their_connection(tmp_path: Path) -> None:
    build_context = context(tmp_path)
    make = ModbusSourceConfig.model_validate
    tags = [{"tag": "a", "register": "holding:0"}]
    one = make({"name": "a", "endpoint": "rtu:///dev/ttyUSB7", "unit": 1, "tags": tags}).build(build_context)
    two = make({"name": "b", "endpoint": "rtu:///dev/ttyUSB7", "unit": 2, "tags": tags}).build(build_context)
    other = make({"name": "c", "endpoint": "rtu:///dev/ttyUSB8", "unit": 1, "tags": tags}).build(build_context)
    assert one.line is two.line
    assert other.line is not one.line


# --- decoding ------------------------------------------------------------------------------------------

FIXED = ["int16", "uint16", "int32", "uint32", "float32", "float64"]
PYMODBUS_TYPE = {name: getattr(AsyncModbusTcpClient.DATATYPE, name.upper()) for name in FIXED}


@given(st.sampled_from(FIXED), st.sampled_from(["big", "little"]), st.data())
def test_decoding_agrees_with_pymodbus(name: str, word_order: str, data: st.DataObject) -> None:
    """pymodbus's own converter is the reference for big byte order, either word order."""
    vtype = parse_type(name)
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=vtype.registers, max_size=vtype.registers))
    ours = decode(registers, vtype, word_order=word_order)  # type: ignore[arg-type]
    theirs = AsyncModbusTcpClient.convert_from_registers(registers, PYMODBUS_TYPE[name], word_order=word_order)  # type: ignore[arg-type]
    assert isinstance(theirs, int | float)
    if name == "float32":
        assert struct.pack(">f", ours) == struct.pack(">f", theirs) or (ours != ours and theirs != theirs)
    elif name == "float64":
        assert struct.pack(">d", ours) == struct.pack(">d", theirs)
    else:
        assert ours == theirs


@given(
    st.sampled_from(FIXED),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
    st.data(),
)
def test_encoding_and_decoding_round_trip(name: str, byte_order: str, word_order: str, data: st.DataObject) -> None:
    vtype = parse_type(name)
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=vtype.registers, max_size=vtype.registers))
    value = decode(registers, vtype, byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    if isinstance(value, float) and value != value:
        return  # NaN payloads are not preserved through a float
    again = encode(value, vtype, byte_order=byte_order, word_order=word_order)  # type: ignore[arg-type]
    assert decode(again, vtype, byte_order=byte_order, word_order=word_order) == value  # type: ignore[arg-type]


def test_strings_are_high_byte_first_with_trailing_nuls_and_spaces_stripped() -> None:
    vtype = parse_type("string:4")
    assert decode([0x4142, 0x4320, 0x0000, 0x0000], vtype) == "ABC"
    assert encode("ABC", vtype) == [0x4142, 0x4300, 0, 0]
    with pytest.raises(ValueError, match="longer than 8 bytes"):
        encode("ABCDEFGHI", vtype)


# --- read planning ------------------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.sampled_from(["holding", "coil"]), st.integers(0, 3000), st.sampled_from([1, 2, 4])),
        min_size=1,
        max_size=300,
    ),
    st.integers(0, 20),
)
def test_a_plan_covers_every_tag_within_the_protocol_limits(raw: list[tuple[str, int, int]], gap_max: int) -> None:
    points = [
        Point(table, address, 1 if table == "coil" else count, index)  # type: ignore[arg-type]
        for index, (table, address, count) in enumerate(raw)
    ]
    plan = plan_reads(points, gap_max=gap_max)
    covered = set()
    for request in plan:
        assert request.count <= (2000 if request.table == "coil" else MAX_REGISTERS_PER_READ)
        for index, offset, count in request.members:
            point = points[index]
            assert point.table == request.table
            assert request.start + offset == point.address
            assert offset + count <= request.count
            covered.add(index)
    assert covered == set(range(len(points)))
    # Fewest requests: no two neighbouring reads of one table could have been merged.
    for first, second in itertools.pairwise(plan):
        if first.table == second.table:
            gap = second.start - (first.start + first.count)
            limit = 2000 if first.table == "coil" else MAX_REGISTERS_PER_READ
            bridged = gap_max * 16 if first.table == "coil" else gap_max
            assert gap > bridged or second.start + second.count - first.start > limit


def test_contiguous_registers_need_one_read_per_125() -> None:
    points = [Point("holding", n, 1, n) for n in range(1000)]
    plan = plan_reads(points, gap_max=0)
    assert [(r.start, r.count) for r in plan] == [(n * 125, 125) for n in range(8)]
