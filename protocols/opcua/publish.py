"""A fast decoder for OPC UA PublishResponses, the source's publish request that uses it, and its self-check.

asyncua decodes every PublishResponse generically: per value a ``MonitoredItemNotification``,
a ``DataValue`` and a ``Variant`` dataclass, an ``EnumType`` call for the variant type and a
``timedelta`` for each timestamp. At thousands of values per second that is most of the
agent's CPU. ``decode_publish_response`` produces the same ``ua.PublishResponse`` except
that each ``DataChangeNotification`` becomes a ``FastDataChange``: plain tuples
``(client_handle, value, status_code, source_time, server_time)`` read with
``struct.unpack_from`` from the raw bytes. Everything else (the header, status-change and
event notifications, any variant that is not a scalar of a basic type) is decoded by
asyncua's own functions, and any surprise in the fast path makes the whole response go
through asyncua's generic decoder instead: a library upgrade or an odd server may cost
speed, never correctness.

``publisher(client)`` sends a PublishRequest through the connection's public
``send_request`` and decodes the answer with it; ``problem(client)`` says whether that
is possible and whether ``self_check`` (the fast path against asyncua's decoder on a
sample response, once per process) passed. Nothing of asyncua is patched or replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import (
    extensionobject_from_binary,
    from_binary,
    get_safe_type_hints,
    get_string_encoding,
    nodeid_from_binary,
    struct_from_binary,
    struct_to_binary,
    variant_from_binary,
)
from asyncua.ua.uaerrors import UaStructParsingError

logger = logging.getLogger(__name__)

Item = tuple[int, Any, int, datetime | None, datetime | None]
"""One monitored-item value: (client handle, value, status code, source time, server time).

``value`` is a plain Python value (bool, int, float, str, datetime or None) for a scalar
of a basic type, else the ``ua.Variant`` asyncua decoded (arrays, other types).
A missing status code is 0 (Good), a missing timestamp None.
"""


class FastDataChange:
    """A DataChangeNotification decoded by hand: its items as tuples, no dataclasses per value."""

    __slots__ = ("DiagnosticInfos", "items")

    def __init__(self, items: list[Item], diagnostic_infos: list[ua.DiagnosticInfo] | None) -> None:
        self.items = items
        self.DiagnosticInfos = diagnostic_infos

    def __repr__(self) -> str:
        return f"FastDataChange({len(self.items)} items)"


# --- the decoder ------------------------------------------------------------------------------

_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_INT64 = struct.Struct("<q")
_HANDLE_MASK = struct.Struct("<IB")
_EXT_HEADER_4 = struct.Struct("<BBHBi")  # FourByte NodeId (0x01, ns, id), body encoding, body length
# The common item: value (Double) + source timestamp, status Good (omitted).
_DOUBLE_SOURCE = struct.Struct("<IBBdq")

# Variant type id -> (struct, size) of the scalars asyncua decodes with _Primitive1.
_FIXED: dict[int, tuple[struct.Struct, int]] = {
    vtype.value: (struct.Struct(fmt), struct.calcsize(fmt))
    for vtype, fmt in (
        (ua.VariantType.Boolean, "<?"),
        (ua.VariantType.SByte, "<b"),
        (ua.VariantType.Byte, "<B"),
        (ua.VariantType.Int16, "<h"),
        (ua.VariantType.UInt16, "<H"),
        (ua.VariantType.Int32, "<i"),
        (ua.VariantType.UInt32, "<I"),
        (ua.VariantType.Int64, "<q"),
        (ua.VariantType.UInt64, "<Q"),
        (ua.VariantType.Float, "<f"),
        (ua.VariantType.Double, "<d"),
    )
}
_NULL = ua.VariantType.Null.value
_STRING = ua.VariantType.String.value
_DATETIME = ua.VariantType.DateTime.value
_DOUBLE = ua.VariantType.Double.value
_DATA_CHANGE_ID = ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary

# The field deserializers asyncua itself uses for the (cheap, once per response) fields
# around the notifications, so those decode exactly as in struct_from_binary.
_RESULT_HINTS = get_safe_type_hints(ua.PublishResult, {"ua": ua})
_MESSAGE_HINTS = get_safe_type_hints(ua.NotificationMessage, {"ua": ua})
_CHANGE_HINTS = get_safe_type_hints(ua.DataChangeNotification, {"ua": ua})

# The layouts this decoder was written against (asyncua 2.1). A different layout means an
# asyncua whose types changed: the self-check then fails and asyncua decodes.
_LAYOUTS: dict[type, tuple[str, ...]] = {
    ua.PublishResponse: ("TypeId", "ResponseHeader", "Parameters"),
    ua.PublishResult: (
        "SubscriptionId",
        "AvailableSequenceNumbers",
        "MoreNotifications",
        "NotificationMessage",
        "Results",
        "DiagnosticInfos",
    ),
    ua.NotificationMessage: ("SequenceNumber", "PublishTime", "NotificationData"),
    ua.DataChangeNotification: ("MonitoredItems", "DiagnosticInfos"),
    ua.MonitoredItemNotification: ("ClientHandle", "Value"),
    ua.DataValue: (
        "Encoding",
        "Value",
        "StatusCode",
        "SourceTimestamp",
        "ServerTimestamp",
        "SourcePicoseconds",
        "ServerPicoseconds",
    ),
}


def _layout_problem() -> str | None:
    for cls, names in _LAYOUTS.items():
        actual = tuple(f.name for f in dataclasses.fields(cls))
        if actual != names:
            return f"ua.{cls.__name__} has fields {actual}, expected {names}"
    return None


# ticks (100 ns since 1601) -> datetime: asyncua's win_epoch_to_datetime is
# ``FILETIME_EPOCH + timedelta(microseconds=ticks // 10)`` for 0 <= ticks < MAX_OPC_FILETIME
# (and clamps the rest). The hot loop computes the in-range case inline, the rest through
# asyncua, and remembers the last conversion (items of a publish often share a timestamp).
_FILETIME_EPOCH = ua.win_epoch_to_datetime(0)
try:
    from asyncua.ua.uatypes import MAX_OPC_FILETIME as _MAX_TICKS
except ImportError:  # an asyncua without it: every tick goes through win_epoch_to_datetime
    _MAX_TICKS = -1


def _inline_times_agree() -> bool:
    """Whether the inline formula gives asyncua's datetimes (if not, asyncua converts every tick)."""
    if not isinstance(_MAX_TICKS, int) or _MAX_TICKS <= 0:
        return False
    samples = (0, 9, 10, 123456789, 133_000_000_000_000_000, _MAX_TICKS - 1, _MAX_TICKS - 10)
    return all(_FILETIME_EPOCH + timedelta(0, 0, t // 10) == ua.win_epoch_to_datetime(t) for t in samples)


_INLINE_LIMIT = _MAX_TICKS if _inline_times_agree() else -1


def _data_change(raw: bytes, pos: int, end: int, encoding: str) -> FastDataChange:
    """The DataChangeNotification body in ``raw[pos:end]``."""
    epoch = _FILETIME_EPOCH
    limit = _INLINE_LIMIT
    delta = timedelta
    convert = ua.win_epoch_to_datetime
    last_ticks: int | None = None
    last_time: datetime | None = None
    int32 = _INT32.unpack_from
    uint32 = _UINT32.unpack_from
    int64 = _INT64.unpack_from
    handle_mask = _HANDLE_MASK.unpack_from
    double_source = _DOUBLE_SOURCE.unpack_from
    fixed = _FIXED
    (count,) = int32(raw, pos)
    pos += 4
    if count > end - pos:  # not even one byte per item: a corrupt count, not a huge allocation
        raise ValueError(f"DataChangeNotification claims {count} items in {end - pos} bytes")
    items: list[Item] = []
    append = items.append
    for _ in range(count):
        if raw[pos + 4] == 0x05 and raw[pos + 5] == _DOUBLE:
            # value (Double) + source timestamp, the bulk of telemetry
            handle, _mask, _vtype, value, ticks = double_source(raw, pos)
            pos += 22
            if ticks != last_ticks:
                last_time = epoch + delta(0, 0, ticks // 10) if 0 <= ticks < limit else convert(ticks)
                last_ticks = ticks
            append((handle, value, 0, last_time, None))
            continue
        handle, mask = handle_mask(raw, pos)
        pos += 5
        value = None
        code = 0
        source = server = None
        if mask & 0x01:
            vtype = raw[pos]
            if vtype in fixed:
                unpacker, size = fixed[vtype]
                (value,) = unpacker.unpack_from(raw, pos + 1)
                pos += 1 + size
            elif vtype == _STRING:
                (length,) = int32(raw, pos + 1)
                pos += 5
                if length >= 0:
                    if pos + length > end:
                        raise ValueError("String runs past the notification")
                    value = raw[pos : pos + length].decode(encoding, errors="surrogateescape")
                    pos += length
                elif length != -1:
                    raise ValueError(f"String length {length}")
            elif vtype == _DATETIME:
                (ticks,) = int64(raw, pos + 1)
                value = convert(ticks)
                pos += 9
            elif vtype == _NULL:
                pos += 1
            else:  # arrays, dimensions, other types: asyncua's decoder, from this byte on
                buffer = Buffer(raw, pos, end - pos)
                value = variant_from_binary(buffer)
                pos = buffer.cur_pos
        if mask & 0x02:
            (code,) = uint32(raw, pos)
            pos += 4
        if mask & 0x04:
            (ticks,) = int64(raw, pos)
            if ticks != last_ticks:
                last_time = epoch + delta(0, 0, ticks // 10) if 0 <= ticks < limit else convert(ticks)
                last_ticks = ticks
            source = last_time
            pos += 8
        # OPC UA Part 6, 5.2.2.17: SourcePicoseconds come before ServerTimestamp.
        if mask & 0x10:
            pos += 2
        if mask & 0x08:
            (ticks,) = int64(raw, pos)
            server = convert(ticks)
            pos += 8
        if mask & 0x20:
            pos += 2
        append((handle, value, code, source, server))
    diagnostics: list[ua.DiagnosticInfo] | None
    if raw[pos : pos + 4] == b"\x00\x00\x00\x00":
        diagnostics = []
        pos += 4
    else:
        buffer = Buffer(raw, pos, end - pos)
        diagnostics = from_binary(_CHANGE_HINTS["DiagnosticInfos"], buffer)
        pos = buffer.cur_pos
    if pos > end:
        raise ValueError(f"DataChangeNotification overran its body by {pos - end} bytes")
    return FastDataChange(items, diagnostics)


def _decode_fast(raw: bytes) -> ua.PublishResponse:
    buffer = Buffer(raw)
    type_id = nodeid_from_binary(buffer)  # not checked, as in struct_from_binary
    header = struct_from_binary(ua.ResponseHeader, buffer)
    subscription_id = from_binary(_RESULT_HINTS["SubscriptionId"], buffer)
    available = from_binary(_RESULT_HINTS["AvailableSequenceNumbers"], buffer)
    more = from_binary(_RESULT_HINTS["MoreNotifications"], buffer)
    sequence_number = from_binary(_MESSAGE_HINTS["SequenceNumber"], buffer)
    publish_time = from_binary(_MESSAGE_HINTS["PublishTime"], buffer)
    pos = buffer.cur_pos
    (count,) = _INT32.unpack_from(raw, pos)
    pos += 4
    notifications: list[Any] = []
    encoding = get_string_encoding()
    for _ in range(count):
        type_byte, namespace, identifier, body_encoding, length = _EXT_HEADER_4.unpack_from(raw, pos)
        if type_byte == 0x01 and namespace == 0 and identifier == _DATA_CHANGE_ID and body_encoding == 0x01:
            start = pos + 9
            end = start + length
            if length < 4 or end > len(raw):
                raise ValueError(f"DataChangeNotification body of {length} bytes")
            notifications.append(_data_change(raw, start, end, encoding))
            pos = end
        else:  # StatusChangeNotification, EventNotificationList, ...: asyncua decodes them
            buffer = Buffer(raw, pos)
            notifications.append(extensionobject_from_binary(buffer))
            pos = buffer.cur_pos
    buffer = Buffer(raw, pos)
    results = from_binary(_RESULT_HINTS["Results"], buffer)
    diagnostics = from_binary(_RESULT_HINTS["DiagnosticInfos"], buffer)
    return ua.PublishResponse(
        TypeId=type_id,
        ResponseHeader=header,
        Parameters=ua.PublishResult(
            SubscriptionId=subscription_id,
            AvailableSequenceNumbers=available,
            MoreNotifications=more,
            NotificationMessage=ua.NotificationMessage(
                SequenceNumber=sequence_number, PublishTime=publish_time, NotificationData=notifications
            ),
            Results=results,
            DiagnosticInfos=diagnostics,
        ),
    )


_fallback_logged = False


def decode_publish_response(data: bytes | Buffer) -> ua.PublishResponse:
    """The PublishResponse in ``data`` (bytes, or an asyncua Buffer at the response's TypeId).

    As ``struct_from_binary(ua.PublishResponse, data)``, except that DataChangeNotifications
    come as ``FastDataChange``. When the fast path fails on a response (logged once), that
    response is decoded by asyncua's generic decoder, which raises if it fails too.
    """
    global _fallback_logged
    raw = bytes(data)
    if isinstance(data, Buffer):
        raw = raw[: len(data)]  # a Buffer may end before its underlying bytes do
    try:
        return _decode_fast(raw)
    except Exception as exc:
        if not _fallback_logged:
            _fallback_logged = True
            logger.warning(
                "Fast OPC UA publish decoding failed; using asyncua's decoder for such responses",
                exc_info=exc,
            )
        else:
            logger.debug("Fast OPC UA publish decoding failed", extra={"error": repr(exc)})
        return struct_from_binary(ua.PublishResponse, Buffer(raw))


# --- in the source: the publish request, and the check at connect -------------------------------


def publisher(client: Client) -> Callable[[list[ua.SubscriptionAcknowledgement]], Awaitable[ua.PublishResponse]]:
    """A ``publish(acks)`` like ``client.uaclient.publish`` that decodes with ``decode_publish_response``.

    The request goes out through the connection's public ``UASocketProtocol.send_request``,
    which returns the response's bytes (ServiceFaults already raised as asyncua's
    exceptions), the same path ``UaClient.publish`` takes; nothing of asyncua is replaced.
    The connection is looked up at every call (None once closed: ConnectionError).
    """
    uaclient = client.uaclient

    async def publish(acks: list[ua.SubscriptionAcknowledgement]) -> ua.PublishResponse:
        protocol = uaclient.protocol
        if protocol is None:
            raise ConnectionError("connection is not open")
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = list(acks)
        # timeout 0: no timeout hint; the server holds the request until it has something to send
        data = await protocol.send_request(request, timeout=0)
        try:
            return decode_publish_response(data)
        except Exception as exc:
            raise UaStructParsingError(f"unreadable PublishResponse: {exc!r}") from exc

    return publish


def _sample_response() -> ua.PublishResponse:
    """A publish response with every kind of value the fast path reads itself, and some it hands over."""
    stamp: Any = datetime(2026, 3, 1, 6, 30, 15, 250000, tzinfo=UTC)
    vt = ua.VariantType

    def code(value: int) -> ua.StatusCode:
        return ua.StatusCode(ua.UInt32(value))

    values: list[ua.DataValue] = [
        ua.DataValue(ua.Variant(21.5, vt.Double), SourceTimestamp=stamp),
        ua.DataValue(ua.Variant(-7, vt.Int32), StatusCode=code(ua.StatusCodes.UncertainLastUsableValue)),
        ua.DataValue(ua.Variant(True, vt.Boolean), SourceTimestamp=stamp, ServerTimestamp=stamp),
        ua.DataValue(ua.Variant("WO-4711 \u00e4", vt.String), SourceTimestamp=stamp),
        ua.DataValue(ua.Variant(None, vt.String)),
        ua.DataValue(ua.Variant(stamp, vt.DateTime)),
        ua.DataValue(ua.Variant(2**40, vt.UInt64), StatusCode=code(ua.StatusCodes.Good | 0x0480)),
        ua.DataValue(ua.Variant(1.25, vt.Float), SourceTimestamp=stamp, SourcePicoseconds=ua.UInt16(5)),
        ua.DataValue(ua.Variant([1.0, 2.0], vt.Double)),
        ua.DataValue(StatusCode=code(ua.StatusCodes.BadSensorFailure), SourceTimestamp=stamp),
    ]
    values[-1].Value = None
    change = ua.DataChangeNotification(
        MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=h, Value=v) for h, v in enumerate(values)]
    )
    response = ua.PublishResponse()
    response.Parameters = ua.PublishResult(
        SubscriptionId=7,
        AvailableSequenceNumbers=[3, 4],
        MoreNotifications=False,
        NotificationMessage=ua.NotificationMessage(
            SequenceNumber=4,
            PublishTime=stamp,
            NotificationData=[change, ua.StatusChangeNotification(Status=code(ua.StatusCodes.Good))],
        ),
        Results=[code(ua.StatusCodes.Good)],
        DiagnosticInfos=[],
    )
    return response


def _as_item(notification: ua.MonitoredItemNotification) -> Item:
    dv = notification.Value
    variant = dv.Value
    plain = variant is not None and not variant.is_array and variant.VariantType.value <= ua.VariantType.DateTime.value
    value = variant.Value if plain else variant
    code = dv.StatusCode.value if dv.StatusCode is not None else 0
    # asyncua and the spec disagree on where ServerTimestamp sits next to SourcePicoseconds
    server = dv.ServerTimestamp if dv.SourcePicoseconds is None else None
    return (notification.ClientHandle, value, code, dv.SourceTimestamp, server)


def self_check() -> str | None:
    """None when the fast decoder reads a sample response exactly as asyncua does; else what differs.

    Run at every connect (the result is cached per process): an asyncua release whose
    encoding or types moved makes the source fall back to asyncua's decoder.
    """
    global _self_check_result
    if _self_check_result is not _UNCHECKED:
        return _self_check_result
    try:
        problem = _layout_problem() or _compare(struct_to_binary(_sample_response()))
    except Exception as exc:
        problem = f"self-check failed: {exc!r}"
    _self_check_result = problem
    return problem


def _compare(data: bytes) -> str | None:
    fast = decode_publish_response(data).Parameters
    generic = struct_from_binary(ua.PublishResponse, Buffer(data)).Parameters
    for name in ("SubscriptionId", "AvailableSequenceNumbers", "MoreNotifications", "Results", "DiagnosticInfos"):
        if getattr(fast, name) != getattr(generic, name):
            return f"PublishResult.{name} differs"
    f, g = fast.NotificationMessage, generic.NotificationMessage
    if (f.SequenceNumber, f.PublishTime) != (g.SequenceNumber, g.PublishTime):
        return "NotificationMessage header differs"
    if len(f.NotificationData) != len(g.NotificationData):
        return "number of notifications differs"
    for fn, gn in zip(f.NotificationData, g.NotificationData, strict=True):
        if isinstance(gn, ua.DataChangeNotification):
            if type(fn) is not FastDataChange:
                return "the fast path was not taken"
            want = [_as_item(item) for item in gn.MonitoredItems]
            got = [
                (h, v, c, s, server if item.Value.SourcePicoseconds is None else None)
                for (h, v, c, s, server), item in zip(fn.items, gn.MonitoredItems, strict=True)
            ]
            for w, o in zip(want, got, strict=True):
                if w != o or type(w[1]) is not type(o[1]):
                    return f"item differs: asyncua {w!r}, fast {o!r}"
        elif fn != gn:
            return f"{type(gn).__name__} differs"
    return None


_UNCHECKED = "unchecked"
_self_check_result: str | None = _UNCHECKED


def problem(client: Client) -> str | None:
    """Why the fast decoder cannot serve ``client`` (None: it can): the public seam missing, or the self-check."""
    uaclient = getattr(client, "uaclient", None)
    protocol = getattr(uaclient, "protocol", None)
    if not callable(getattr(protocol, "send_request", None)):
        return "UaClient.protocol.send_request is missing"
    return self_check()
