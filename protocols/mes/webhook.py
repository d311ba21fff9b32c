"""The MES webhook: ``POST /v1/events`` (CloudEvents) and ``POST /v1/mes/<mapping>`` (the MES's own JSON).

Both routes live on the agent's HTTP server (its listen address, TLS and body
limit: 413 is answered there). Order of checks: bearer token (401), content type
(415), the buffer refusing writes (503 with ``Retry-After``, at once: the caller
is not held), the body (400 naming element index and field; nothing of a 400 is
stored), then the commit: 202 only once every event of the request is durable. An
id already accepted is acknowledged again (202) and stored once (the buffer drops
the repeat).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.events import CloudEvent
from agent.health import ComponentStatus
from agent.http_server import check_bearer, error_response, json_response
from agent.source import BufferUnavailable, SourceOutput
from protocols.mes import MesSourceConfig
from protocols.mes.ingest import MAX_DEPTH, FieldError, InvalidRequest, build_events, decode_events, depth_within
from protocols.mes.mapping import CompiledMapping, RecordError

log = logging.getLogger(__name__)

EVENT = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
NATIVE = "application/json"
LOG_INTERVAL = 10.0
"""Rejected requests are logged at most once per this many seconds (with the count in between)."""


class MesWebhookSource:
    """The MES posting to the agent: its routes, and a ``run`` that only reports the state."""

    kind = "mes"

    def __init__(self, config: MesSourceConfig, *, token: str, site: str, agent_id: str):
        if not token:
            raise ValueError("an empty ingest token would let every request through")
        self.config = config
        self.name = config.name
        self.status = ComponentStatus(name=config.name, kind=self.kind)
        self.status.info["mode"] = "webhook"
        self._token = token
        self._site = site
        self._retry_after = str(max(1, math.ceil(config.retry_after)))
        self._mappings = {
            name: CompiledMapping(name, mapping, source_name=config.name, site=site)
            for name, mapping in config.mappings.items()
        }
        self.accepted = 0
        """Events acknowledged with 202 since start (repeats of an accepted id included)."""
        self.rejected = 0
        """Requests answered 400 since start."""
        self._unlogged = 0
        self._logged_at = -LOG_INTERVAL

    def tags(self) -> Sequence[str]:
        """The MES sends events, not tag values."""
        return ()

    async def write(self, tag: str, value: Any) -> None:
        """Nothing to write to: the MES has no tags."""
        from agent.source import SourceError

        raise SourceError(f"{self.name}: the MES source has no tag {tag!r} to write")

    async def run(self, output: SourceOutput) -> None:
        """The routes do the work; this keeps the state for /status until cancelled."""
        self.status.set_state("connected")
        try:
            await asyncio.Event().wait()
        finally:
            self.status.set_state("stopped")

    def routes(self, output: SourceOutput) -> list[Route]:
        """``POST /v1/events`` and ``POST /v1/mes/{mapping}``, handing their events to ``output``."""

        async def events(request: Request) -> Response:
            check_bearer(request, self._token)
            media, charset = _content_type(request)
            if media not in (EVENT, BATCH) or charset not in (None, "utf-8"):
                return self._unsupported(request, f"{EVENT} (one event) or {BATCH} (a JSON array), UTF-8")
            refusing = self._refusing(output)
            if refusing is not None:
                return refusing
            body = await request.body()
            try:
                made = build_events(decode_events(body, batch=media == BATCH), site=self._site)
            except InvalidRequest as exc:
                return self._invalid(exc)
            return await self._commit(output, made)

        async def native(request: Request) -> Response:
            check_bearer(request, self._token)
            mapping = self._mappings.get(request.path_params["mapping"])
            if mapping is None:
                return error_response(404, f"no mapping {request.path_params['mapping']!r} in sources.mes.{self.name}")
            media, charset = _content_type(request)
            if media != NATIVE or charset not in (None, "utf-8"):
                return self._unsupported(request, f"{NATIVE}, UTF-8")
            refusing = self._refusing(output)
            if refusing is not None:
                return refusing
            body = await request.body()
            try:
                made = _native_events(mapping, body)
            except InvalidRequest as exc:
                return self._invalid(exc)
            return await self._commit(output, made)

        return [
            Route("/v1/events", events, methods=["POST"]),
            Route("/v1/mes/{mapping}", native, methods=["POST"]),
        ]

    # --- answers --------------------------------------------------------------------------------

    def _refusing(self, output: SourceOutput) -> Response | None:
        reason = output.refusing()
        if reason is None:
            return None
        return error_response(503, f"the buffer refuses writes: {reason}", {"Retry-After": self._retry_after})

    async def _commit(self, output: SourceOutput, events: list[CloudEvent]) -> Response:
        count = len(events)
        try:
            async with asyncio.timeout(self.config.commit_timeout):
                await output.events(events)
        except (BufferUnavailable, TimeoutError) as exc:
            # What was queued still commits once the buffer can; the caller's retry then gets its 202.
            reason = str(exc) or f"not committed within {self.config.commit_timeout:g}s"
            log.warning("MES events not committed; answered 503", extra={"source": self.name, "error": reason})
            return error_response(503, f"not committed: {reason}", {"Retry-After": self._retry_after})
        except Exception as exc:  # e.g. the buffer closing under a request at shutdown: not acknowledged
            log.error(
                "MES events not committed; answered 503",
                extra={"source": self.name, "error": f"{type(exc).__name__}: {exc}"},
                exc_info=exc,
            )
            return error_response(503, "not committed; try again", {"Retry-After": self._retry_after})
        self.accepted += count
        self.status.info["accepted_events"] = str(self.accepted)
        return json_response({"accepted": count}, 202)

    def _invalid(self, exc: InvalidRequest) -> Response:
        self.rejected += 1
        self.status.info["rejected_requests"] = str(self.rejected)
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL:
            first = exc.errors[0] if exc.errors else None
            log.warning(
                "MES request rejected (400); nothing of it stored",
                extra={
                    "source": self.name,
                    "error": exc.message,
                    "index": first.index if first else None,
                    "field": first.field if first else None,
                    "detail": first.message if first else None,
                    "rejected_since_last_log": self._unlogged,
                },
            )
            self._logged_at, self._unlogged = now, 0
        return json_response(exc.body(), 400)

    @staticmethod
    def _unsupported(request: Request, wanted: str) -> Response:
        sent = request.headers.get("content-type")
        detail = f"Content-Type {sent!r} is not accepted; send {wanted}" if sent else f"no Content-Type; send {wanted}"
        return error_response(415, detail)


def _content_type(request: Request) -> tuple[str, str | None]:
    """The media type (lower case) and the charset parameter (lower case) of the request, if any."""
    raw = request.headers.get("content-type", "")
    media, _, params = raw.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media.strip().lower(), charset


def _native_events(mapping: CompiledMapping, body: bytes) -> list[CloudEvent]:
    """Every record of a native body as an event, or ``InvalidRequest`` naming each record that does not fit."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if not depth_within(body):
        raise InvalidRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        records = mapping.records(decoded)
    except RecordError as exc:
        raise InvalidRequest("invalid records", [_field_error(None, exc)]) from None
    if not records:
        raise InvalidRequest("no records in the body")
    events, errors = mapping.events(records, received=datetime.now(UTC))
    if errors:
        raise InvalidRequest("invalid records", errors)
    return events


def _field_error(index: int | None, exc: RecordError) -> FieldError:
    return FieldError(index=index, field=exc.path, message=exc.message)
