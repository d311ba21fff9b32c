"""A pageable MES REST endpoint on a free loopback port: the peer of the MES poll tests.

``MesRestServer`` serves ``GET /records?since=<id>`` with the records whose ``id``
is above ``since``, ``page_size`` at a time, as
``{"records": [...], "next": "/records?since=<last id>"}`` (``next`` only while more
remain), with an ``ETag`` (``If-None-Match`` answered 304). It records every
request (its ``since``, whether it was answered 304 or failed), can answer the
next N requests 500, requires a bearer token or basic auth when given one, and
can be stopped and started again on the same port. Starlette served by uvicorn,
in the test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HOST = "127.0.0.1"


@dataclass
class SeenRequest:
    """One request the server answered."""

    since: str | None
    status: int
    if_none_match: str | None


def cloudevent(n: int) -> dict[str, Any]:
    """The n-th goods receipt as a CloudEvent (an MES that speaks CloudEvents); ``seq`` orders them."""
    return {
        "specversion": "1.0",
        "id": f"gr-{n:05d}",
        "source": "mes://plant/rest",
        "type": "io.plantgate.goods.received",
        "time": "2026-12-04T08:00:00Z",
        "subject": f"LOT-{n:05d}",
        "seq": n,
        "data": {"item": "FILL-500", "lot": f"LOT-{n:05d}", "quantity": {"value": str(n), "uom": "EA"}},
    }


def record(n: int) -> dict[str, Any]:
    """The n-th production confirmation, in the MES's own shape."""
    return {
        "id": n,
        "confirmation": f"C-{n:05d}",
        "order": f"WO-{n:05d}",
        "material": "FILL-500",
        "qty": n,
        "unit": "pcs",
        "postedAt": f"2026-12-04T{8 + n // 3600 % 12:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z",
    }


class MesRestServer:
    """See the module docstring. ``async with MesRestServer(...) as server:`` starts and stops it."""

    def __init__(
        self,
        records: int = 0,
        *,
        page_size: int = 10,
        token: str | None = None,
        basic: tuple[str, str] | None = None,
        page_delay: float = 0.0,
        cloudevents: bool = False,
        link_header: bool = False,
        tls: tuple[str, str] | None = None,
    ):
        self.make = cloudevent if cloudevents else record
        self.records = [self.make(n) for n in range(1, records + 1)]
        self.link_header = link_header
        """Give the next page in a ``Link: <...>; rel="next"`` header instead of the body's ``next``."""
        self.tls = tls
        """(certificate file, key file): serve HTTPS."""
        self.page_size = page_size
        self.token = token
        self.basic = basic
        self.page_delay = page_delay
        """Seconds each page takes to answer (a slow MES)."""
        self.fail_next = 0
        """Answer this many of the next requests with 500."""
        self.requests: list[SeenRequest] = []
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._app = Starlette(routes=[Route("/records", self._records)])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}/records"

    @property
    def running(self) -> bool:
        return self._server is not None

    def add(self, count: int) -> None:
        """``count`` more records at the end."""
        start = len(self.records) + 1
        self.records.extend(self.make(n) for n in range(start, start + count))

    async def _records(self, request: Request) -> Response:
        since_text = request.query_params.get("since")
        if not self._authorized(request):
            self.requests.append(SeenRequest(since_text, 401, None))
            return JSONResponse({"error": "unauthorized"}, 401)
        if self.fail_next > 0:
            self.fail_next -= 1
            self.requests.append(SeenRequest(since_text, 500, None))
            return JSONResponse({"error": "database busy"}, 500)
        since = int(since_text) if since_text and since_text.isdigit() else 0
        key = "seq" if self.make is cloudevent else "id"
        after = [r for r in self.records if r[key] > since]
        page = after[: self.page_size]
        etag = f'"{since}-{len(self.records)}"'
        if_none_match = request.headers.get("if-none-match")
        if if_none_match == etag:
            self.requests.append(SeenRequest(since_text, 304, if_none_match))
            return Response(status_code=304, headers={"ETag": etag})
        if self.page_delay:
            await asyncio.sleep(self.page_delay)  # the MES's own latency, not synchronisation
        body: dict[str, Any] = {"records": page}
        headers = {"ETag": etag}
        if len(after) > len(page):
            following = f"/records?since={page[-1][key]}"
            if self.link_header:
                headers["Link"] = f'<{following}>; rel="next"'
            else:
                body["next"] = following
        self.requests.append(SeenRequest(since_text, 200, if_none_match))
        return JSONResponse(body, headers=headers)

    def _authorized(self, request: Request) -> bool:
        sent = request.headers.get("authorization", "")
        if self.token is not None:
            return sent == f"Bearer {self.token}"
        if self.basic is not None:
            expected = base64.b64encode(f"{self.basic[0]}:{self.basic[1]}".encode()).decode()
            return sent == f"Basic {expected}"
        return True

    async def start(self) -> None:
        """Listen (on the same port as before after a ``stop()``)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        certfile, keyfile = self.tls if self.tls else (None, None)
        config = uvicorn.Config(
            self._app, loop="none", lifespan="off", log_config=None, access_log=False, http="h11", ws="none",
            ssl_certfile=certfile, ssl_keyfile=keyfile,
        )  # fmt: skip
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        # startup/main_loop/shutdown rather than serve(): no signal handlers taken from the test process.
        await server.startup(sockets=[sock])
        self._server, self._sock = server, sock
        self._task = asyncio.create_task(server.main_loop())

    async def stop(self) -> None:
        """Stop answering; connections are closed."""
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        if server is None or task is None or sock is None:
            return
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await server.shutdown(sockets=[sock])
        sock.close()

    async def __aenter__(self) -> MesRestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
