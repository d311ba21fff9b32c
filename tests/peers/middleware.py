"""A real HTTPS middleware in front of a pretend ERP, on loopback: it answers with references and reports outcomes.

``Middleware`` serves ``POST /events`` (the HTTPS sink's url) with hypercorn over TLS
(a trustme CA from ``tests.peers.https_server.Certificates``) on its own thread and
event loop. For every batch it:

- answers 200 with ``{"references": {event id: "MW-<n>"}}`` (the same id sent again
  gets the same reference), the contract the agent's HTTPS sink reads;
- keeps every event (``received``), and the reconciliation summaries apart
  (``summaries``);
- for each transaction event, decides what the ERP does, then reports it to the agent
  with ``POST {agent_url}/v1/outcomes`` (bearer ``token``), in one request per batch,
  after the answer:

  - the work order is in ``lose``: nothing (acknowledged, never recorded: the gap
    reconciliation must find);
  - the work order is in ``reject`` (work order -> reason): ``rejected`` with that reason;
  - otherwise ``posted`` with the ERP's document number ``49000<n>``, and the id goes
    into ``erp`` (what the ERP holds: id -> document).

  An outcome the agent does not take (it is down, being killed) is tried again every
  ``retry_interval`` until it is, or until ``stop()``.

``report_again(ids)`` sends the last outcome of these ids once more (a middleware that
repeats itself); ``outcome_answers`` keeps every answer the agent gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from typing import Any

import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.peers.https_server import HOST, Certificates, free_port

SUMMARY = "io.plantgate.reconciliation.summary"
TRANSACTION_PREFIXES = (
    "io.plantgate.workorder.", "io.plantgate.material.", "io.plantgate.goods.", "io.plantgate.production.",
    "io.plantgate.scrap.", "io.plantgate.quality.", "io.plantgate.inventory.", "io.plantgate.shipment.",
)  # fmt: skip


class Middleware:
    """The middleware (see the module docstring); ``start()``/``stop()`` are synchronous."""

    def __init__(self, certs: Certificates, *, token: str | None = None, retry_interval: float = 0.2) -> None:
        self.certs = certs
        self.token = token
        self.retry_interval = retry_interval
        self.port = free_port()
        self.agent_url: str | None = None
        """Where the agent listens (``http://127.0.0.1:<port>``); outcomes wait until it is set."""
        self.reject: dict[str, str] = {}
        self.lose: set[str] = set()
        self._lock = threading.Lock()
        self.received: list[dict[str, Any]] = []
        self.summaries: list[dict[str, Any]] = []
        self.references: dict[str, str] = {}
        self.erp: dict[str, str] = {}
        self.last_outcome: dict[str, dict[str, Any]] = {}
        self.outcome_answers: list[dict[str, Any]] = []
        self._queue: asyncio.Queue[list[dict[str, Any]]] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self.app = Starlette(routes=[Route("/events", self._events, methods=["POST"])])

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}/events"

    # --- what it saw ------------------------------------------------------------------------------

    def erp_ids(self) -> list[str]:
        with self._lock:
            return list(self.erp)

    def received_ids(self) -> list[str]:
        with self._lock:
            return [event["id"] for event in self.received]

    def summary_events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.summaries)

    def answers(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.outcome_answers)

    def accept_again(self, work_order: str) -> None:
        """The ERP's cause of rejection was fixed: this work order's events are posted from now on."""
        with self._lock:
            self.reject.pop(work_order, None)

    def report_again(self, ids: list[str]) -> None:
        """Send the last outcome of ``ids`` once more (from the middleware's thread)."""
        with self._lock:
            outcomes = [self.last_outcome[i] for i in ids]
        assert self._loop is not None and self._queue is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, outcomes)

    # --- the app ----------------------------------------------------------------------------------

    async def _events(self, request: Request) -> Response:
        try:
            events = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "not JSON"}, status_code=400)
        if not isinstance(events, list) or not all(isinstance(e, dict) and "id" in e for e in events):
            return JSONResponse({"error": "not a JSON array of events"}, status_code=400)
        references: dict[str, str] = {}
        outcomes: list[dict[str, Any]] = []
        with self._lock:
            for event in events:
                self.received.append(event)
                event_id = event["id"]
                reference = self.references.setdefault(event_id, f"MW-{len(self.references) + 1}")
                references[event_id] = reference
                if event.get("type") == SUMMARY:
                    self.summaries.append(event)
                if not str(event.get("type", "")).startswith(TRANSACTION_PREFIXES):
                    continue
                data = event.get("data") if isinstance(event.get("data"), dict) else {}
                work_order = data.get("work_order") or event.get("subject")
                if work_order in self.lose:
                    continue
                reason = self.reject.get(work_order)
                if reason is not None:
                    outcome = {"id": event_id, "outcome": "rejected", "reason": reason, "reference": reference}
                else:
                    document = self.erp.setdefault(event_id, f"49000{len(self.erp) + 1:05d}")
                    outcome = {"id": event_id, "outcome": "posted", "reference": document}
                self.last_outcome[event_id] = outcome
                outcomes.append(outcome)
        background = BackgroundTask(self._enqueue, outcomes) if outcomes else None
        return JSONResponse({"accepted": len(events), "references": references}, background=background)

    async def _enqueue(self, outcomes: list[dict[str, Any]]) -> None:
        assert self._queue is not None
        self._queue.put_nowait(outcomes)

    async def _report(self) -> None:
        """Post each batch of outcomes to the agent, again and again until it takes them."""
        assert self._queue is not None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                outcomes = await self._queue.get()
                while True:
                    if self.agent_url is not None:
                        try:
                            response = await client.post(
                                f"{self.agent_url}/v1/outcomes", json=outcomes, headers=headers
                            )
                        except httpx.HTTPError:
                            response = None
                        if response is not None and response.status_code < 500:
                            with self._lock:
                                self.outcome_answers.append({"status": response.status_code, **response.json()})
                            break
                    await asyncio.sleep(self.retry_interval)  # the agent is away: try again shortly

    # --- lifecycle --------------------------------------------------------------------------------

    def _config(self) -> Config:
        config = Config()
        config.bind = [f"{HOST}:{self.port}"]
        config.errorlog = None
        config.accesslog = None
        config.graceful_timeout = 0.5
        config.certfile = str(self.certs.server_cert)
        config.keyfile = str(self.certs.server_key)
        config.alpn_protocols = ["h2", "http/1.1"]
        return config

    def start(self) -> Middleware:
        """Serve until ``stop()``; returns once the port accepts connections."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            async def serving() -> None:
                self._loop = asyncio.get_running_loop()
                self._shutdown = asyncio.Event()
                self._queue = asyncio.Queue()
                reporter = asyncio.create_task(self._report())
                task = asyncio.create_task(serve(self.app, self._config(), shutdown_trigger=self._shutdown.wait))
                deadline = time.monotonic() + 10
                while not task.done() and not _accepts(self.port) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # hypercorn has no "listening" signal: poll the port, bounded
                ready.set()
                try:
                    await task
                finally:
                    reporter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reporter

            try:
                asyncio.run(serving())
            except BaseException as exc:
                failed.append(exc)
                ready.set()

        self._thread = threading.Thread(target=main, name=f"middleware-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failed:
            raise RuntimeError(f"middleware did not start on port {self.port}: {failed}")
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._shutdown is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._shutdown.set)
        thread.join(5.0)

    def __enter__(self) -> Middleware:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False
