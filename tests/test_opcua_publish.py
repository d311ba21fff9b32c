"""The fast PublishResponse decoder against asyncua's own encoder and decoder, and in the source."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.common.utils import Buffer, NotEnoughData
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.events import Reading
from agent.simulator import PressSimulator
from protocols.opcua import OpcUaSourceConfig
from protocols.opcua.publish import _INLINE_LIMIT, FastDataChange, decode_publish_response, problem, self_check
from protocols.opcua.source import OpcUaSource
from tests.build import context
from tests.peers.waiting import wait_for
from tests.test_opcua_source import Recorder

VT = ua.VariantType

# --- strategies -------------------------------------------------------------------------------

_DATETIMES = st.datetimes(min_value=datetime(1601, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    if signed:
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


_SCALARS: list[st.SearchStrategy[ua.Variant]] = [
    st.booleans().map(lambda v: ua.Variant(v, VT.Boolean)),
    _ints(8, True).map(lambda v: ua.Variant(v, VT.SByte)),
    _ints(8, False).map(lambda v: ua.Variant(v, VT.Byte)),
    _ints(16, True).map(lambda v: ua.Variant(v, VT.Int16)),
    _ints(16, False).map(lambda v: ua.Variant(v, VT.UInt16)),
    _ints(32, True).map(lambda v: ua.Variant(v, VT.Int32)),
    _ints(32, False).map(lambda v: ua.Variant(v, VT.UInt32)),
    _ints(64, True).map(lambda v: ua.Variant(v, VT.Int64)),
    _ints(64, False).map(lambda v: ua.Variant(v, VT.UInt64)),
    st.floats(width=32).map(lambda v: ua.Variant(v, VT.Float)),
    st.floats().map(lambda v: ua.Variant(v, VT.Double)),
    st.one_of(st.none(), st.text()).map(lambda v: ua.Variant(v, VT.String)),
    _DATETIMES.map(lambda v: ua.Variant(v, VT.DateTime)),
    st.just(ua.Variant(None, VT.Null)),
]
# Variants the fast path hands to asyncua's variant_from_binary.
_OTHERS: list[st.SearchStrategy[ua.Variant]] = [
    st.lists(st.floats(allow_nan=False), max_size=5).map(lambda v: ua.Variant(v, VT.Double)),
    st.lists(_ints(32, True), max_size=5).map(lambda v: ua.Variant(v, VT.Int32)),
    st.lists(st.one_of(st.none(), st.text(max_size=5)), max_size=3).map(lambda v: ua.Variant(v, VT.String)),
    st.just(ua.Variant([[1, 2, 3], [4, 5, 6]], VT.Int32, Dimensions=[2, 3])),
    st.binary(max_size=8).map(lambda v: ua.Variant(v, VT.ByteString)),
    st.text(max_size=5).map(lambda v: ua.Variant(ua.LocalizedText(v, "en"), VT.LocalizedText)),
    st.uuids().map(lambda v: ua.Variant(v, VT.Guid)),
    st.just(ua.Variant(ua.NodeId("Press7.X", 2), VT.NodeId)),
]
_STATUS = st.sampled_from(
    [
        None,  # omitted: Good
        ua.StatusCodes.Good,
        ua.StatusCodes.Good | 0x0480,  # overflow bits
        ua.StatusCodes.UncertainLastUsableValue,
        ua.StatusCodes.BadSensorFailure,
        ua.StatusCodes.BadNodeIdUnknown,
    ]
)
_PICOSECONDS = st.one_of(st.none(), st.integers(0, 9999))


@st.composite
def _data_values(draw: st.DrawFn) -> ua.DataValue:
    variant = draw(st.one_of(st.none(), *_SCALARS, *_OTHERS))
    status = draw(_STATUS)
    dv = ua.DataValue(
        variant,
        StatusCode=ua.StatusCode(status) if status is not None else None,
        SourceTimestamp=draw(st.one_of(st.none(), _DATETIMES)),
        ServerTimestamp=draw(st.one_of(st.none(), _DATETIMES)),
        SourcePicoseconds=draw(_PICOSECONDS),
        ServerPicoseconds=draw(_PICOSECONDS),
    )
    if variant is None:
        dv.Value = None  # no value at all (mask bit 0x01 clear), not a Null variant
    return dv


_DIAGNOSTICS = st.sampled_from([[], [ua.DiagnosticInfo(SymbolicId=3, AdditionalInfo="why")]])

_DATA_CHANGES = st.builds(
    lambda items, diagnostics: ua.DataChangeNotification(
        MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=h, Value=dv) for h, dv in items],
        DiagnosticInfos=diagnostics,
    ),
    st.lists(st.tuples(_ints(32, False), _data_values()), max_size=12),
    _DIAGNOSTICS,
)
_STATUS_CHANGES = st.sampled_from([ua.StatusCodes.Good, ua.StatusCodes.BadTimeout]).map(
    lambda code: ua.StatusChangeNotification(Status=ua.StatusCode(code))
)


@st.composite
def _responses(draw: st.DrawFn) -> ua.PublishResponse:
    response = ua.PublishResponse()
    response.Parameters = ua.PublishResult(
        SubscriptionId=draw(_ints(32, False)),
        AvailableSequenceNumbers=draw(st.lists(_ints(32, False), max_size=4)),
        MoreNotifications=draw(st.booleans()),
        NotificationMessage=ua.NotificationMessage(
            SequenceNumber=draw(_ints(32, False)),
            PublishTime=draw(_DATETIMES),
            NotificationData=draw(st.lists(st.one_of(_DATA_CHANGES, _STATUS_CHANGES), max_size=4)),
        ),
        Results=[ua.StatusCode(c) for c in draw(st.lists(_STATUS.filter(lambda c: c is not None), max_size=3))],
        DiagnosticInfos=[],
    )
    return response


# --- comparison -------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _expected_items(notification: ua.DataChangeNotification, *, server_time: bool) -> list[tuple[Any, ...]]:
    items = []
    for item in notification.MonitoredItems:
        dv = item.Value
        variant = dv.Value
        simple = variant is not None and not variant.is_array and variant.VariantType.value <= VT.DateTime.value
        value = variant.Value if simple else variant
        server = dv.ServerTimestamp if server_time and dv.SourcePicoseconds is None else None
        code = dv.StatusCode.value if dv.StatusCode is not None else 0
        items.append((item.ClientHandle, value, code, dv.SourceTimestamp, server))
    return items


def _fast_items(notification: FastDataChange, expected: ua.DataChangeNotification) -> list[tuple[Any, ...]]:
    items = []
    for (handle, value, code, source, server), original in zip(
        notification.items, expected.MonitoredItems, strict=True
    ):
        if original.Value.SourcePicoseconds is not None:
            server = None  # asyncua 2.1 reads ServerTimestamp/SourcePicoseconds in the other order
        items.append((handle, value, code, source, server))
    return items


def _assert_same_items(fast: FastDataChange, generic: ua.DataChangeNotification) -> None:
    want = _expected_items(generic, server_time=True)
    got = _fast_items(fast, generic)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0] and g[2] == w[2] and g[3] == w[3] and g[4] == w[4], (g, w)
        gv, wv = g[1], w[1]
        if isinstance(wv, ua.Variant):
            assert isinstance(gv, ua.Variant) and gv == wv, (gv, wv)
        elif wv is None:  # a Null variant, a null String or no value at all
            assert gv is None, (gv, wv)
        else:
            assert _same(gv, wv), (gv, wv)
    assert fast.DiagnosticInfos == generic.DiagnosticInfos


def _assert_same_response(fast: ua.PublishResponse, generic: ua.PublishResponse) -> None:
    assert fast.TypeId == generic.TypeId
    assert fast.ResponseHeader == generic.ResponseHeader
    f, g = fast.Parameters, generic.Parameters
    assert f.SubscriptionId == g.SubscriptionId
    assert f.AvailableSequenceNumbers == g.AvailableSequenceNumbers
    assert f.MoreNotifications == g.MoreNotifications
    assert f.Results == g.Results
    assert f.DiagnosticInfos == g.DiagnosticInfos
    assert f.NotificationMessage.SequenceNumber == g.NotificationMessage.SequenceNumber
    assert f.NotificationMessage.PublishTime == g.NotificationMessage.PublishTime
    pairs = zip(f.NotificationMessage.NotificationData, g.NotificationMessage.NotificationData, strict=True)
    for fn, gn in pairs:
        if isinstance(gn, ua.DataChangeNotification):
            assert type(fn) is FastDataChange, "the fast path was not taken"
            _assert_same_items(fn, gn)
        else:
            assert fn == gn


def _generic(data: bytes) -> ua.PublishResponse:
    return struct_from_binary(ua.PublishResponse, Buffer(data))


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_responses())
def test_decodes_what_asyncua_decodes(response: ua.PublishResponse) -> None:
    data = struct_to_binary(response)
    _assert_same_response(decode_publish_response(data), _generic(data))
    # as asyncua's publish gets it: a Buffer positioned at the TypeId, after other bytes
    _assert_same_response(decode_publish_response(Buffer(b"xyz" + data, 3)), _generic(data))


_PLACEHOLDER = datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
_PLACEHOLDER_TICKS = struct.pack("<q", ua.datetime_to_win_epoch(_PLACEHOLDER))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.sampled_from([0, 1, 9, 10, -1, 2**63 - 1, -(2**63), 2650467743999999999, 2650467744000000000]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_timestamps_convert_exactly_as_asyncua(ticks: list[int]) -> None:
    """Any 100-ns tick count, 0 and out-of-range ones included, gives asyncua's datetime (cache or not)."""
    items = []
    for handle, _ in enumerate(ticks):
        # the same placeholder as source time, server time and as a DateTime value
        dv = ua.DataValue(ua.Variant(_PLACEHOLDER, VT.DateTime), SourceTimestamp=_PLACEHOLDER)
        dv.ServerTimestamp = _PLACEHOLDER
        items.append(ua.MonitoredItemNotification(ClientHandle=handle, Value=dv))
    response = ua.PublishResponse()
    response.Parameters.NotificationMessage.NotificationData = [ua.DataChangeNotification(MonitoredItems=items)]
    data = bytearray(struct_to_binary(response))
    # replace each item's three placeholders by its tick count (in order: value, source, server)
    start = 0  # the header's and the message's times are now(), not the placeholder
    for value in ticks:
        for _ in range(3):
            at = data.index(_PLACEHOLDER_TICKS, start)
            data[at : at + 8] = struct.pack("<q", value)
            start = at + 8
    raw = bytes(data)
    fast = decode_publish_response(raw)
    generic = _generic(raw)
    (fast_change,) = fast.Parameters.NotificationMessage.NotificationData
    (generic_change,) = generic.Parameters.NotificationMessage.NotificationData
    assert type(fast_change) is FastDataChange
    _assert_same_items(fast_change, generic_change)
    for (_, value, _, source, server), tick in zip(fast_change.items, ticks, strict=True):
        assert value == source == server == ua.win_epoch_to_datetime(tick)


def test_a_response_the_fast_path_rejects_is_decoded_by_asyncua() -> None:
    """A DataChangeNotification body with length -1 (old servers' interop quirk): asyncua's decoder takes over."""
    dv = ua.DataValue(ua.Variant(1.5, VT.Double), SourceTimestamp=_PLACEHOLDER)
    change = ua.DataChangeNotification(MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=4, Value=dv)])
    response = ua.PublishResponse()
    response.Parameters.SubscriptionId = 7
    response.Parameters.NotificationMessage.NotificationData = [change]
    data = struct_to_binary(response)
    body = struct_to_binary(change)
    header = struct.pack("<BBHB", 1, 0, ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary, 1)
    assert data.count(header + struct.pack("<i", len(body))) == 1
    quirky = data.replace(header + struct.pack("<i", len(body)), header + struct.pack("<i", -1))

    decoded = decode_publish_response(quirky)

    assert decoded == _generic(quirky)
    (notification,) = decoded.Parameters.NotificationMessage.NotificationData
    assert notification == change and decoded.Parameters.SubscriptionId == 7


def test_a_truncated_response_raises_as_in_asyncua() -> None:
    dv = ua.DataValue(ua.Variant(1.5, VT.Double), SourceTimestamp=_PLACEHOLDER)
    response = ua.PublishResponse()
    response.Parameters.NotificationMessage.NotificationData = [
        ua.DataChangeNotification(MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=1, Value=dv)] * 3)
    ]
    data = struct_to_binary(response)
    for cut in (1, 10, len(data) // 2, len(data) - 10, len(data) - 1):
        with pytest.raises(NotEnoughData):
            _generic(data[:cut])
        with pytest.raises(NotEnoughData):
            decode_publish_response(data[:cut])


def test_this_asyncua_passes_the_self_check() -> None:
    """An asyncua upgrade that changes what the decoder relies on fails here (the source would fall back)."""
    assert self_check() is None
    assert _INLINE_LIMIT > 0  # timestamps converted inline, as asyncua does
    # not connected: no connection to send the request through
    assert problem(Client("opc.tcp://127.0.0.1:4840")) == "UaClient.protocol.send_request is missing"


# --- the source's callback: the same readings from either decoder ----------------------------


def _source_tags(count: int) -> OpcUaSource:
    tags = [{"tag": f"t{i}", "node": f"ns=2;s=T{i}"} for i in range(count)]
    config = OpcUaSourceConfig.model_validate({"name": "p", "endpoint": "opc.tcp://127.0.0.1:4840", "tags": tags})
    return config.build(context(Path(".")))


def _comparable(batches: list[list[Reading]]) -> list[tuple[Any, ...]]:
    now = datetime.now(UTC)
    return [
        # a value without any usable timestamp gets the time of arrival: not comparable
        (r.tag, repr(r.value), r.quality, None if abs((now - r.time).total_seconds()) < 600 else r.time)
        for batch in batches
        for r in batch
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_responses(), st.randoms(use_true_random=False))
def test_source_makes_the_same_readings_from_either_decoder(response: ua.PublishResponse, rng: Any) -> None:
    for notification in response.Parameters.NotificationMessage.NotificationData:
        if isinstance(notification, ua.DataChangeNotification):
            for item in notification.MonitoredItems:
                item.ClientHandle = rng.randrange(10)  # 8 tags: some handles are not ours
                item.Value.SourcePicoseconds = None  # see _fast_items
    data = struct_to_binary(response)
    fast_result = decode_publish_response(data).Parameters
    generic_result = _generic(data).Parameters

    async def run(result: ua.PublishResult) -> tuple[Recorder, OpcUaSource]:
        source = _source_tags(8)
        out = Recorder()
        batch = source._readings_of(result.NotificationMessage.NotificationData)
        if batch:
            await out.readings(batch)
        return out, source

    fast_out, fast_source = asyncio.run(run(fast_result))
    generic_out, generic_source = asyncio.run(run(generic_result))
    assert _comparable(fast_out.batches) == _comparable(generic_out.batches)
    assert fast_source.status.degraded == generic_source.status.degraded
    assert fast_source.overflows == generic_source.overflows
    assert fast_source._skipped_types == generic_source._skipped_types
    assert generic_source.fast_notifications == 0
    changes = response.Parameters.NotificationMessage.NotificationData
    assert fast_source.fast_notifications == sum(isinstance(n, ua.DataChangeNotification) for n in changes)


# --- in the source, against the press simulator -----------------------------------------------


async def test_source_decodes_publishes_with_the_fast_path(press_server: PressSimulator, tmp_path: Path) -> None:
    node = PressSimulator.node_id
    profile = await press_server.add_variable("Profile", [1.0, 2.0, 3.0], VT.Double)
    serial = await press_server.add_variable("Serial", uuid.UUID(int=7), VT.Guid)
    tags = [
        {"tag": "temperature", "node": node("Temperature")},
        {"tag": "state", "node": node("State")},
        {"tag": "cycle_done", "node": node("CycleDone")},
        {"tag": "work_order", "node": node("WorkOrder")},
        {"tag": "profile", "node": profile},
        {"tag": "serial", "node": serial},
    ]
    config = OpcUaSourceConfig.model_validate(
        {"name": "press7", "endpoint": press_server.endpoint, "publishing_interval": "50ms", "tags": tags}
    )
    source = config.build(context(tmp_path))
    out = Recorder()
    task = asyncio.create_task(source.run(out))
    try:
        await wait_for(lambda: all(out.of(t) for t in ("temperature", "state", "cycle_done", "work_order", "serial")))
        stamp = datetime(2026, 3, 1, 6, 30, 15, 250000, tzinfo=UTC)
        await press_server.write("Temperature", 181.25, source_time=stamp)
        await press_server.write("WorkOrder", "WO-4711", source_time=stamp)
        await press_server.write("CycleDone", True, source_time=stamp)
        await press_server.set_state(2)
        await wait_for(lambda: 181.25 in out.values("temperature") and 2 in out.values("state"))
        await wait_for(lambda: "WO-4711" in out.values("work_order") and True in out.values("cycle_done"))
        await press_server.write("Temperature", None, status=ua.StatusCodes.BadSensorFailure)
        await wait_for(lambda: source.status.degraded.get(node("Temperature")) == "BadSensorFailure")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert source.fast_notifications > 0
    assert source.status.info["decoder"] == "fast"
    assert out.values("temperature") == [20.0, 181.25, None]
    assert out.of("temperature")[1] == Reading("temperature", 181.25, stamp, "good")
    assert out.of("temperature")[2].quality == "bad"
    assert out.of("work_order")[-1] == Reading("work_order", "WO-4711", stamp, "good")
    assert out.of("cycle_done")[-1] == Reading("cycle_done", True, stamp, "good")
    assert type(out.values("state")[-1]) is int
    assert out.values("serial") == [str(uuid.UUID(int=7))]  # a Guid: asyncua's decoder, then _plain
    assert out.of("profile") == []  # an array: skipped, as before
