"""A small local receiver of CloudEvents batches, for ``plantgate demo``: the other end of an HTTPS sink.

It accepts ``POST /v1/events`` with ``application/cloudevents-batch+json`` (a JSON
array of structured-mode CloudEvents), counts the events and batches (per type
too) and answers 200; anything else is 400 (not an array of objects with an
``id``) or 415 (another content type). It speaks plain http on loopback: TLS for
the demo would need a certificate made by a development-only package, and the
demo's point is the pipeline, not the certificate. ``plantgate check`` warns about
the resulting ``http://`` sink url.

Served by uvicorn (h11) from the caller's event loop, the way the agent's own HTTP
server runs: the socket is bound first (port 0: the kernel picks one), uvicorn's
``startup``/``main_loop``/``shutdown`` are used and no signal handler is installed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["DemoReceiver"]

PATH = "/v1/events"


class _Event(msgspec.Struct):
    id: str
    type: str = ""


_decoder = msgspec.json.Decoder(list[_Event])


class DemoReceiver:
    """Counts the CloudEvents batches it is sent; ``await start()`` / ``await stop()`` from one event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.events = 0
        """Events accepted since start."""
        self.batches = 0
        """Requests accepted since start."""
        self.by_type: Counter[str] = Counter()
        """Accepted events per CloudEvents type."""
        self.last_ids: list[str] = []
        """Ids of the last accepted batch."""
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        """Where to point a sink: ``http://host:port/v1/events``."""
        return f"http://{self.host}:{self.port}{PATH}"

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
        return JSONResponse({"accepted": len(batch)})

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

    async def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
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
