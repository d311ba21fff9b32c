"""The site engineer's console: a page served by the agent at ``GET /``.

One HTML page with its script and style sheet (``agent/console/static/``, no build
step, nothing fetched from elsewhere) polls small JSON endpoints and ``/status``:

=================================  ==========================================================
``GET /``                          the page
``GET /console/{asset}``           its script and style sheet
``GET /v1/console/overview``       what ``/status`` lacks: config file, data dir, last value
                                   time per source, which actions this listen address allows
``GET /v1/console/tags``           every tag with its latest reading (any quality), the rules
                                   it feeds, and each rule's last event
``GET /v1/console/events``         the last events accepted into the buffer, per lane
``GET /v1/console/event?id=``      one of those as its whole CloudEvent
``GET /v1/console/search?key=``    the kept events whose id, subject, work order or lot is key
``GET /v1/console/dead-letters``   the dead letters (reason, sink, time, context)
``GET /v1/console/dead-letter?id=``  one dead letter with its CloudEvent
=================================  ==========================================================

Replay and purge go through the buffer admin API (``POST /v1/buffer/replay`` and
``/v1/buffer/purge``), the one the CLI uses, with its token rules
(``agent.buffer_api.OperatorAccess``). Reading needs no token on a loopback listen
address; beyond loopback it needs the admin or the ingest token, which the page asks
for when it is refused (kept in the browser's sessionStorage, sent as a bearer header).

Every console response carries a Content-Security-Policy allowing this origin only
and no inline script, so nothing rendered from event data can run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from agent import __version__
from agent.buffer_api import REFUSED_BEYOND_LOOPBACK, OperatorAccess
from agent.events import CloudEvent, Lane, decode_event, encode_event
from agent.http_server import Handler
from buffer import BufferError
from buffer.admin import BufferAdmin

if TYPE_CHECKING:
    from agent.pipeline import Agent

EVENTS_PER_LANE = 50
"""Events kept per lane for the Events page."""

DEAD_LETTERS_LISTED = 500
"""Dead letters listed at most (oldest first); the total is given beside them."""

LANES: tuple[Lane, ...] = ("transaction", "operational", "telemetry")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def console_routes(agent: Agent) -> list[BaseRoute]:
    """The console's page and the read-only JSON it polls."""
    return Console(agent).routes()


def _encode_json(value: Any) -> bytes:
    # A tag value may be of any type a protocol decodes (bytes, Decimal, ...): shown as text.
    return msgspec.json.encode(value, enc_hook=str)


def _respond(body: bytes, media_type: str, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type=media_type, headers=SECURITY_HEADERS)


def _json(value: Any, status: int = 200) -> Response:
    return _respond(_encode_json(value), "application/json", status)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """A tag value as JSON can carry it (anything else as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class EventSummary(msgspec.Struct):
    """One kept event as the Events page lists it."""

    id: str
    type: str
    subject: str | None
    time: str | None
    source: str
    sequence: str | None
    lane: str


def _summary(event: CloudEvent) -> EventSummary:
    return EventSummary(
        id=event.id,
        type=event.type,
        subject=event.subject,
        time=_iso(event.time),
        source=event.source,
        sequence=event.sequence,
        lane=event.lane,
    )


class RecentEvents:
    """The last ``per_lane`` events accepted into the buffer, per lane (an agent tap).

    Keeps the event objects (encoded only when one is asked for), so the tap costs
    one append per event on the delivery path.
    """

    def __init__(self, per_lane: int = EVENTS_PER_LANE):
        self._lanes: dict[str, deque[CloudEvent]] = {lane: deque(maxlen=per_lane) for lane in LANES}
        self.last_at: dict[str, float] = {}
        """CloudEvents ``source`` -> when an event of it was last accepted (Unix time)."""

    def __call__(self, events: Sequence[CloudEvent]) -> None:
        lanes = self._lanes
        for event in events:
            if event.sequence is not None:  # numbered by the buffer: not a duplicate it dropped
                lanes[event.lane].append(event)
        # A group comes from one inlet: its first and last event name its source(s).
        now = time.time()
        self.last_at[events[0].source] = now
        self.last_at[events[-1].source] = now

    def kept(self) -> Iterable[CloudEvent]:
        """Every kept event, newest first per lane."""
        for lane in LANES:
            yield from reversed(self._lanes[lane])

    def listing(self) -> dict[str, list[EventSummary]]:
        """Lane -> its kept events, newest first."""
        return {lane: [_summary(e) for e in reversed(self._lanes[lane])] for lane in LANES}

    def find(self, event_id: str) -> CloudEvent | None:
        """The kept event with this id (the newest, when replayed), or None."""
        return next((e for e in self.kept() if e.id == event_id), None)

    def matching(self, key: str) -> list[EventSummary]:
        """The kept events whose id, subject, work order or lot is ``key``."""
        found = []
        for event in self.kept():
            data = event.data if isinstance(event.data, Mapping) else {}
            if key in (event.id, event.subject, data.get("work_order"), data.get("lot")):
                found.append(_summary(event))
        return found


class Console:
    """The console of one agent: its routes, its event tap and what its endpoints compute."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.access = OperatorAccess.from_settings(agent.settings)
        self.recent = RecentEvents()
        self._attach()
        sinks = {sink.name: sink.lanes for sink in agent.sinks}
        self._admin = BufferAdmin(agent.buffer, sinks=sinks)  # listing only: replay goes through the admin API
        self._tag_owner = agent.settings.tag_owner()
        self._static = resources.files(__package__) / "static"
        self._dead_cache: tuple[int, float, list[dict[str, Any]]] | None = None

    def routes(self) -> list[BaseRoute]:
        """The page, its assets and the console's JSON endpoints."""
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/console/{asset}", self.asset, methods=["GET"]),
            Route("/v1/console/overview", self._reading(self.overview), methods=["GET"]),
            Route("/v1/console/tags", self._reading(self.tags), methods=["GET"]),
            Route("/v1/console/events", self._reading(self.events), methods=["GET"]),
            Route("/v1/console/event", self._reading(self.event), methods=["GET"]),
            Route("/v1/console/search", self._reading(self.search), methods=["GET"]),
            Route("/v1/console/dead-letters", self._reading(self.dead_letters), methods=["GET"]),
            Route("/v1/console/dead-letter", self._reading(self.dead_letter), methods=["GET"]),
        ]

    def _attach(self) -> None:
        """Tap the agent's accepted events, once its tap list exists.

        The agent may build its routes before its tap list; then the first console
        request attaches (events accepted before it are not shown).
        """
        taps = getattr(self.agent, "taps", None)
        if taps is not None and not any(tap is self.recent for tap in taps):
            taps.append(self.recent)

    # --- access ---------------------------------------------------------------------------------

    def _reading(self, handler: Handler) -> Handler:
        """``handler`` behind the read rule: open on a loopback listen address, else a token."""

        async def guarded(request: Request) -> Response:
            self._attach()
            if not self.access.loopback:
                try:
                    refused = self.access.check(request, "read")
                except HTTPException as exc:
                    return _json({"error": "unauthorized", "detail": exc.detail}, 401)
                if refused is not None:
                    return _json({"error": "forbidden", "detail": refused}, 403)
            return await handler(request)

        return guarded

    def actions(self) -> dict[str, Any]:
        """Whether this agent lets the console replay and purge, and with which token (never the token)."""
        token = self.access.change_token
        if token is not None:
            return {"offered": True, "token": token, "detail": f"replay and purge need the {token} token"}
        if self.access.loopback:
            return {"offered": True, "token": None, "detail": "open on this loopback listen address"}
        return {"offered": False, "token": None, "detail": REFUSED_BEYOND_LOOPBACK}

    # --- the page -------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        self._attach()
        return _respond((self._static / "index.html").read_bytes(), "text/html; charset=utf-8")

    async def asset(self, request: Request) -> Response:
        name = request.path_params["asset"]
        media_type = ASSETS.get(name)
        if media_type is None:
            return _json({"error": "not found"}, 404)
        return _respond((self._static / name).read_bytes(), media_type)

    # --- JSON -----------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        agent = self.agent
        settings = agent.settings
        config_path = agent.config_path  # known when the agent is told its file (plantgate run)
        latest = agent.rules.latest_readings()
        last_value: dict[str, datetime] = {}
        for tag, reading in latest.items():
            owner = self._tag_owner.get(tag)
            if owner is not None and (owner not in last_value or reading.time > last_value[owner]):
                last_value[owner] = reading.time
        sources = {}
        for source in agent.sources:
            uri = agent.rules.source_uri(source.name)
            sources[source.name] = {
                "kind": source.status.kind,
                "last_value_time": _iso(last_value.get(source.name)),
                "last_event_at": self.recent.last_at.get(uri),
            }
        return _json(
            {
                "version": __version__,
                "agent": settings.agent.id,
                "site": settings.agent.site,
                "config_path": None if config_path is None else str(config_path),
                "data_dir": str(settings.agent.data_dir),
                "listen": settings.http.listen,
                "sources": sources,
                "actions": self.actions(),
                "now": time.time(),
            }
        )

    async def tags(self, request: Request) -> Response:
        settings = self.agent.settings
        rules = self.agent.rules
        feeds: dict[str, list[dict[str, str]]] = {}
        listed_rules = []
        for rule in settings.transactions:
            if rule.when:
                feeds.setdefault(rule.when, []).append({"rule": rule.name, "as": "trigger"})
                trigger = f"tag {rule.when}"
            elif rule.when_event is not None:
                trigger = f"event {rule.when_event}" + (f" from {rule.when_source}" if rule.when_source else "")
            else:
                trigger = f"every {rule.every:g} s"
            reads = rule.read_tags()
            for tag, key in reads.items():
                feeds.setdefault(tag, []).append({"rule": rule.name, "as": key})
            if rule.ack is not None:
                feeds.setdefault(rule.ack, []).append({"rule": rule.name, "as": "ack"})
            last = rules.last_fired.get(rule.name)
            listed_rules.append(
                {
                    "name": rule.name,
                    "type": rule.type,
                    "trigger": trigger,
                    "reads": sorted(reads),
                    "last": None if last is None else last._asdict(),
                }
            )
        latest = rules.latest_readings()
        listed_tags = []
        for tag, config in settings.tag_configs().items():
            reading = latest.get(tag)
            listed_tags.append(
                {
                    "tag": tag,
                    "source": self._tag_owner.get(tag),
                    "kind": config.kind,
                    "value": None if reading is None else _plain(reading.value),
                    "quality": None if reading is None else reading.quality,
                    "time": None if reading is None else _iso(reading.time),
                    "feeds": feeds.get(tag, []),
                }
            )
        return _json({"tags": listed_tags, "rules": listed_rules})

    async def events(self, request: Request) -> Response:
        return _json({"per_lane": EVENTS_PER_LANE, "lanes": self.recent.listing()})

    async def event(self, request: Request) -> Response:
        event_id = request.query_params.get("id", "")
        event = self.recent.find(event_id)
        if event is None:
            return _json({"error": "not found", "detail": "this event is no longer kept by the console"}, 404)
        return _respond(encode_event(event), "application/json")

    async def search(self, request: Request) -> Response:
        key = request.query_params.get("key", "").strip()
        if not key:
            return _json({"error": "bad request", "detail": "say what to look for: ?key=ID or work order"}, 400)
        return _json({"key": key, "events": self.recent.matching(key)})

    async def _dead_letter_list(self) -> list[dict[str, Any]]:
        """Every dead letter as listed (read again when their count changed, or after 2 s)."""
        count = self.agent.buffer.dead_letter_count
        cached = self._dead_cache
        now = time.monotonic()
        if cached is not None and cached[0] == count and now - cached[1] < 2.0:
            return cached[2]
        entries: list[dict[str, Any]] = msgspec.to_builtins(await self._admin.dead_letters())
        self._dead_cache = (count, now, entries)
        return entries

    async def dead_letters(self, request: Request) -> Response:
        try:
            entries = await self._dead_letter_list()
        except BufferError as exc:
            return _json({"error": "service unavailable", "detail": str(exc)}, 503)
        reasons: dict[str, int] = {}
        for entry in entries:
            reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
        return _json(
            {
                "total": len(entries),
                "dead_letters": entries[:DEAD_LETTERS_LISTED],
                "reasons": reasons,
                "actions": self.actions(),
            }
        )

    async def dead_letter(self, request: Request) -> Response:
        wanted = request.query_params.get("id", "")
        try:
            letters = await self.agent.buffer.dead_letters()
        except BufferError as exc:
            return _json({"error": "service unavailable", "detail": str(exc)}, 503)
        for letter in letters:
            if letter.id == wanted:
                try:
                    event: Any = decode_event(letter.body)
                except msgspec.DecodeError:
                    event = letter.body.decode("utf-8", "replace")  # shown as text, escaped by the page
                return _json(
                    {
                        "id": letter.id,
                        "sink": letter.sink,
                        "reason": letter.reason,
                        "time": letter.time,
                        "context": letter.context,
                        "event": event,
                    }
                )
        return _json({"error": "not found", "detail": "no dead letter with this id"}, 404)

