"""Native MES payloads -> canonical events, by the declarative ``[sources.mes.mappings.<name>]``.

Few MES systems speak CloudEvents. A mapping names, by field paths into the MES's
own JSON, where each record's id, time, subject and data fields are; every record
becomes one event of the mapping's type. The event id is stable: derived from the
record's own id (or, without one, from its whole content), the source and the
mapping, so an MES that sends the same record again gives the same id and the
buffer stores it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from agent.events import (
    PAYLOAD_OF_TYPE,
    TRANSACTION_TYPES,
    CloudEvent,
    decimal_string,
    identifier_string,
    make_event,
    stable_id,
)
from agent.rules import IDENTIFIER_FIELDS
from protocols.mes import FieldPath, MesMapping, parse_path
from protocols.mes.ingest import FieldError

_MISSING = object()
_TRANSACTIONS = frozenset(TRANSACTION_TYPES)
_sorted_json = msgspec.json.Encoder(order="sorted")


def lookup(value: Any, path: FieldPath) -> Any:
    """The value at ``path`` in decoded JSON, or ``_MISSING``."""
    for segment in path:
        if isinstance(segment, int):
            if not isinstance(value, list) or not -len(value) <= segment < len(value):
                return _MISSING
            value = value[segment]
        else:
            if not isinstance(value, dict) or segment not in value:
                return _MISSING
            value = value[segment]
    return value


def value_at(value: Any, path: FieldPath) -> Any | None:
    """The value at ``path``, or None when it is not there."""
    found = lookup(value, path)
    return None if found is _MISSING else found


class RecordError(Exception):
    """One record does not fit its mapping: the path and what is wrong."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class CompiledMapping:
    """One mapping with its paths parsed once, turning records into events."""

    def __init__(self, name: str, config: MesMapping, *, source_name: str, site: str):
        self.name = name
        self.config = config
        self.type = config.type
        self.site = site
        self.origin = f"plantgate-mes:{source_name}/{name}"
        self._id_parts = (source_name, name)
        self.items = parse_path(config.items) if config.items is not None else None
        self.id = parse_path(config.id) if config.id is not None else None
        self.time = parse_path(config.time) if config.time is not None else None
        self.zone = ZoneInfo(config.timezone)
        self.subject = parse_path(config.subject) if config.subject is not None else None
        self.correlationid = parse_path(config.correlationid) if config.correlationid is not None else None
        self.fields = [(key, path, parse_path(path), key in config.optional) for key, path in config.fields.items()]
        uom = (config.uom or "").strip()
        self.uom_path = parse_path(uom) if uom.startswith("$") else None
        self.uom_literal = uom if uom and not uom.startswith("$") else None
        self.payload = None if self.type in _TRANSACTIONS else PAYLOAD_OF_TYPE[self.type]

    def records(self, body: Any) -> list[Any]:
        """The records of a decoded body; ``RecordError`` when ``items`` is not a list."""
        if self.items is not None:
            found = lookup(body, self.items)
            if not isinstance(found, list):
                what = "missing" if found is _MISSING else f"a {type(found).__name__}, not a list"
                raise RecordError(self.config.items or "$", f"the list of records is {what}")
            return found
        return body if isinstance(body, list) else [body]

    def events(self, records: Sequence[Any], *, received: datetime) -> tuple[list[CloudEvent], list[FieldError]]:
        """An event per record that fits; a ``FieldError`` (record index, path) per record that does not."""
        events: list[CloudEvent] = []
        errors: list[FieldError] = []
        for index, record in enumerate(records):
            try:
                events.append(self.event(record, received=received))
            except RecordError as exc:
                errors.append(FieldError(index, exc.path, exc.message))
        return events, errors

    def event(self, record: Any, *, received: datetime) -> CloudEvent:
        """The canonical event of one record; ``RecordError`` naming the path that does not fit."""
        if not isinstance(record, dict):
            raise RecordError("$", f"a record is a JSON object, not a {type(record).__name__}")
        data: dict[str, Any] = {}
        for key, text, path, optional in self.fields:
            found = lookup(record, path)
            if found is _MISSING or found is None:
                if optional:
                    continue
                raise RecordError(text, f"required for {key!r} and missing")
            data[key] = self._field(key, text, found, record)
        native_id = None
        if self.id is not None:
            native_id = lookup(record, self.id)
            if native_id is _MISSING or native_id is None or isinstance(native_id, dict | list) or native_id == "":
                raise RecordError(self.config.id or "$", "the record's id is missing or not a string or number")
            event_id = stable_id(*self._id_parts, "id", identifier_string(native_id))
        else:
            event_id = stable_id(*self._id_parts, "content", _sorted_json.encode(record).decode())
        time = received
        if self.time is not None:
            time = self._time(lookup(record, self.time))
        subject = None
        if self.subject is not None:
            found = lookup(record, self.subject)
            if found is not _MISSING and found is not None and not isinstance(found, dict | list):
                subject = identifier_string(found)
        if subject is None:
            subject = next((data[key] for key in ("work_order", "lot") if isinstance(data.get(key), str)), None)
        correlationid = None
        if self.correlationid is not None:
            found = lookup(record, self.correlationid)
            if found is not _MISSING and found is not None and not isinstance(found, dict | list):
                correlationid = identifier_string(found)
        payload: Any = data
        if self.payload is not None:
            try:
                payload = msgspec.convert(data, self.payload)
            except msgspec.ValidationError as exc:
                raise RecordError("$", f"does not make a valid {self.type} payload: {exc}") from None
        return make_event(
            self.type,
            id=event_id,
            source=self.origin,
            time=time,
            site=self.site,
            data=payload,
            subject=subject or None,
            correlationid=correlationid,
        )

    def _field(self, key: str, path: str, value: Any, record: dict[str, Any]) -> Any:
        if key == "quantity" or key.endswith("_quantity"):
            uom: str | None
            if isinstance(value, dict):
                if set(value) != {"value", "uom"} or not isinstance(value["uom"], str):
                    raise RecordError(path, "a quantity object is {\"value\", \"uom\"}")
                amount, uom = value["value"], value["uom"]
            else:
                amount, uom = value, self._uom(record)
            try:
                text = decimal_string(amount)
            except (ValueError, ArithmeticError) as exc:
                raise RecordError(path, str(exc)) from None
            if not uom:
                raise RecordError(self.config.uom or path, "no unit for the quantity (set uom in the mapping)")
            # A plain dict like a decoded CloudEvent's, so [mappings.uom] applies to it alike.
            return {"value": text, "uom": uom}
        if isinstance(value, dict | list):
            raise RecordError(path, f"a field value is a string, number or boolean, not a {type(value).__name__}")
        if key in IDENTIFIER_FIELDS or key.endswith("_item"):
            return identifier_string(value)
        if isinstance(value, float) and value != value:
            return str(value)
        return value

    def _uom(self, record: dict[str, Any]) -> str | None:
        if self.uom_path is not None:
            found = lookup(record, self.uom_path)
            return found.strip() if isinstance(found, str) else None
        return self.uom_literal

    def _time(self, value: Any) -> datetime:
        path = self.config.time or "$"
        if not isinstance(value, str):
            raise RecordError(path, "the time is missing or not a string (RFC 3339 / ISO 8601)")
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise RecordError(path, f"{value!r} is not an RFC 3339 / ISO 8601 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=self.zone)
        return parsed.astimezone(UTC)
