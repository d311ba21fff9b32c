"""A demo MES: posts events to the agent's webhook and serves a pageable REST endpoint for poll mode.

``MesSimulator`` sends, over loopback with the ingest token, CloudEvents
(``material.consumed`` batches, ``workorder.released``) to ``POST /v1/events`` and
production confirmations in its own JSON shape to ``POST /v1/mes/confirmations``
(the native mapping in ``WEBHOOK_CONFIG``). With ``serve_rest=True`` it also serves
``GET /records?since=<id>`` (pages of ``page_size``, a ``next`` link, an ``ETag``)
that a ``mode = "poll"`` source reads (``POLL_CONFIG``)::

    simulator = MesSimulator(token=token, serve_rest=True)
    await simulator.start()
    simulator.agent_url = agent.http.url      # once the agent listens
    await simulator.run_demo(stop)            # until stop is set
    await simulator.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

HOST = "127.0.0.1"

WEBHOOK_CONFIG = """
[[sources.mes]]
name = "{name}"
mode = "webhook"

  [sources.mes.mappings.confirmations]
  type = "production.completed"
  items = "$.confirmations"
  id = "$.confirmationId"
  time = "$.postedAt"
  correlationid = "$.confirmationId"
  fields = {{ work_order = "$.order", item = "$.material", quantity = "$.qty" }}
  uom = "$.unit"
"""
"""The ``[[sources.mes]]`` entry (webhook) the simulator posts to; needs ``[http].ingest_token_file``."""

POLL_CONFIG = """
[[sources.mes]]
name = "{name}"
mode = "poll"
url = "{url}"
interval = "2s"
records = "$.records"
next = "$.next"
cursor_field = "$.id"
mapping = "receipts"

  [sources.mes.mappings.receipts]
  type = "goods.received"
  id = "$.receipt"
  time = "$.receivedAt"
  fields = {{ item = "$.material", lot = "$.batch", quantity = "$.qty" }}
  uom = "$.unit"
"""
"""The ``[[sources.mes]]`` entry (poll) reading the simulator's REST endpoint."""

_ITEMS = ("FILL-500", "RAW-7", "CAP-22", "P-100-OLD")


class MesSimulator:
    """A demo MES (see the module docstring)."""

    def __init__(
        self,
        *,
        token: str,
        agent_url: str | None = None,
        serve_rest: bool = False,
        page_size: int = 5,
        seed: int | None = None,
        host: str = HOST,
        port: int = 0,
    ):
        self.token = token
        self.agent_url = agent_url
        """``http://host:port`` of the agent's HTTP server; set it once the agent listens."""
        self.serve_rest = serve_rest
        self.page_size = page_size
        self.rng = random.Random(seed)
        self.records: list[dict[str, Any]] = []
        """What the REST endpoint serves, oldest first (``id`` 1, 2, ...)."""
        self.sent = 0
        """Events the agent acknowledged (202)."""
        self.refused = 0
        """Requests the agent did not acknowledge (any other answer, or no answer)."""
        self._work_order = 4700
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._client: httpx.AsyncClient | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        """The REST endpoint for ``POLL_CONFIG``'s ``url`` (after ``start()``)."""
        return f"http://{self._host}:{self._port}/records"

    def webhook_config(self, name: str = "mes") -> str:
        """The TOML ``[[sources.mes]]`` entry (webhook) for this simulator."""
        return WEBHOOK_CONFIG.format(name=name)

    def poll_config(self, name: str = "mes-rest") -> str:
        """The TOML ``[[sources.mes]]`` entry (poll) for this simulator's REST endpoint."""
        return POLL_CONFIG.format(name=name, url=self.rest_url)

    async def start(self) -> None:
        """Open the HTTP client; with ``serve_rest``, listen on ``host:port`` (port 0: a free one)."""
        self._client = httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {self.token}"})
        if not self.serve_rest:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        sock.listen(16)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/records", self._serve_records)])
        config = uvicorn.Config(app, loop="none", lifespan="off", log_config=None, access_log=False, ws="none")
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])  # no signal handlers: the caller owns them
        self._server, self._sock = server, sock
        self._task = asyncio.create_task(server.main_loop(), name="mes-simulator-rest")

    async def stop(self) -> None:
        """Close the client and the REST endpoint."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        if server is not None and task is not None and sock is not None:
            server.should_exit = True
            await task
            await server.shutdown(sockets=[sock])
            sock.close()

    async def __aenter__(self) -> MesSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what the MES does --------------------------------------------------------------------------------

    async def release_work_order(self) -> str:
        """A ``workorder.released`` CloudEvent for a new work order; returns the work order."""
        self._work_order += 1
        work_order = f"WO-{self._work_order}"
        event = self._event(
            "workorder.released", f"rel-{work_order}", work_order, {"work_order": work_order, "line": "line3"}
        )
        await self._post("/v1/events", [event], "application/cloudevents-batch+json")
        return work_order

    async def consume(self, work_order: str, count: int = 3) -> None:
        """A batch of ``material.consumed`` CloudEvents (one may carry an obsolete item: a dead letter)."""
        batch = []
        for n in range(count):
            item = self.rng.choice(_ITEMS)
            quantity = {"value": f"{self.rng.randint(1, 400) / 4:g}", "uom": "KGM"}
            data = {"work_order": work_order, "item": item, "quantity": quantity}
            batch.append(self._event("material.consumed", f"con-{work_order}-{n}", work_order, data))
        await self._post("/v1/events", batch, "application/cloudevents-batch+json")

    async def confirm(self, work_order: str, quantity: int) -> None:
        """A production confirmation in the MES's own JSON (the ``confirmations`` mapping)."""
        now = datetime.now(UTC).isoformat()
        body = {
            "plant": "P01",
            "confirmations": [
                {"confirmationId": f"CONF-{work_order}", "postedAt": now, "order": work_order,
                 "material": "FILL-500", "qty": quantity, "unit": "pcs"},
            ],
        }  # fmt: skip
        await self._post("/v1/mes/confirmations", body, "application/json")

    def receive_goods(self) -> dict[str, Any]:
        """A goods receipt for the REST endpoint (read by a poll source)."""
        n = len(self.records) + 1
        record = {
            "id": n,
            "receipt": f"GR-{n:06d}",
            "receivedAt": datetime.now(UTC).isoformat(),
            "material": self.rng.choice(_ITEMS[:3]),
            "batch": f"L-{self.rng.randint(100, 999)}",
            "qty": self.rng.randint(1, 50) * 10,
            "unit": "pcs",
        }
        self.records.append(record)
        return record

    async def run_demo(self, stop: asyncio.Event) -> None:
        """A work order every few seconds: released, materials consumed, production confirmed; goods received."""
        while not stop.is_set():
            if self.serve_rest:
                self.receive_goods()
            if self.agent_url is not None:
                work_order = await self.release_work_order()
                await self.consume(work_order, self.rng.randint(1, 4))
                if await _stopped(stop, self.rng.uniform(0.5, 1.5)):
                    return
                await self.confirm(work_order, self.rng.randint(50, 500))
            if await _stopped(stop, self.rng.uniform(1.5, 3.0)):
                return

    # --- plumbing ---------------------------------------------------------------------------------------

    def _event(self, name: str, event_id: str, subject: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": event_id,
            "source": "mes://demo-plant/mes",
            "type": f"io.plantgate.{name}",
            "time": datetime.now(UTC).isoformat(),
            "subject": subject,
            "correlationid": f"mes-{subject}",
            "data": data,
        }

    async def _post(self, path: str, body: Any, content_type: str) -> None:
        if self._client is None or self.agent_url is None:
            raise RuntimeError("start() the simulator and set agent_url first")
        count = len(body) if isinstance(body, list) else len(body.get("confirmations", [body]))
        try:
            response = await self._client.post(
                self.agent_url + path, json=body, headers={"Content-Type": content_type}
            )
        except httpx.HTTPError as exc:
            self.refused += 1
            log.warning("Demo MES could not reach the agent", extra={"path": path, "error": str(exc)})
            return
        if response.status_code == 202:
            self.sent += count
        else:
            self.refused += 1
            log.warning(
                "Demo MES request not acknowledged",
                extra={"path": path, "status": response.status_code, "body": response.text[:200]},
            )

    async def _serve_records(self, request: Request) -> Response:
        since_text = request.query_params.get("since", "0")
        since = int(since_text) if since_text.isdigit() else 0
        after = [r for r in self.records if r["id"] > since]
        page = after[: self.page_size]
        etag = f'"{since}-{len(self.records)}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        body: dict[str, Any] = {"records": page}
        if len(after) > len(page):
            body["next"] = f"/records?since={page[-1]['id']}"
        return JSONResponse(body, headers={"ETag": etag})


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    """Wait ``delay`` seconds; True at once if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()
