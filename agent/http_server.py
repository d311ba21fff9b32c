"""The agent's HTTP surface: /healthz, /readyz, /metrics, /status (and, later, MES ingest).

A Starlette app served by uvicorn inside the agent's own event loop: no thread, no
second loop. We drive ``uvicorn.Server.startup()``/``shutdown()`` ourselves instead
of ``serve()``, because ``serve()`` runs uvicorn's ``main_loop``, which wakes every
0.1 s to check its exit flag and refresh the Date header: ten wake-ups a second
for nothing, against an idle CPU budget of 0.01 core. Without that tick uvicorn
does not send ``Date``/``Server`` headers (both are disabled explicitly below);
nothing that talks to the agent needs them.

The socket is bound here, not by uvicorn, so a port in use is a clear
``HttpListenError`` naming the address (uvicorn itself would log and
``sys.exit``), and ``127.0.0.1:0`` gives a free port for tests.
"""

from __future__ import annotations

import inspect
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from agent.metrics import Metrics

log = logging.getLogger(__name__)

JSON = "application/json"


class AgentView(Protocol):
    """What the HTTP server needs from the running agent; the agent implements it.

    Every method is called from the event loop and must return promptly: these
    answer monitoring, so they read in-memory state and never touch the disk.
    The view may also define ``refresh_metrics()`` (plain or ``async``): it is
    called before each /metrics scrape so gauges (buffer depth, oldest age,
    connection state) are fresh when Prometheus reads them, and cost nothing
    between scrapes.
    """

    @property
    def metrics(self) -> Metrics:
        """The agent's metrics, rendered by /metrics."""

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)`` for /readyz.

        Not ready (503): the body has a ``"reason"`` (starting, stopping, buffer
        refusing writes). Ready (200): the body has a ``"degraded"`` list (sinks
        unreachable, sources disconnected, bad OPC UA nodes), empty when all is well.
        """

    def status(self) -> dict[str, Any]:
        """The /status document: each source and sink by name with its state and last
        error, buffer depth and oldest age, dead-letter count."""


class HttpListenError(Exception):
    """The HTTP server could not listen on its configured address (in use, not permitted, unknown host)."""

    def __init__(self, address: str, reason: str, errno: int | None = None):
        super().__init__(f"cannot listen on {address} ([http].listen): {reason}")
        self.address = address
        self.reason = reason
        self.errno = errno


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:9480"`` for IPv6, ``":9480"`` for every interface).

    Raises ``ValueError`` naming the value when it is not of that form.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'{listen!r} is not host:port (e.g. "127.0.0.1:9480" or "[::1]:9480")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'{listen!r}: write an IPv6 address in brackets, e.g. "[::1]:9480"')
    return host, int(port_text)


def _json(body: Any, status_code: int = 200) -> Response:
    # msgspec rather than JSONResponse: it encodes the agent's Structs (ComponentStatus)
    # and datetimes directly, and writes NaN/inf (an unknown drain time) as null where
    # json.dumps(allow_nan=False) would fail the request.
    return Response(msgspec.json.encode(body), status_code=status_code, media_type=JSON)


def build_app(view: AgentView, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The Starlette app of the agent's HTTP surface.

    ``extra_routes`` are appended after the built-in endpoints: this is where
    ``POST /v1/events`` (MES ingest) plugs in, owned by its own module.
    Every endpoint is ``async`` so Starlette runs it on the event loop rather than
    in its thread pool: the view is not thread-safe and must not need to be.
    """

    async def healthz(request: Request) -> Response:
        # Answering at all proves the process and its event loop are alive.
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, body = view.readiness()
        return _json(body, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        refresh = getattr(view, "refresh_metrics", None)
        if refresh is not None:
            result = refresh()
            if inspect.isawaitable(result):
                await result
        body, content_type = view.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    async def status(request: Request) -> Response:
        return _json(view.status())

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        *extra_routes,
    ]
    return Starlette(routes=routes)


class HttpServer:
    """Serves ``build_app(view)`` on ``listen`` from the running event loop.

    ``await start()`` binds and starts accepting (raises ``HttpListenError`` when
    the address is unusable); ``await stop()`` stops accepting, lets in-flight
    requests finish (at most ``graceful_timeout`` seconds) and closes. Also an
    async context manager.
    """

    def __init__(
        self,
        listen: str,
        view: AgentView,
        *,
        extra_routes: Sequence[BaseRoute] = (),
        graceful_timeout: int = 5,
    ) -> None:
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self.app = build_app(view, extra_routes)
        self._graceful_timeout = graceful_timeout
        self._server: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []

    @property
    def port(self) -> int:
        """The bound port (the real one when ``listen`` asked for port 0)."""
        if not self._sockets:
            raise RuntimeError("the HTTP server is not started")
        port: int = self._sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``http://host:port`` of the first bound address, for logs and tests."""
        if not self._sockets:
            raise RuntimeError("the HTTP server is not started")
        host = self._sockets[0].getsockname()[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind ``listen`` and start serving; returns once connections are accepted."""
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        sockets = self._bind()
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the agent configures logging (agent.logs); uvicorn must not
            access_log=False,  # a scrape every 15 s is not news
            lifespan="off",  # the agent owns startup and shutdown, not the ASGI app
            http="h11",
            ws="none",
            proxy_headers=False,  # nothing sits in front of the agent; don't trust X-Forwarded-*
            server_header=False,
            date_header=False,
            workers=1,  # also keeps uvicorn from reading WEB_CONCURRENCY
            timeout_graceful_shutdown=self._graceful_timeout,
        )
        config.load()
        server = uvicorn.Server(config)
        # What Server._serve() does before startup(); we skip _serve() for its 0.1 s tick.
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=sockets)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise HttpListenError(self.listen, exc.strerror or str(exc), exc.errno) from exc
        self._server = server
        self._sockets = sockets
        log.info("HTTP server listening", extra={"listen": self.listen, "url": self.url})

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, close. Safe to call twice."""
        server, sockets = self._server, self._sockets
        if server is None:
            return
        self._server = None
        try:
            await server.shutdown(sockets=sockets)  # closes the listening sockets too
        finally:
            for sock in sockets:
                sock.close()
            self._sockets = []

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _bind(self) -> list[socket.socket]:
        """One listening socket per address ``host`` resolves to (both stacks for ``":port"``).

        getaddrinfo blocks, but runs once at start-up and for the usual literal
        address or ``localhost`` answers from /etc/hosts at once; the asyncio
        variant would start a thread pool just for this.
        """
        try:
            infos = socket.getaddrinfo(
                self.host or None,
                self._requested_port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
        except socket.gaierror as exc:
            raise HttpListenError(self.listen, f"cannot resolve {self.host!r}: {exc.strerror}") from exc
        seen: set[tuple[int, Any]] = set()
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, sockaddr in infos:
                if (family, sockaddr) in seen:
                    continue
                seen.add((family, sockaddr))
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                if sys.platform != "win32":
                    # Rebind at once after a restart (TIME_WAIT); still fails while another
                    # process listens on the port, which is the error we want to report.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # With ":port" we bind 0.0.0.0 and :: separately, as asyncio does.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.setblocking(False)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise HttpListenError(self.listen, exc.strerror or str(exc), exc.errno) from exc
        return sockets
