"""Modbus addressing, value types and read planning: pure functions, no I/O, no pymodbus.

A tag names a table and an address (``holding:100``) and a value type; the source
reads whole ranges of a table in as few requests as the protocol allows (125
registers or 2000 bits per request), bridging small gaps between tags, and decodes
each tag's registers from the response.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Table = Literal["coil", "discrete", "input", "holding"]
TABLES: tuple[Table, ...] = ("coil", "discrete", "input", "holding")
BIT_TABLES = frozenset({"coil", "discrete"})
Order = Literal["big", "little"]

MAX_REGISTERS_PER_READ = 125
"""Modbus Application Protocol V1.1b3, 6.3/6.4: at most 125 registers per read."""
MAX_BITS_PER_READ = 2000
"""Modbus Application Protocol V1.1b3, 6.1/6.2: at most 2000 coils or inputs per read."""
MAX_ADDRESS = 0xFFFF

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


@dataclass(frozen=True)
class ValueType:
    """A tag's value type: its name, how many registers it spans, how struct packs it."""

    name: str
    registers: int  # registers spanned (1 for bool on a register; bits count 1 per coil)
    code: str  # struct format character, "" for bool and string
    integer: bool = False
    bits: int | None = None  # width of an integer type, for counter wrap-around

    @property
    def is_string(self) -> bool:
        return self.name.startswith("string:")


_FIXED = {
    "bool": ValueType("bool", 1, ""),
    "int16": ValueType("int16", 1, "h", integer=True, bits=16),
    "uint16": ValueType("uint16", 1, "H", integer=True, bits=16),
    "int32": ValueType("int32", 2, "i", integer=True, bits=32),
    "uint32": ValueType("uint32", 2, "I", integer=True, bits=32),
    "float32": ValueType("float32", 2, "f"),
    "float64": ValueType("float64", 4, "d"),
}
TYPE_NAMES = (*_FIXED, "string:N")


def parse_type(text: str) -> ValueType:
    """``uint32``, ``float32``, ``string:8``, ...; ValueError naming the choices for anything else."""
    name = text.strip().lower()
    if name in _FIXED:
        return _FIXED[name]
    if name.startswith("string:"):
        size = name.removeprefix("string:")
        if not size.isdigit() or not 1 <= int(size) <= MAX_REGISTERS_PER_READ:
            raise ValueError(f"{text!r}: string:N takes N registers, 1 to {MAX_REGISTERS_PER_READ}")
        return ValueType(f"string:{int(size)}", int(size), "")
    raise ValueError(f"{text!r} is not a Modbus value type; one of: {', '.join(TYPE_NAMES)}")


def parse_register(text: str) -> tuple[Table, int]:
    """``holding:100`` -> ("holding", 100); ValueError with a hint for anything else."""
    table, sep, address = text.strip().partition(":")
    table = table.strip().lower()
    hint = "write it as \"holding:100\" (coil | discrete | input | holding, then the address 0-65535)"
    if not sep or table not in TABLES:
        raise ValueError(f"{text!r} is not a Modbus register; {hint}")
    address = address.strip()
    if not address.isdigit() or int(address) > MAX_ADDRESS:
        raise ValueError(f"{text!r}: the address must be 0 to 65535; {hint}")
    return table, int(address)


# --- decoding and encoding -----------------------------------------------------------------------


def to_bytes(registers: Sequence[int], byte_order: Order, word_order: Order) -> bytes:
    """The bytes of a value spread over ``registers``, most significant first."""
    words = registers if word_order == "big" else list(reversed(registers))
    data = b"".join(word.to_bytes(2, "big") for word in words)
    if byte_order == "little":
        data = b"".join(data[i + 1 : i + 2] + data[i : i + 1] for i in range(0, len(data), 2))
    return data


def from_bytes(data: bytes, byte_order: Order, word_order: Order) -> list[int]:
    """The registers that carry ``data`` (the inverse of ``to_bytes``)."""
    if byte_order == "little":
        data = b"".join(data[i + 1 : i + 2] + data[i : i + 1] for i in range(0, len(data), 2))
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words if word_order == "big" else list(reversed(words))


def shortest_float32(value: float) -> float:
    """A float32 as the shortest decimal that reads back to the same float32 (12.3, not 12.300000190734863)."""
    if not math.isfinite(value):
        return value
    packed = struct.pack(">f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return value


def decode(
    registers: Sequence[int], vtype: ValueType, *, byte_order: Order = "big", word_order: Order = "big"
) -> bool | int | float | str:
    """The raw value (before scale and offset) of one tag from its registers.

    ``string:N``: high byte first in each register (``byte_order`` little swaps
    them), trailing NULs and spaces stripped, undecodable bytes replaced.
    """
    if vtype.name == "bool":
        return bool(registers[0])
    if vtype.is_string:
        data = to_bytes(registers, byte_order, "big")
        return data.rstrip(b"\x00 ").decode("utf-8", errors="replace").rstrip("\x00 ")
    value: int | float = struct.unpack(">" + vtype.code, to_bytes(registers, byte_order, word_order))[0]
    if vtype.name == "float32":
        return shortest_float32(value)
    return value


def encode(
    value: bool | int | float | str, vtype: ValueType, *, byte_order: Order = "big", word_order: Order = "big"
) -> list[int]:
    """The registers that hold ``value`` (a raw value, before scale and offset); ValueError if it does not fit."""
    if vtype.name == "bool":
        return [1 if value else 0]
    if vtype.is_string:
        data = str(value).encode("utf-8")
        size = vtype.registers * 2
        if len(data) > size:
            raise ValueError(f"{value!r} is longer than {size} bytes")
        return from_bytes(data.ljust(size, b"\x00"), byte_order, "big")
    if isinstance(value, str):
        raise ValueError(f"{value!r} is not a number")
    number: int | float = value
    if vtype.integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{value!r} is not an integer")
            number = int(value)
        number = int(number)
    try:
        data = struct.pack(">" + vtype.code, number)
    except struct.error as exc:
        raise ValueError(f"{value!r} does not fit {vtype.name}") from exc
    return from_bytes(data, byte_order, word_order)


# --- read planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One tag's place: its table, first address and how many registers (or bits) it spans."""

    table: Table
    address: int
    count: int
    index: int  # the tag's position in the source's tag list


@dataclass
class ReadRequest:
    """One read: a table, a start address, a count, and the tags it carries (with their offsets)."""

    table: Table
    start: int
    count: int
    members: list[tuple[int, int, int]] = field(default_factory=list)  # (tag index, offset, count)

    @property
    def key(self) -> str:
        """How /status names the range, e.g. ``holding:100-130``."""
        end = self.start + self.count - 1
        return f"{self.table}:{self.start}" if end == self.start else f"{self.table}:{self.start}-{end}"


def plan_reads(
    points: Sequence[Point],
    *,
    gap_max: int,
    max_registers: int = MAX_REGISTERS_PER_READ,
    max_bits: int = MAX_BITS_PER_READ,
) -> list[ReadRequest]:
    """The fewest reads that cover ``points``: per table, sorted by address, merged while the gap is small.

    Two points share a read when the addresses between them that no tag needs are
    at most ``gap_max`` registers (``16 * gap_max`` bits for coils and inputs:
    reading a few unused bits costs nothing) and the read stays within
    ``max_registers`` / ``max_bits``. Overlapping points (two tags on one register)
    share their read. A point is never split across reads. The plan is the
    greedy left-to-right merge, optimal for intervals on a line with a size cap
    when no point is longer than the cap.
    """
    requests: list[ReadRequest] = []
    for table in TABLES:
        bits = table in BIT_TABLES
        limit = max_bits if bits else max_registers
        gap = gap_max * 16 if bits else gap_max
        current: ReadRequest | None = None
        for point in sorted((p for p in points if p.table == table), key=lambda p: (p.address, p.count)):
            end = point.address + point.count
            if current is not None:
                current_end = current.start + current.count
                fits = max(end, current_end) - current.start <= limit
                if point.address - current_end <= gap and fits:
                    current.count = max(end, current_end) - current.start
                    current.members.append((point.index, point.address - current.start, point.count))
                    continue
            current = ReadRequest(table, point.address, point.count, [(point.index, 0, point.count)])
            requests.append(current)
    return requests
