"""Barcode scans without a network: config, GS1 reading with biip, framing, events from frames."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from agent.events import LANE_OF_TYPE, CloudEvent, Quantity, encode_event
from protocols.barcode import BarcodeSourceConfig, terminator_bytes
from protocols.barcode.framing import Frame, Framer
from protocols.barcode.gs1 import Garbled, escape_raw, read_scan
from protocols.barcode.simulator import demo_scans
from protocols.barcode.source import ScanReader
from tests.build import context

GS = "\x1d"


def config(**overrides: Any) -> BarcodeSourceConfig:
    values: dict[str, Any] = {
        "name": "dock1",
        "mode": "tcp-server",
        "listen": "127.0.0.1:0",
        "station": "receiving-dock-1",
        "event": "goods.received",
    }
    values.update(overrides)
    return BarcodeSourceConfig.model_validate(values)


# --- config --------------------------------------------------------------------------------------


def test_config_modes_need_their_address_and_only_it() -> None:
    assert config().mode == "tcp-server"
    assert config(mode="tcp-client", listen=None, connect="127.0.0.1:9101").connect == "127.0.0.1:9101"
    assert str(config(mode="serial", listen=None, device="/dev/ttyACM0").device) == "/dev/ttyACM0"
    with pytest.raises(ValidationError, match="needs connect"):
        config(mode="tcp-client", listen=None)
    with pytest.raises(ValidationError, match="listen applies only to mode 'tcp-server'"):
        config(mode="serial", device="/dev/ttyACM0")
    with pytest.raises(ValidationError, match="is not host:port"):
        config(listen="9101")
    with pytest.raises(ValidationError, match="needs the scanner's port"):
        config(mode="tcp-client", listen=None, connect="10.0.0.1:0")
    with pytest.raises(ValidationError, match="stopbits"):
        config(mode="serial", listen=None, device="/dev/ttyS0", stopbits=3)
    with pytest.raises(ValidationError, match="Extra inputs"):
        config(port=9101)


def test_config_event_must_be_a_canonical_scan_event() -> None:
    assert config(event="material.consumed").event == "material.consumed"
    assert config(event="io.plantgate.goods.received").event == "goods.received"
    assert config(event="barcode.scanned").event == "barcode.scanned"
    with pytest.raises(ValidationError, match="is not a scan event"):
        config(event="goods.recieved")
    with pytest.raises(ValidationError, match="is not a scan event"):
        config(event="telemetry.samples")


def test_terminators() -> None:
    assert terminator_bytes("CR") == b"\r"
    assert terminator_bytes("lf") == b"\n"
    assert terminator_bytes("CRLF") == b"\r\n"
    assert terminator_bytes("\\x03") == b"\x03"  # a TOML literal string '\x03'
    assert terminator_bytes("\x04") == b"\x04"  # a TOML basic string "\u0004"
    assert terminator_bytes("#END#") == b"#END#"
    for bad in ("", "\\x1d", "123456789", "\u20ac"):
        with pytest.raises(ValueError):
            terminator_bytes(bad)
    with pytest.raises(ValidationError, match="GS"):
        config(terminator="\\x1d")


def test_config_summary_and_warnings() -> None:
    line = config(work_order_tag="press7.work_order").describe(context(Path("/tmp")))[0]
    assert "dock1 tcp-server listen 127.0.0.1:0 station=receiving-dock-1 event=goods.received" in line
    assert "work_order<-press7.work_order" in line and "duplicate_window=1s" in line
    assert config().warnings() == []
    assert "double read" in config(duplicate_window="0s").warnings()[0]
    assert "without work_order_tag" in config(event="material.consumed").warnings()[0]
    assert config(event="material.consumed", work_order_tag="press7.work_order").warnings() == []
    assert config(work_order_tag="press7.work_order").referenced_tags() == {"work_order_tag": "press7.work_order"}
    assert config().referenced_tags() == {}


# --- GS1 with biip -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scan", "expected"),
    [
        # GS1-128 with its AIM identifier, GS after the variable-length lot
        (
            f"]C10105012345678900{GS}10ABC123{GS}17260630{GS}3710",
            {"gtin": "05012345678900", "lot": "ABC123", "expiry": "2026-06-30", "quantity": Quantity("10", "EA")},
        ),
        # GS1 DataMatrix: fixed-length AIs need no separator, the day 00 is the month's last day
        (
            f"]d201050123456789001726020010LOT-7{GS}21SER9",
            {"gtin": "05012345678900", "lot": "LOT-7", "serial": "SER9", "expiry": "2026-02-28"},
        ),
        # GS1 QR with a variable count (AI 30), leading zeros dropped
        ("]Q30105012345678900300042", {"gtin": "05012345678900", "quantity": Quantity("42", "EA")}),
        # GS1 DataBar, and FNC1 in first position sent as GS
        ("]e00105012345678900", {"gtin": "05012345678900"}),
        (f"]C1{GS}0105012345678900", {"gtin": "05012345678900"}),
        # SSCC label with the contained GTIN (02) and a count (37)
        (
            f"00376130321109103420{GS}0205012345678900{GS}3712",
            {"sscc": "376130321109103420", "gtin": "05012345678900", "quantity": Quantity("12", "EA")},
        ),
        # net weight in kg, 3 decimals: a variable measure becomes the quantity
        ("]C101050123456789003103012500", {"gtin": "05012345678900", "quantity": Quantity("12.5", "KGM")}),
        # printed (human readable) form, no AIM identifier
        ("(01)05012345678900(10)A1(17)270101", {"gtin": "05012345678900", "lot": "A1", "expiry": "2027-01-01"}),
        # EAN-13 with and without its identifier: a GTIN, as 14 digits
        ("]E04006381333931", {"gtin": "04006381333931"}),
        ("4006381333931", {"gtin": "04006381333931"}),
        # GS1 Digital Link in a QR code
        ("]Q3https://id.gs1.org/01/05012345678900/10/ABC", {"gtin": "05012345678900", "lot": "ABC"}),
    ],
)
def test_gs1_codes(scan: str, expected: dict[str, Any]) -> None:
    content = read_scan(scan.encode("ascii"))
    assert content.gs1
    assert content.text == scan
    fields = {k: getattr(content, k) for k in ("gtin", "lot", "serial", "expiry", "quantity", "sscc")}
    assert {k: v for k, v in fields.items() if v is not None} == expected


@pytest.mark.parametrize("scan", ["HELLO-123", "]C0HELLO", "]A0PART 4711/B", "]Q1any text", "12345", "10ABC"])
def test_plain_codes_are_carried_as_they_are(scan: str) -> None:
    content = read_scan(scan.encode("ascii"))
    assert not content.gs1
    assert content.text == scan
    assert content.gtin is None and content.lot is None


@pytest.mark.parametrize(
    ("scan", "reason"),
    [
        (b"]C10105012345678901", "]C1 is a GS1 symbology: Invalid GTIN check digit"),
        (b"]C1HELLO", "]C1 is a GS1 symbology: Failed to get GS1 Application Identifier"),
        (b"]C1", "no GS1 element string"),
        (b"]d20105012345678900171399", "]d2 is a GS1 symbology"),  # month 13
        (b"]E04006381333932", "]E0 carries a GTIN: Invalid GTIN check digit"),
        (b"]", "unknown AIM symbology identifier"),
        (b"]?1abc", "unknown AIM symbology identifier"),
        (b"(01)123", "not a GS1 element string in (AI) form"),
        (f"0105012345678900{GS}99".encode(), "Failed"),  # GS: GS1 expected, AI 99 needs data
        (b"ABC\x00DEF", "byte 0x00 at offset 3"),
        (b"\xffABC", "byte 0xff at offset 0"),
    ],
)
def test_garbled_scans_are_rejected_with_a_reason(scan: bytes, reason: str) -> None:
    with pytest.raises(Garbled) as caught:
        read_scan(scan)
    assert reason in str(caught.value)


def test_escape_raw_shows_every_byte() -> None:
    assert escape_raw(b"AB\x1dC\\\x00\xff\r") == "AB\\x1dC\\\\\\x00\\xff\\x0d"
    assert escape_raw(b"plain text 123") == "plain text 123"


# --- framing -------------------------------------------------------------------------------------


def test_framing_across_reads_with_each_terminator() -> None:
    for terminator in (b"\r", b"\n", b"\r\n", b"\x03", b"#END#"):
        framer = Framer(terminator, 64)
        stream = b"ONE" + terminator + b"TWO" + terminator + b"  THREE " + terminator + b"FOU"
        frames = [f for i in range(len(stream)) for f in framer.feed(stream[i : i + 1])]  # one byte per read
        assert frames == [Frame(b"ONE"), Frame(b"TWO"), Frame(b"THREE")], terminator
        assert framer.feed(b"R" + terminator) == [Frame(b"FOUR")]
        assert framer.close() == []


def test_crlf_scanner_on_cr_terminator_and_empty_frames_counted() -> None:
    framer = Framer(b"\r", 64)
    assert framer.feed(b"A\r\nB\r\n\r\r") == [Frame(b"A"), Frame(b"B")]
    assert framer.empty == 2


def test_overlong_frame_is_a_problem_and_reading_resumes_at_the_next_terminator() -> None:
    framer = Framer(b"\r\n", 32)
    frames = framer.feed(b"X" * 40)
    assert len(frames) == 1 and frames[0].problem is not None and "max_length 32" in frames[0].problem
    assert frames[0].data == b"X" * 40
    assert framer.feed(b"Y" * 10_000) == []  # still inside the long frame: nothing kept beyond the limit
    assert framer.feed(b"Z\r") == []
    assert framer.feed(b"\nNEXT\r\n") == [Frame(b"NEXT")]
    # an over-long frame that arrives whole with its terminator
    whole = framer.feed(b"W" * 50 + b"\r\nOK\r\n")
    assert whole[0].problem is not None and whole[1] == Frame(b"OK")


def test_unterminated_rest_at_close_is_a_problem() -> None:
    framer = Framer(b"\r", 64)
    assert framer.feed(b"DONE\rHALF") == [Frame(b"DONE")]
    rest = framer.close()
    assert rest == [Frame(b"HALF", "the connection ended before the terminator")]


# --- frames -> events ----------------------------------------------------------------------------


def reader(**overrides: Any) -> ScanReader:
    return ScanReader(config(**overrides), source_uri="plantgate/site/gw/dock1", site="site")


def test_gs1_scan_becomes_the_station_event_with_work_order() -> None:
    scans = reader()
    scan = f"]C10105012345678900{GS}10L-77{GS}3705"
    [event] = scans.events([Frame(scan.encode())], work_order=lambda: "4711")
    assert event.type == "io.plantgate.goods.received"
    assert event.lane == "transaction" == LANE_OF_TYPE["goods.received"]
    assert event.subject == "4711" and event.partitionkey == "4711"
    assert event.data == {
        "station": "receiving-dock-1",
        "raw": scan,
        "gtin": "05012345678900",
        "lot": "L-77",
        "quantity": {"value": "5", "uom": "EA"},
        "work_order": "4711",
    }
    decoded = msgspec.json.decode(encode_event(event), type=CloudEvent)
    assert decoded.id == event.id and decoded.time == event.time


def test_subject_is_the_lot_else_the_station_and_plain_codes_carry_raw() -> None:
    scans = reader(event="barcode.scanned")
    lot, plain = scans.events([Frame(b"]C1010501234567890010LOT9"), Frame(b"PALLET-17")])
    assert lot.subject == "LOT9" and lot.lane == "operational"
    assert plain.subject == "receiving-dock-1"
    assert plain.data == {"station": "receiving-dock-1", "raw": "PALLET-17"}


def test_garbled_and_overlong_frames_become_rejected_events() -> None:
    scans = reader()
    garbled, overlong = scans.events([Frame(b"]C1\x00\x1d\\bad"), Frame(b"XXXX", "longer than max_length 16 bytes")])
    assert garbled.type == "io.plantgate.barcode.rejected" and garbled.lane == "operational"
    assert garbled.subject == "receiving-dock-1"
    assert msgspec.to_builtins(garbled.data) == {
        "station": "receiving-dock-1",
        "raw": "]C1\\x00\\x1d\\\\bad",
        "reason": "byte 0x00 at offset 3 is neither printable ASCII nor GS",
    }
    assert overlong.data.reason == "longer than max_length 16 bytes"
    assert scans.rejected == 2


def test_double_reads_within_the_window_are_suppressed_and_counted() -> None:
    scans = reader(duplicate_window="10m")
    first = scans.events([Frame(b"4006381333931"), Frame(b"4006381333931"), Frame(b"OTHER")])
    assert [e.data["raw"] for e in first] == ["4006381333931", "OTHER"]
    assert scans.events([Frame(b"4006381333931")]) == []
    assert scans.duplicates == 2
    off = reader(duplicate_window="0s")
    assert len(off.events([Frame(b"4006381333931"), Frame(b"4006381333931")])) == 2


def test_every_scan_has_its_own_id_and_a_later_time() -> None:
    scans = reader(duplicate_window="0s")
    events = scans.events([Frame(b"SAME")] * 50)
    assert len({e.id for e in events}) == 50
    assert all(a.time < b.time for a, b in itertools.pairwise(events))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from([b"\r", b"]C1", b"\x1d", b"0105012345678900", b"10ABC", b"]d2", b"(01)", b"]"]),
        ),
        max_size=30,
    )
)
def test_arbitrary_bytes_never_crash_and_every_frame_is_accounted_for(chunks: list[bytes]) -> None:
    framer = Framer(b"\r", 48)
    scans = reader(duplicate_window="1h")
    frames: list[Frame] = []
    events: list[CloudEvent] = []
    for chunk in chunks:
        got = framer.feed(chunk)
        frames.extend(got)
        events.extend(scans.events(got))
    rest = framer.close()
    frames.extend(rest)
    events.extend(scans.events(rest))
    assert len(events) + scans.duplicates == len(frames)
    expected_types = {"io.plantgate.goods.received", "io.plantgate.barcode.rejected"}
    for event in events:
        assert event.type in expected_types
        encode_event(event)  # every event encodes
        if event.type == "io.plantgate.barcode.rejected":
            assert event.data.reason
            assert all(0x20 <= ord(c) < 0x7F for c in event.data.raw)
    assert len({e.id for e in events}) == len(events)


def test_demo_scanner_mix_gives_gs1_plain_double_and_garbled_reads() -> None:
    scans = reader(duplicate_window="1m")
    rng = random.Random(7)
    rounds = [scans.events([Frame(code) for code in demo_scans(rng, number)]) for number in range(8)]
    kinds = [
        [(e.type.removeprefix("io.plantgate."), "gtin" in e.data if isinstance(e.data, dict) else None) for e in events]
        for events in rounds
    ]
    assert kinds[0] == kinds[1] == kinds[2] == kinds[3] == kinds[5] == [("goods.received", True)]
    assert kinds[4] == [("goods.received", False)]  # the plain pallet label
    assert kinds[6] == [("goods.received", True)] and scans.duplicates == 1
    assert kinds[7] == [("barcode.rejected", None)]
