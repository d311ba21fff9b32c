"""CloudEvents from the MES, checked and turned into canonical events: one decode per request.

The body is decoded once by msgspec into envelope Structs (C speed; the first
invalid attribute is named with its element index), then each element's ``data``
is checked against the canonical payload of its type. Nothing is built unless the
whole request is valid: a 400 stores nothing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from agent.events import PAYLOAD_OF_TYPE, TRANSACTION_TYPES, CloudEvent, identifier_string, make_event
from agent.rules import IDENTIFIER_FIELDS
from protocols.mes import canonical_name

MAX_DEPTH = 32
"""Deepest JSON nesting accepted in a request body."""

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]
_AT = re.compile(r" - at `\$(?:\[(\d+)\])?\.?([^`\[]*)")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_DROP_ALL_BUT_STRUCTURE = bytes(range(256)).translate(None, b'[]{}"')
_INNERMOST = re.compile(rb"\[\]|\{\}")
_TRANSACTIONS = frozenset(TRANSACTION_TYPES)
_DATA_DECODERS = {
    name: msgspec.json.Decoder(payload if name not in _TRANSACTIONS else dict[str, Any])
    for name, payload in PAYLOAD_OF_TYPE.items()
}


class FieldError(msgspec.Struct):
    """One problem of one element: its index in the request, the attribute or data path, what is wrong."""

    index: int | None
    field: str
    message: str


class InvalidRequest(Exception):
    """The request cannot be accepted; ``errors`` name each element and field (the 400 body)."""

    def __init__(self, message: str, errors: list[FieldError] | None = None):
        super().__init__(message)
        self.message = message
        self.errors = errors or []

    def body(self) -> dict[str, Any]:
        """The JSON body of the 400."""
        return {
            "error": self.message,
            "errors": [{"index": e.index, "field": e.field, "message": e.message} for e in self.errors],
        }


class IncomingEvent(msgspec.Struct):
    """A CloudEvent as the MES sends it (structured mode). Other extension attributes are ignored."""

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    time: _AwareTime
    data: msgspec.Raw
    subject: _NonEmpty | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    correlationid: str | None = None
    traceparent: str | None = None
    partitionkey: _NonEmpty | None = None


_one = msgspec.json.Decoder(IncomingEvent)
_many = msgspec.json.Decoder(list[IncomingEvent])


def depth_within(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``body`` (valid JSON) nests arrays and objects at most ``limit`` deep.

    Escapes are dropped, then everything but brackets and quotes is deleted (one
    C-level ``translate``: about a fifth of the body is left), string contents are cut
    out, then innermost pairs are removed ``limit`` times. About 0.4 ms
    for a batch of 500 events, where a Python walk of the decoded value costs several.
    """
    if b"\\" in body:  # escapes first, where the character after a backslash is still there
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = body.translate(None, _DROP_ALL_BUT_STRUCTURE)
    if skeleton.count(b"[") + skeleton.count(b"{") <= limit:
        return True
    brackets = b"".join(skeleton.split(b'"')[::2])
    for _ in range(limit):
        if not brackets:
            return True
        before = len(brackets)
        brackets = _INNERMOST.sub(b"", brackets)  # one level: both kinds in one pass
        if len(brackets) == before:
            return False
    return not brackets


def _error_of(exc: msgspec.ValidationError, batch: bool) -> FieldError:
    """msgspec's ``Expected `str` - at `$[3].time``` as index 3, field ``time``."""
    text = str(exc)
    index: int | None = None if batch else 0
    field = ""
    at = _AT.search(text)
    if at is not None:
        if at.group(1) is not None:
            index = int(at.group(1))
        field = at.group(2) or ""
        text = text[: at.start()]
    missing = _MISSING.search(text)
    if missing is not None:
        field = f"{field}.{missing.group(1)}" if field else missing.group(1)
    return FieldError(index=index, field=field or "(element)", message=text)


def decode_events(body: bytes, *, batch: bool) -> list[IncomingEvent]:
    """The request's events; ``InvalidRequest`` naming index and field for anything invalid."""
    start = body.lstrip()[:1]
    if batch and start != b"[":
        raise InvalidRequest("a batch (application/cloudevents-batch+json) must be a JSON array of events")
    if not batch and start == b"[":
        raise InvalidRequest("a batch sent as application/cloudevents+json; use application/cloudevents-batch+json")
    try:
        events = _many.decode(body) if batch else [_one.decode(body)]
    except msgspec.ValidationError as exc:
        raise InvalidRequest("invalid event", [_error_of(exc, batch)]) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if not depth_within(body):
        raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    if not events:
        raise InvalidRequest("an empty batch")
    return events


def build_events(incoming: list[IncomingEvent], *, site: str) -> list[CloudEvent]:
    """Canonical events of valid incoming ones; ``InvalidRequest`` listing every element that is not."""
    errors: list[FieldError] = []
    built: list[CloudEvent] = []
    for index, event in enumerate(incoming):
        name = canonical_name(event.type)
        if name is None:
            errors.append(FieldError(index, "type", f"{event.type!r} is not a canonical event type"))
            continue
        if event.datacontenttype is not None and event.datacontenttype.split(";")[0].strip() != "application/json":
            errors.append(FieldError(index, "datacontenttype", "only application/json data is accepted"))
            continue
        try:
            data = _DATA_DECODERS[name].decode(event.data)
        except msgspec.ValidationError as exc:
            error = _error_of(exc, False)
            errors.append(FieldError(index, "data" + ("." + error.field if error.field != "(element)" else ""),
                                     error.message))  # fmt: skip
            continue
        except (msgspec.DecodeError, RecursionError) as exc:
            errors.append(FieldError(index, "data", f"not valid JSON data: {exc}"))
            continue
        subject = event.subject
        if name in _TRANSACTIONS:
            problem = _transaction_problem(data)
            if problem is not None:
                errors.append(FieldError(index, f"data.{problem[0]}", problem[1]))
                continue
            if subject is None:
                subject = _business_key(data)
        time = event.time if event.time.tzinfo is UTC else event.time.astimezone(UTC)
        built.append(
            make_event(
                name,
                id=event.id,
                source=event.source,
                time=time,
                site=site,
                data=data,
                subject=subject,
                partitionkey=event.partitionkey,
                correlationid=event.correlationid,
                traceparent=event.traceparent,
            )
        )
    if errors:
        raise InvalidRequest("invalid event", errors)
    return built


def _business_key(data: dict[str, Any]) -> str | None:
    """The subject of a transaction sent without one: its work order, else its lot."""
    for key in ("work_order", "lot"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _transaction_problem(data: dict[str, Any]) -> tuple[str, str] | None:
    """A transaction's data: flat values, quantities as ``{"value": "<decimal>", "uom"}`` (never floats).

    Identifiers sent as numbers become strings in place (``4711``, never ``4711.0``).
    """
    for key, value in data.items():
        if (key in IDENTIFIER_FIELDS or key.endswith("_item")) and isinstance(value, int | float) and not isinstance(
            value, bool
        ):
            data[key] = identifier_string(value)
        elif key == "quantity" or key.endswith("_quantity"):
            if not (isinstance(value, dict) and set(value) == {"value", "uom"}):
                return key, "a quantity is {\"value\": \"<decimal string>\", \"uom\": \"<code>\"}"
            if not isinstance(value["value"], str) or not isinstance(value["uom"], str) or not value["uom"]:
                return key, "a quantity's value is a decimal string and its uom a non-empty code"
            if not _is_decimal(value["value"]):
                return f"{key}.value", f"{value['value']!r} is not a decimal number"
        elif isinstance(value, dict | list):
            return key, "a transaction's data values are strings, numbers, booleans or null (quantities excepted)"
    return None


_DECIMAL = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")


def _is_decimal(text: str) -> bool:
    return _DECIMAL.match(text) is not None
