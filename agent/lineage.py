"""Trace, business outcome and reconciliation, on top of the buffer's delivery journal.

The agent builds one ``Lineage``: its routes join the agent's HTTP server, ``run``
is a supervised task (the periodic reconciliation summary), ``status`` is the
``lineage`` section of ``/status``, ``refresh_metrics`` runs before a scrape.

Endpoints (access as the buffer admin routes, ``agent.buffer_api.OperatorAccess``: the
ingest or the admin token; a resend, which changes the buffer, the admin token when
``[http].admin_token_file`` is set; with no token configured, only on a loopback
listen address):

==========================================  ================================================================
``GET /v1/trace/{key}``                     every journal entry whose id, work order or lot is ``key``
``GET /v1/trace?work_order=W`` / ``?lot=L`` the same, by one key named explicitly
``POST /v1/outcomes``                       what the ERP did with events: posted (reference) or rejected
``GET /v1/reconciliation?from=&to=&type=``  the events delivered (or ``by=committed``) in a window, digest
``POST /v1/reconciliation/lookup``          ``{"ids": [...]}``: what the journal knows of these ids
``POST /v1/reconciliation/resend``          ``{"ids": [...]}``: send these delivered events again, same ids
==========================================  ================================================================

The digest of a set of event ids (``digest``) is the SHA-256, in lower-case hex,
of the ids sorted (by their UTF-8 bytes) and joined by ``"\\n"``, without a
trailing newline: independent of the order events were delivered in, and easy to
compute anywhere.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from agent.buffer_api import OperatorAccess
from agent.events import (
    TRANSACTION_TYPES,
    TYPE_PREFIX,
    ReconciliationCounts,
    ReconciliationSummary,
    make_event,
    stable_id,
)
from agent.http_server import json_response
from buffer import DeadLetter, JournalEntry, OutcomeReport

if TYPE_CHECKING:
    from agent.pipeline import Agent

log = logging.getLogger(__name__)

ERP_SINK = "erp"
"""The sink name of a business dead letter (an event the ERP rejected), beside the transport sinks."""

REJECTED_PREFIX = "rejected by the ERP: "
"""A business dead letter's reason starts with this, followed by the ERP's own reason."""

SUMMARY_STATE_KEY = "lineage.reconciliation.window_end"
"""The buffer state key holding the end (Unix time) of the last window summed up."""

MAX_MISSED_WINDOWS = 48
"""Windows missed while the agent was down, summed up at start; older ones are skipped (logged)."""

MAX_OUTCOMES = 10_000
"""Outcomes in one ``POST /v1/outcomes``."""

MAX_LOOKUP_IDS = 20_000
"""Ids in one lookup or resend request."""

STATUS_REFRESH_SECONDS = 2.0
"""How often ``run`` refreshes the outcome figures ``/status`` shows."""

SUMMARY_GRACE_SECONDS = 0.2
"""A window is summed up this long after it ends, so acknowledgements settled at its end are in."""

TRANSACTION_TYPE_NAMES = frozenset(TYPE_PREFIX + name for name in TRANSACTION_TYPES)


# --- pure parts: digest, times, files, outcome bodies ---------------------------------------------------


def digest(ids: Iterable[str]) -> str:
    """SHA-256 (hex) of the ids sorted by their UTF-8 bytes and joined by ``"\\n"`` (no trailing newline)."""
    encoded = sorted(event_id.encode() for event_id in ids)
    return hashlib.sha256(b"\n".join(encoded)).hexdigest()


def parse_time(text: str) -> float:
    """Unix seconds from ``text``: a number of Unix seconds, or an ISO 8601 time (UTC when no offset).

    Raises ``ValueError`` saying what was expected.
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a time")
        return value
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 time (2026-12-05T10:00:00Z) or Unix seconds") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(at: float) -> str:
    """Unix seconds as RFC 3339 UTC (``2026-12-05T10:00:00Z``, fractions only when there are any)."""
    moment = datetime.fromtimestamp(at, UTC)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def read_ids(path: Path) -> list[str]:
    """The event ids an ERP export holds: CSV or JSON lines, told apart by the first non-blank character.

    - JSON lines: each line an object with ``"id"`` or a bare JSON string; blank lines are skipped.
    - CSV: the column named ``id`` (any case) when the header has one, else the first column of
      every row (a first row that is not an id, e.g. ``event_id``, is taken for an id as well:
      name the column ``id`` to have the header skipped).

    Repeats are kept once, in first-seen order. Raises ``ValueError("<file>:<line>: ...")``.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text") from exc
    first = text.lstrip()[:1]
    ids = _json_lines(path, text) if first in ("{", '"') else _csv_ids(path, text)
    return list(dict.fromkeys(ids))


def _json_lines(path: Path, text: str) -> list[str]:
    ids: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc.msg}") from exc
        if isinstance(value, dict):
            value = value.get("id")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{path}:{number}: expected an object with a string "id" or a JSON string')
        ids.append(value.strip())
    return ids


def _csv_ids(path: Path, text: str) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise ValueError(f"{path}: not CSV: {exc}") from exc
    column, start = 0, 0
    if rows:
        header = [cell.strip().lower() for cell in rows[0]]
        if "id" in header:
            column, start = header.index("id"), 1
    ids: list[str] = []
    for number, row in enumerate(rows[start:], start + 1):
        if not any(cell.strip() for cell in row):
            continue
        if column >= len(row) or not row[column].strip():
            raise ValueError(f"{path}:{number}: no id in column {column + 1}")
        ids.append(row[column].strip())
    return ids


class OutcomeItem(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One business outcome reported by the middleware."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    outcome: Literal["posted", "rejected"]
    reference: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    reason: Annotated[str, msgspec.Meta(max_length=4096)] | None = None


class OutcomeError(ValueError):
    """A ``POST /v1/outcomes`` body that is not valid; the message names the item and field."""


def parse_outcomes(body: bytes) -> list[OutcomeItem]:
    """The outcomes of a request body (one object or a JSON array of them); ``OutcomeError`` when any is invalid."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise OutcomeError(f"not JSON: {exc}") from exc
    items = value if isinstance(value, list) else [value]
    if not items:
        raise OutcomeError("an empty list: nothing to record")
    if len(items) > MAX_OUTCOMES:
        raise OutcomeError(f"{len(items)} outcomes in one request; at most {MAX_OUTCOMES}")
    parsed: list[OutcomeItem] = []
    for index, item in enumerate(items):
        where = f"item {index}" if isinstance(value, list) else "the outcome"
        if not isinstance(item, dict):
            raise OutcomeError(f"{where}: expected an object with id and outcome")
        try:
            outcome = msgspec.convert(item, OutcomeItem)
        except msgspec.ValidationError as exc:
            raise OutcomeError(f"{where}: {exc}") from exc
        if outcome.outcome == "rejected" and not (outcome.reason and outcome.reason.strip()):
            raise OutcomeError(f"{where}: a rejection needs a reason - at `$.reason`")
        parsed.append(outcome)
    return parsed


def event_state(entry: Any) -> str:
    """``pending``, ``delivered``, ``posted``, ``rejected`` or ``dead-letter`` for a journal entry."""
    if entry.outcome in ("posted", "rejected"):
        return str(entry.outcome)
    steps = [step.step for step in entry.steps if step.step in ("dead_letter", "replayed", "acked")]
    if steps and steps[-1] == "dead_letter":
        return "dead-letter"
    return "delivered" if entry.delivered is not None else "pending"


def canonical_type(text: str | None) -> str | None:
    """A type filter as given (``production.completed`` or ``io.plantgate.production.completed``), in full."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    return text if text.startswith(TYPE_PREFIX) else TYPE_PREFIX + text


# --- comparison with the ERP ----------------------------------------------------------------------------


class JournalReader(Protocol):
    """What reconciliation reads: the running agent's API, or a stopped agent's file."""

    async def window(self, start: float, end: float, type_: str | None) -> list[dict[str, Any]]: ...

    async def lookup(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...


@dataclass
class Comparison:
    """What the plant delivered and the ERP lacks, and what the ERP holds that the plant never sent."""

    start: float
    end: float
    type: str | None
    delivered: int
    erp: int
    missing_in_erp: list[dict[str, Any]] = field(default_factory=list)
    unknown_to_plant: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "from": iso(self.start),
            "to": iso(self.end),
            "type": self.type,
            "delivered": self.delivered,
            "erp": self.erp,
            "missing_in_erp": [item["id"] for item in self.missing_in_erp],
            "unknown_to_plant": self.unknown_to_plant,
            "rejected": [item["id"] for item in self.rejected],
            "details": {"missing_in_erp": self.missing_in_erp, "rejected": self.rejected},
        }


async def compare(
    reader: JournalReader, erp_ids: Sequence[str], start: float, end: float, type_: str | None
) -> Comparison:
    """Compare the events delivered in ``[start, end)`` (of ``type_``, else of every transaction type) with the ERP.

    ``missing_in_erp``: delivered in the window, not in ``erp_ids``, and not rejected by the ERP
    (those are business dead letters, listed apart as ``rejected``). ``unknown_to_plant``: ids in
    ``erp_ids`` the journal does not know as delivered at all (any time).
    """
    delivered = await reader.window(start, end, type_)
    if type_ is None:  # the ERP holds postings: the agent's own and other operational events are not compared
        delivered = [event for event in delivered if event.get("type") in TRANSACTION_TYPE_NAMES]
    erp = set(erp_ids)
    result = Comparison(start=start, end=end, type=type_, delivered=len(delivered), erp=len(erp))
    for event in delivered:
        if event["id"] in erp:
            continue
        (result.rejected if event.get("outcome") == "rejected" else result.missing_in_erp).append(event)
    seen = {event["id"] for event in delivered}
    rest = [event_id for event_id in erp_ids if event_id not in seen]
    for chunk_start in range(0, len(rest), MAX_LOOKUP_IDS):
        chunk = rest[chunk_start : chunk_start + MAX_LOOKUP_IDS]
        known = await reader.lookup(chunk)
        result.unknown_to_plant.extend(
            event_id for event_id in chunk if (known.get(event_id) or {}).get("delivered") is None
        )
    return result


def window_json(rows: Sequence[Any], entries: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a window as the API lists them: id, type, subject, time, delivered, outcome, state."""
    events: list[dict[str, Any]] = []
    for event_id, type_, delivered, outcome in rows:
        entry = entries.get(event_id)
        events.append(
            {
                "id": event_id,
                "type": type_,
                "subject": entry.subject if entry is not None else None,
                "time": entry.source_time if entry is not None else None,
                "delivered": delivered,
                "outcome": outcome,
                "state": event_state(entry) if entry is not None else ("delivered" if delivered else "pending"),
            }
        )
    return events


class BufferJournal:
    """``JournalReader`` on an open ``Buffer`` (the agent's own, or a stopped agent's file read-only)."""

    def __init__(self, buffer: Any):
        self.buffer = buffer

    async def window(self, start: float, end: float, type_: str | None) -> list[dict[str, Any]]:
        rows = await self.buffer.journal_window(start, end, type_)
        return [{"id": i, "type": t, "delivered": d, "outcome": o} for i, t, d, o in rows]

    async def lookup(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        entries = await self.buffer.journal_entries(list(ids))
        return {
            event_id: {"type": e.type, "delivered": e.delivered, "outcome": e.outcome, "state": event_state(e)}
            for event_id, e in entries.items()
        }


# --- the agent's part -----------------------------------------------------------------------------------


class Lineage:
    """Outcomes reported by the middleware, the trace of events, and the reconciliation of what was delivered."""

    def __init__(self, agent: Agent):
        self.agent = agent
        settings = agent.settings
        self.enabled: bool = settings.journal.enabled
        self.interval: float = float(settings.journal.summary_interval)
        self.access = OperatorAccess.from_settings(settings)
        self._outcomes: dict[str, Any] = {}  # full type -> OutcomeCounts, refreshed by run and scrapes
        self._journal_stats: dict[str, Any] = {}
        self.reports: Counter[str] = Counter()
        """Outcome reports received since start, by result (recorded, unchanged, unknown, invalid)."""
        self.summaries_sent = 0
        self.last_window_end: float | None = None
        self._lock = asyncio.Lock()  # one outcome batch at a time: a repeated rejection is seen as such

    # --- routes ---------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """HTTP routes this part adds to the agent's server."""
        return [
            Route("/v1/trace", self._guarded(self._trace), methods=["GET"]),
            Route("/v1/trace/{key:path}", self._guarded(self._trace), methods=["GET"]),
            Route("/v1/outcomes", self._guarded(self._post_outcomes), methods=["POST"]),
            Route("/v1/reconciliation", self._guarded(self._reconciliation), methods=["GET"]),
            Route("/v1/reconciliation/lookup", self._guarded(self._lookup), methods=["POST"]),
            Route("/v1/reconciliation/resend", self._guarded(self._resend, "change"), methods=["POST"]),
        ]

    def _guarded(self, handler: Any, action: Literal["read", "change"] = "read") -> Any:
        """``handler`` behind the buffer admin's access rules: a resend is a change (the admin token when
        one is configured); reading, and the middleware's outcomes, take the ingest or the admin token."""

        async def guarded(request: Request) -> Response:
            refused = self.access.check(request, action)
            if refused is not None:
                return json_response({"error": refused}, status=403)
            if not self.enabled:
                return json_response({"error": "the delivery journal is off ([journal] enabled = false)"}, 503)
            response: Response = await handler(request)
            return response

        return guarded

    async def _trace(self, request: Request) -> Response:
        key = request.path_params.get("key")
        field_name: str | None = None
        if not key:
            query = request.query_params
            field_name = next((name for name in ("id", "work_order", "lot") if query.get(name)), None)
            key = query.get(field_name) if field_name is not None else None
        if not key:
            return json_response({"error": "say what to trace: /v1/trace/{key}, ?work_order= or ?lot="}, 400)
        entries = await self.agent.buffer.trace(key)
        if field_name is not None:  # named explicitly: only the entries where that field is the key
            entries = [entry for entry in entries if getattr(entry, field_name) == key]
        if not entries:
            return json_response({"error": f"nothing known of {key!r} (never seen, or trimmed)", "key": key}, 404)
        return json_response({"key": key, "entries": msgspec.to_builtins(entries)})

    async def _post_outcomes(self, request: Request) -> Response:
        try:
            items = parse_outcomes(await request.body())
        except OutcomeError as exc:
            self.reports["invalid"] += 1
            self.agent.metrics.outcome_reports({"invalid": 1})
            return json_response({"error": str(exc)}, 400)
        results = await self.record_outcomes(items)
        recorded = sum(1 for r in results if r["result"] == "recorded")
        unknown = [r["id"] for r in results if r["result"] == "unknown"]
        unchanged = sum(1 for r in results if r["result"] == "unchanged")
        return json_response({"recorded": recorded, "unchanged": unchanged, "unknown": unknown, "results": results})

    async def _reconciliation(self, request: Request) -> Response:
        query = request.query_params
        try:
            end = parse_time(query["to"]) if query.get("to") else time.time()
            span = self.interval if self.interval > 0 else 3600.0
            start = parse_time(query["from"]) if query.get("from") else end - span
        except ValueError as exc:
            return json_response({"error": f"from/to: {exc}"}, 400)
        if end < start:
            return json_response({"error": "from is after to"}, 400)
        type_ = canonical_type(query.get("type"))
        by = query.get("by", "delivered")
        if by not in ("delivered", "committed"):
            return json_response({"error": "by: delivered (first acknowledgement) or committed"}, 400)
        rows = await self.agent.buffer.journal_window(start, end, type_, by=by)
        entries: dict[str, Any] = {}
        ids = [row[0] for row in rows]
        # brief=1 (plantgate reconcile): ids, types, delivery times and outcomes only, no per-entry read.
        for chunk_start in range(0, 0 if query.get("brief") else len(ids), 1000):
            entries.update(await self.agent.buffer.journal_entries(ids[chunk_start : chunk_start + 1000]))
        return json_response(
            {
                "from": iso(start),
                "to": iso(end),
                "type": type_,
                "by": by,
                "count": len(rows),
                "digest": digest(ids),
                "events": window_json(rows, entries),
            }
        )

    async def _ids_of(self, request: Request) -> list[str] | Response:
        try:
            body = msgspec.json.decode(await request.body())
        except msgspec.DecodeError as exc:
            return json_response({"error": f"not JSON: {exc}"}, 400)
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            return json_response({"error": 'expected {"ids": ["<event id>", ...]}'}, 400)
        if len(ids) > MAX_LOOKUP_IDS:
            return json_response({"error": f"{len(ids)} ids in one request; at most {MAX_LOOKUP_IDS}"}, 400)
        return ids

    async def _lookup(self, request: Request) -> Response:
        ids = await self._ids_of(request)
        if isinstance(ids, Response):
            return ids
        return json_response({"known": await BufferJournal(self.agent.buffer).lookup(ids)})

    async def _resend(self, request: Request) -> Response:
        ids = await self._ids_of(request)
        if isinstance(ids, Response):
            return ids
        resent, failed = await resend(self.agent.buffer, ids)
        remote = request.client.host if request.client is not None else None
        log.warning(
            "Events resent for reconciliation", extra={"count": len(resent), "failed": len(failed), "remote": remote}
        )
        return json_response({"resent": resent, "failed": failed})

    # --- outcomes -------------------------------------------------------------------------------------

    async def record_outcomes(self, items: Sequence[OutcomeItem]) -> list[dict[str, Any]]:
        """Record what the ERP did; a rejection makes a business dead letter (once per rejection).

        Per item: ``recorded`` (new or changed), ``unchanged`` (the same report again),
        ``unknown`` (no journal entry: never seen, or trimmed). Returns when durable.
        """
        buffer = self.agent.buffer
        async with self._lock:
            entries = await buffer.journal_entries(list(dict.fromkeys(item.id for item in items)))
            now = time.time()
            reports: list[OutcomeReport] = []
            dead: list[DeadLetter] = []
            dead_ids: set[str] = set()
            results: list[dict[str, Any]] = []
            latest: dict[str, tuple[str, str | None, str | None]] = {}
            for item in items:
                entry = entries.get(item.id)
                if entry is None:
                    results.append({"id": item.id, "result": "unknown", "detail": "no such event in the journal"})
                    continue
                current = latest.get(item.id, _current_outcome(entry))
                new = (item.outcome, item.reference, item.reason if item.outcome == "rejected" else None)
                if _same_outcome(current, new):
                    results.append({"id": item.id, "result": "unchanged"})
                    continue
                latest[item.id] = new
                reports.append(OutcomeReport(item.id, item.outcome, item.reference, new[2], now))
                result: dict[str, Any] = {"id": item.id, "result": "recorded"}
                if item.outcome == "rejected" and not _is_dead_letter(entry) and item.id not in dead_ids:
                    body = await buffer.journal_body(item.id)
                    if body is None:
                        result["detail"] = "the event's body is no longer kept: not a dead letter"
                    else:
                        dead.append(self._business_dead_letter(entry, item, body, now))
                        dead_ids.add(item.id)
                        result["detail"] = "dead letter"
                results.append(result)
            futures = []
            if dead:
                futures.append(buffer.append([], dead_letters=dead))
            if reports:
                futures.append(buffer.record_outcomes(reports))
            for future in futures:
                await future
        for r in results:
            self.reports[r["result"]] += 1
        self.agent.metrics.outcome_reports(Counter(r["result"] for r in results))
        if dead:
            self.agent.metrics.dead_lettered(ERP_SINK, "rejected", len(dead))
            for letter in dead:
                log.warning(
                    "Event rejected by the ERP: a business dead letter",
                    extra={"event_id": letter.id, "type": letter.type, "subject": letter.subject,
                           "reason": letter.reason},
                )
        if reports:
            await self._refresh_outcomes()
        return results

    def _business_dead_letter(self, entry: JournalEntry, item: OutcomeItem, body: bytes, now: float) -> DeadLetter:
        delivered_by = sorted({s.sink for s in entry.steps if s.step == "acked" and s.sink})
        return DeadLetter(
            id=entry.id,
            sink=ERP_SINK,
            reason=REJECTED_PREFIX + (item.reason or "").strip(),
            type=entry.type,
            subject=entry.subject,
            lane="operational" if entry.lane == "operational" else "transaction",  # the journal keeps no telemetry
            time=now,
            body=body,
            context={
                "outcome": "rejected",
                "reference": item.reference,
                "reported_at": now,
                "delivered_by": delivered_by,
                **({"trigger": entry.trigger} if entry.trigger else {}),
            },
        )

    async def _refresh_outcomes(self) -> None:
        buffer = self.agent.buffer
        if not self.enabled or not buffer.is_open:
            return
        # The ERP confirms postings: operational events (machine states, the agent's own) would read
        # "unconfirmed" forever, so only transaction types are shown.
        summary = await buffer.outcome_summary()
        self._outcomes = {type_: counts for type_, counts in summary.items() if type_ in TRANSACTION_TYPE_NAMES}
        self._journal_stats = dict(buffer.journal_stats())

    # --- reconciliation summaries ---------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh the outcome figures; sum up every ``[journal] summary_interval`` window, until cancelled."""
        if not self.enabled:
            await asyncio.Event().wait()
        await self._refresh_outcomes()
        if self.interval <= 0:
            while True:
                await asyncio.sleep(STATUS_REFRESH_SECONDS)
                await self._refresh_outcomes()
        await self._start_windows()
        while True:
            assert self.last_window_end is not None
            due = self.last_window_end + self.interval + SUMMARY_GRACE_SECONDS
            while (wait := due - time.time()) > 0:
                await asyncio.sleep(min(wait, STATUS_REFRESH_SECONDS))
                await self._refresh_outcomes()
            await self._summarise_due()

    async def _start_windows(self) -> None:
        stored = await self.agent.buffer.load_state(SUMMARY_STATE_KEY)
        current = math.floor(time.time() / self.interval) * self.interval
        if stored is None:
            # First start with the journal: summing up starts with the window now open.
            self.last_window_end = current
            await self._save_window_end(current, [])
            return
        last = float(stored)
        if last > current or abs(round(last / self.interval) * self.interval - last) > 1e-6:
            last = current - self.interval  # the interval changed, or the clock went back: start afresh
        missed = round((current - last) / self.interval)
        if missed > MAX_MISSED_WINDOWS:
            skipped_to = current - MAX_MISSED_WINDOWS * self.interval
            log.warning(
                "Reconciliation windows missed while the agent was down; only the latest are summed up",
                extra={"missed": missed, "summed_up": MAX_MISSED_WINDOWS, "skipped_from": iso(last),
                       "skipped_to": iso(skipped_to)},
            )
            last = skipped_to
        self.last_window_end = last
        await self._summarise_due()

    async def _summarise_due(self) -> None:
        """Sum up every window that ended since the last one summed up."""
        assert self.last_window_end is not None
        await self.agent.buffer.commit_now()  # acknowledgements of the window's last moments are in
        now = time.time()
        while self.last_window_end + self.interval <= now:
            start = self.last_window_end
            end = start + self.interval
            events = await self.summary_events(start, end)
            await self._save_window_end(end, events)
            self.last_window_end = end
            self.summaries_sent += len(events)
            self.agent.metrics.reconciliation_summaries(len(events))

    async def summary_events(self, start: float, end: float) -> list[Any]:
        """The ``io.plantgate.reconciliation.summary`` of ``[start, end)``: per transaction type delivered in it."""
        from agent.pipeline import AGENT_SOURCE

        agent = self.agent
        rows = await agent.buffer.journal_window(start, end)
        by_type: dict[str, list[tuple[str, str | None]]] = {}
        for event_id, type_, _delivered, outcome in rows:
            if type_ in TRANSACTION_TYPE_NAMES:
                by_type.setdefault(type_.removeprefix(TYPE_PREFIX), []).append((event_id, outcome))
        types = {
            name: ReconciliationCounts(
                delivered=len(delivered),
                digest=digest(event_id for event_id, _ in delivered),
                confirmed=sum(1 for _, outcome in delivered if outcome == "posted"),
                rejected=sum(1 for _, outcome in delivered if outcome == "rejected"),
            )
            for name, delivered in sorted(by_type.items())
        }
        uri = agent.rules.source_uri(AGENT_SOURCE)
        settings = agent.settings.agent
        window_end = datetime.fromtimestamp(end, UTC)
        summary = make_event(
            "reconciliation.summary",
            id=stable_id(uri, "reconciliation.summary", iso(end)),
            source=uri,
            time=window_end,
            site=settings.site,
            subject=settings.id,
            data=ReconciliationSummary(from_=datetime.fromtimestamp(start, UTC), to=window_end, types=types),
        )
        return [summary]

    async def _save_window_end(self, end: float, events: list[Any]) -> None:
        """The summary and the window's end in one commit: a restart neither repeats nor skips one."""
        from agent.pipeline import AGENT_SOURCE
        from agent.rules import RuleOutput

        future = self.agent.accept(AGENT_SOURCE, RuleOutput(events=events, state={SUMMARY_STATE_KEY: repr(end)}))
        if future is not None:
            await future
        if any(e.data.types for e in events):
            log.info(
                "Reconciliation summary",
                extra={
                    "window_end": iso(end),
                    "types": {name: c.delivered for e in events for name, c in e.data.types.items()},
                },
            )

    # --- status and metrics ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """The ``lineage`` section of ``/status`` (None: left out)."""
        now = time.time()
        outcomes = {
            type_: {
                "unconfirmed": counts.unconfirmed,
                "confirmed": counts.confirmed,
                "rejected": counts.rejected,
                "oldest_unconfirmed_age_seconds": (
                    None if counts.oldest_unconfirmed is None else round(max(0.0, now - counts.oldest_unconfirmed), 3)
                ),
            }
            for type_, counts in sorted(self._outcomes.items())
        }
        return {
            "journal": {"enabled": self.enabled, **self._journal_stats},
            "outcomes": outcomes,
            "outcome_reports": dict(self.reports),
            "reconciliation": {
                "interval_seconds": self.interval,
                "last_window_end": None if self.last_window_end is None else iso(self.last_window_end),
                "summaries_sent": self.summaries_sent,
            },
        }

    async def refresh_metrics(self) -> None:
        """Fresh gauges before a ``/metrics`` scrape."""
        await self._refresh_outcomes()
        now = time.time()
        self.agent.metrics.set_outcomes(
            {
                type_.removeprefix(TYPE_PREFIX): (
                    counts.unconfirmed,
                    counts.confirmed,
                    counts.rejected,
                    0.0 if counts.oldest_unconfirmed is None else max(0.0, now - counts.oldest_unconfirmed),
                )
                for type_, counts in self._outcomes.items()
            }
        )


def _current_outcome(entry: Any) -> tuple[str | None, str | None, str | None]:
    """The entry's outcome, reference and reason; all None when it was replayed since (a report is new again)."""
    for step in reversed(entry.steps):
        if step.step == "replayed":
            return (None, None, None)
        if step.step in ("posted", "rejected"):
            break
    return (entry.outcome, entry.reference, entry.reason)


def _same_outcome(current: tuple[str | None, str | None, str | None], new: tuple[str, str | None, str | None]) -> bool:
    """Whether a report says nothing new: the same outcome, reason, and reference (when it gives one)."""
    outcome, reference, reason = current
    return (
        outcome == new[0]
        and (new[1] is None or new[1] == reference)
        and (new[0] != "rejected" or new[2] == reason)
    )


def _is_dead_letter(entry: Any) -> bool:
    """Whether the entry's latest dead-letter step has not been replayed since (it is a dead letter now)."""
    for step in reversed(entry.steps):
        if step.step == "replayed":
            return False
        if step.step == "dead_letter" and step.sink == ERP_SINK:
            return True
    return False


async def resend(buffer: Any, ids: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Send these events again under their ids, from the journal's bodies, to every sink of their lane.

    Returns the ids resent and ``{"id", "reason"}`` for those that cannot be (unknown, no body kept).
    """
    resent: list[str] = []
    failed: list[dict[str, str]] = []
    events: list[tuple[None, dict[str, Any]]] = []
    for event_id in dict.fromkeys(ids):
        body = await buffer.journal_body(event_id)
        if body is None:
            failed.append({"id": event_id, "reason": "no body in the journal (never seen, or trimmed)"})
            continue
        event = msgspec.json.decode(body)
        if not isinstance(event, dict):
            failed.append({"id": event_id, "reason": "the journal's body is not a CloudEvent"})
            continue
        event.pop("sequence", None)
        events.append((None, {**event, "id": event_id}))
        resent.append(event_id)
    if events:
        await buffer.requeue(events)
    return resent, failed
