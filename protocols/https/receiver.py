"""A small local receiver of CloudEvents batches, for ``plantgate demo``: the other end of an HTTPS sink.

It accepts ``POST /v1/events`` with ``application/cloudevents-batch+json`` (a JSON
array of structured-mode CloudEvents), counts the events and batches (per type
too) and answers 200; anything else is 400 (not an array of objects with an
``id``) or 415 (another content type). It speaks plain http on loopback: TLS for
the demo would need a certificate made by a development-only package, and the
demo's point is the pipeline, not the certificate. ``plantgate check`` warns about
the resulting ``http://`` sink url.

With ``middleware=True`` it plays the integration middleware in front of an ERP,
the way the delivery journal expects one:

- every accepted event gets a reference, ``ERP-<n>``, in the answer:
  ``{"accepted": n, "references": {event id: "ERP-<n>"}}`` (the same id sent again
  gets the same reference);
- shortly after, what the ERP did with each transaction event (the
  ``transaction`` lane's types) goes back to the agent in one
  ``POST <agent_url>/v1/outcomes`` (bearer ``token``): ``posted`` with the ERP's
  document ``DOC-<n>`` for most, ``rejected`` with ``"posting period closed"`` for
  every ``reject_every``-th ``production.completed``. An event rejected once is
  posted when it comes again (the period was reopened: a replay succeeds).
  An agent without that endpoint (404) is counted in ``outcomes_not_supported``
  and not asked again for those reports, nor is one that refuses the request (other
  4xx: ``outcomes_unknown``); an agent that does not answer, answers 5xx, 401, 403,
  408 or 429 is retried every ``retry_interval`` seconds, holding at most
  ``max_pending`` reports.

Served by uvicorn (h11) from the caller's event loop, the way the agent's own HTTP
server runs: the socket is bound first (port 0: the kernel picks one), uvicorn's
``startup``/``main_loop``/``shutdown`` are used and no signal handler is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter, deque
from typing import Any

import httpx
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.events import TRANSACTION_TYPES, TYPE_PREFIX

__all__ = ["DemoReceiver", "ErpDecision"]

PATH = "/v1/events"
OUTCOMES_PATH = "/v1/outcomes"
REJECTION_REASON = "posting period closed"

log = logging.getLogger(__name__)

_TRANSACTION_TYPES = frozenset(TYPE_PREFIX + name for name in TRANSACTION_TYPES)
_PRODUCTION_COMPLETED = TYPE_PREFIX + "production.completed"
_TRY_AGAIN = frozenset({401, 403, 408, 429})  # a token not yet in place, a busy agent: worth another try
_REMEMBERED = 50_000  # ids whose reference and decision are kept, so a redelivery is answered the same


class _Event(msgspec.Struct):
    id: str
    type: str = ""
    subject: str | None = None
    data: Any = None


_decoder = msgspec.json.Decoder(list[_Event])


class ErpDecision(msgspec.Struct):
    """What the simulated ERP did with one transaction event."""

    id: str
    type: str
    work_order: str | None
    outcome: str
    """``posted`` or ``rejected``."""
    reference: str | None
    reason: str | None


class DemoReceiver:
    """Counts the CloudEvents batches it is sent; ``await start()`` / ``await stop()`` from one event loop.

    See the module docstring for ``middleware`` and the keyword arguments that go with it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        middleware: bool = False,
        agent_url: str | None = None,
        token: str | None = None,
        reject_every: int = 20,
        outcome_delay: float = 0.5,
        retry_interval: float = 2.0,
        max_pending: int = 10_000,
    ) -> None:
        if reject_every < 1:
            raise ValueError("reject_every must be at least 1")
        self.host = host
        self.port = port
        self.middleware = middleware
        self.agent_url = agent_url
        """``http://host:port`` of the agent that outcomes are reported to (may be set after ``start()``)."""
        self.token = token
        self.reject_every = reject_every
        self.outcome_delay = outcome_delay
        self.retry_interval = retry_interval
        self.events = 0
        """Events accepted since start."""
        self.batches = 0
        """Requests accepted since start."""
        self.by_type: Counter[str] = Counter()
        """Accepted events per CloudEvents type."""
        self.last_ids: list[str] = []
        """Ids of the last accepted batch."""
        self.posted = 0
        """Transaction events the simulated ERP posted."""
        self.rejected = 0
        """Transaction events the simulated ERP rejected."""
        self.outcomes_recorded = 0
        """Reports the agent answered for (``recorded`` or ``unchanged``)."""
        self.outcomes_unknown = 0
        """Reports the agent answered ``unknown`` or ``invalid`` for, or refused as a request (400, 413, ...)."""
        self.outcomes_not_supported = 0
        """Reports dropped because the agent has no ``/v1/outcomes`` (404)."""
        self.outcomes_failed = 0
        """Attempts to report that got no usable answer (not reachable, 5xx, 401, ...); they are retried."""
        self.outcomes_dropped = 0
        """Reports dropped because more than ``max_pending`` waited."""
        self.decisions: deque[ErpDecision] = deque(maxlen=200)
        """The latest decisions, newest last."""
        self._references: dict[str, tuple[str, str | None]] = {}  # id -> (reference, outcome)
        self._sequence = 0
        self._productions = 0
        self._pending: deque[dict[str, Any]] = deque()
        self._max_pending = max_pending
        self._wake = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        """Where to point a sink: ``http://host:port/v1/events``."""
        return f"http://{self.host}:{self.port}{PATH}"

    @property
    def pending_outcomes(self) -> int:
        """Reports waiting to be sent to the agent."""
        return len(self._pending)

    async def _receive(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"allow": "POST, OPTIONS"})
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/cloudevents-batch+json":
            return JSONResponse({"error": "expected application/cloudevents-batch+json"}, status_code=415)
        try:
            batch = _decoder.decode(await request.body())
        except msgspec.DecodeError as exc:
            return JSONResponse({"error": f"not a JSON array of CloudEvents: {exc}"}, status_code=400)
        self.events += len(batch)
        self.batches += 1
        self.by_type.update(event.type for event in batch)
        self.last_ids = [event.id for event in batch]
        if not self.middleware:
            return JSONResponse({"accepted": len(batch)})
        references = {event.id: self._decide(event) for event in batch}
        if self._pending:
            self._wake.set()
        return JSONResponse({"accepted": len(batch), "references": references})

    def _decide(self, event: _Event) -> str:
        """The event's reference; for a transaction, the ERP's decision too, queued for the agent."""
        known = self._references.get(event.id)
        outcome: str | None
        if known is not None and known[1] != "rejected":
            reference, outcome = known
            if outcome is not None:  # the agent may have missed the first report: say it again
                self._queue(event, reference, outcome)
            return reference
        if known is not None:
            reference = known[0]  # sent again after a rejection: the period is open now
            outcome = "posted"
        else:
            self._sequence += 1
            reference = f"ERP-{self._sequence}"
            outcome = None
            if event.type in _TRANSACTION_TYPES:
                outcome = "posted"
                if event.type == _PRODUCTION_COMPLETED:
                    self._productions += 1
                    if self._productions % self.reject_every == 0:
                        outcome = "rejected"
        if len(self._references) >= _REMEMBERED:
            self._references.pop(next(iter(self._references)))
        self._references[event.id] = (reference, outcome)
        if outcome is not None:
            if outcome == "posted":
                self.posted += 1
            else:
                self.rejected += 1
            self.decisions.append(
                ErpDecision(
                    id=event.id,
                    type=event.type,
                    work_order=_work_order(event),
                    outcome=outcome,
                    reference=_document(reference) if outcome == "posted" else None,
                    reason=REJECTION_REASON if outcome == "rejected" else None,
                )
            )
            self._queue(event, reference, outcome)
        return reference

    def _queue(self, event: _Event, reference: str, outcome: str) -> None:
        report: dict[str, Any] = {"id": event.id, "outcome": outcome}
        if outcome == "posted":
            report["reference"] = _document(reference)
        else:
            report["reason"] = REJECTION_REASON
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.outcomes_dropped += 1
        self._pending.append(report)

    async def _report_outcomes(self) -> None:
        """Send the queued reports to the agent, a batch at a time, until cancelled."""
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                await self._wake.wait()
                self._wake.clear()
                # The ERP posts a moment after the middleware accepted: the agent has
                # recorded the delivery by then.
                await asyncio.sleep(self.outcome_delay)
                while self._pending:
                    if not await self._send(client):
                        await asyncio.sleep(self.retry_interval)
                        if not self._pending:
                            break

    async def _send(self, client: httpx.AsyncClient) -> bool:
        """One POST of everything pending; False when it should be tried again later."""
        if self.agent_url is None or not self._pending:
            return not self._pending
        reports = list(self._pending)
        self._pending.clear()
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = await client.post(self.agent_url.rstrip("/") + OUTCOMES_PATH, json=reports, headers=headers)
        except httpx.HTTPError as exc:
            self.outcomes_failed += 1
            self._put_back(reports)
            log.debug("Outcomes not delivered to the agent", extra={"error": str(exc), "reports": len(reports)})
            return False
        if response.status_code == 404:
            # An agent without outcome reporting: nothing to retry.
            self.outcomes_not_supported += len(reports)
            return True
        if 400 <= response.status_code < 500 and response.status_code not in _TRY_AGAIN:
            # The agent refused the request itself: sending it again changes nothing.
            self.outcomes_unknown += len(reports)
            log.warning(
                "Outcomes refused by the agent",
                extra={"status": response.status_code, "body": response.text[:200], "reports": len(reports)},
            )
            return True
        if response.status_code != 200:
            self.outcomes_failed += 1
            self._put_back(reports)
            log.debug(
                "Outcomes refused by the agent",
                extra={"status": response.status_code, "body": response.text[:200], "reports": len(reports)},
            )
            return False
        try:
            results = response.json().get("results", [])
        except (ValueError, AttributeError):
            results = []
        for result in results:
            if isinstance(result, dict) and result.get("result") in ("recorded", "unchanged"):
                self.outcomes_recorded += 1
            else:
                self.outcomes_unknown += 1
        return True

    def _put_back(self, reports: list[dict[str, Any]]) -> None:
        """Reports that were not delivered go back in front of any newer ones, within ``max_pending``."""
        self._pending.extendleft(reversed(reports))
        while len(self._pending) > self._max_pending:
            self._pending.popleft()
            self.outcomes_dropped += 1

    async def start(self) -> None:
        """Bind and serve; returns once connections are accepted."""
        if self._server is not None:
            raise RuntimeError("the receiver is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        app = Starlette(routes=[Route(PATH, self._receive, methods=["POST", "OPTIONS"])])
        config = uvicorn.Config(
            app,
            http="h11",
            ws="none",
            lifespan="off",
            loop="none",
            log_config=None,
            log_level=logging.WARNING,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server, self._sock = server, sock
        self._ticker = asyncio.create_task(server.main_loop(), name="demo-receiver")
        if self.middleware:
            self._reporter = asyncio.create_task(self._report_outcomes(), name="demo-receiver-outcomes")

    async def flush_outcomes(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 - a bound for the last reports
        """Stop reporting in the background and send what is pending now, for at most ``timeout`` seconds.

        For the end of a demo, while the agent still runs.
        """
        await self._stop_reporting()
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=timeout) as client:
            while self._pending and time.monotonic() < deadline:
                if not await self._send(client):
                    return

    async def _stop_reporting(self) -> None:
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

    async def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        await self._stop_reporting()
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        try:
            await server.shutdown(sockets=[self._sock] if self._sock else None)
            if self._ticker is not None:
                await self._ticker
        finally:
            if self._sock is not None:
                self._sock.close()
            self._sock, self._ticker = None, None


def _document(reference: str) -> str:
    """The ERP's document for a middleware reference: ``ERP-17`` -> ``DOC-17``."""
    return "DOC-" + reference.removeprefix("ERP-")


def _work_order(event: _Event) -> str | None:
    if isinstance(event.data, dict):
        work_order = event.data.get("work_order")
        if isinstance(work_order, str | int):
            return str(work_order)
    return event.subject
