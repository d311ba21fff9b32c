"""The agent's HTTP surface: /healthz, /readyz, /metrics, /status, and the routes other modules add.

A Starlette application served by uvicorn (h11) from the agent's own event loop (no
thread, no second loop). The agent binds the listening socket itself, so an unusable
address fails ``start()`` at once, and runs uvicorn's ``startup()`` / ``main_loop()``
/ ``shutdown()`` rather than ``serve()``: uvicorn installs no signal handler (the
agent owns SIGTERM) and configures no logging. The access log is off (monitoring
scrapes every few seconds; an INFO line per scrape would drown the log) and
uvicorn's own loggers are held at WARNING.

Other modules plug their endpoints in as Starlette routes, before ``start()``::

    server = HttpServer(listen, view, routes=[Route("/v1/events", ingest, methods=["POST"])])
    server.add_routes([Route("/v1/buffer/stats", stats)])

A handler is ``async def handler(request: Request) -> Response``. Request bodies are
limited to ``max_body_bytes``: a handler reading a body whose declared length is over
it, or a streamed body growing past it, gets ``413``. Errors (404, 405, 413, 500, and
any ``HTTPException`` a handler raises) are answered as JSON ``{"error", "detail"}``.
``require_bearer`` guards a handler with a bearer token read from a file;
``check_any_bearer`` accepts any of several (the buffer admin API reads with the
admin or the ingest token).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import wraps
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from agent.metrics import Metrics

log = logging.getLogger(__name__)

JSON = "application/json"

Handler = Callable[[Request], Awaitable[Response]]

MAX_CONNECTIONS = 64
"""Concurrent connections and requests served; beyond it uvicorn answers 503 at once."""

KEEP_ALIVE_SECONDS = 5
"""An idle keep-alive connection is closed after this long."""


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


def is_loopback_listen(listen: str) -> bool:
    """Whether ``listen`` (``host:port``) only accepts connections from this host.

    ``localhost`` and loopback addresses do; every interface (``":9480"``, ``0.0.0.0``,
    ``[::]``), another address or a host name is beyond loopback.
    """
    host, _ = parse_listen(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- responses -------------------------------------------------------------------------------------------


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``body`` as a JSON response.

    msgspec rather than json.dumps: it encodes the agent's Structs (ComponentStatus)
    and datetimes directly, and writes NaN/inf (an unknown drain time) as null where
    json.dumps(allow_nan=False) would fail the request.
    """
    return Response(msgspec.json.encode(body), status_code=status, headers=headers, media_type=JSON)


def error_response(status: int, detail: str | None = None, headers: Mapping[str, str] | None = None) -> Response:
    """``{"error": "<reason phrase, lower case>", "detail": ...}`` with ``status``."""
    try:
        phrase = HTTPStatus(status).phrase.lower()
    except ValueError:
        phrase = "error"
    body = {"error": phrase}
    if detail:
        body["detail"] = detail
    return json_response(body, status, headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """An ``HTTPException`` (404, 405, 413, 401, or one a handler raised) as JSON."""
    assert isinstance(exc, HTTPException)
    try:
        default = HTTPStatus(exc.status_code).phrase
    except ValueError:
        default = ""
    if exc.status_code < 400:
        return Response(status_code=exc.status_code, headers=exc.headers)
    detail = exc.detail if exc.detail and exc.detail != default else None
    return error_response(exc.status_code, detail, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    """The 500 answer; nothing of the exception leaks (it is logged once, by the server)."""
    return error_response(500)


# --- bearer token -----------------------------------------------------------------------------------------


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (e.g. a systemd credential), surrounding whitespace stripped.

    Raises ``ValueError`` naming the file when it cannot be read or holds no token.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the token: {exc}") from exc
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token


def bearer_token_matches(request: Request, token: str) -> bool | None:
    """Whether the request's ``Authorization: Bearer <token>`` is ``token``; None when it sends none.

    Compared in constant time (``hmac.compare_digest``), so the time taken tells
    nothing about how much of a guess was right.
    """
    scheme, _, sent = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not sent.strip():
        return None
    return hmac.compare_digest(sent.strip().encode("utf-8"), token.encode("utf-8"))


def check_bearer(request: Request, token: str) -> None:
    """Raise ``HTTPException(401)`` (``WWW-Authenticate: Bearer``) unless the request carries ``token``."""
    matches = bearer_token_matches(request, token)
    if matches:
        return
    challenge = 'Bearer realm="plantgate"' if matches is None else 'Bearer realm="plantgate", error="invalid_token"'
    detail = "bearer token required" if matches is None else "invalid bearer token"
    raise HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def check_any_bearer(request: Request, tokens: Iterable[str]) -> None:
    """Raise ``HTTPException(401)`` unless the request carries one of ``tokens``.

    Every token is compared (in constant time), so which one matched, or how many
    there are, does not show in the time taken.
    """
    found: bool | None = None
    for token in tokens:
        matches = bearer_token_matches(request, token)
        if matches is None:
            break  # no token sent: the same answer for every configured one
        found = bool(found) or matches
    if found:
        return
    challenge = 'Bearer realm="plantgate"' if found is None else 'Bearer realm="plantgate", error="invalid_token"'
    detail = "bearer token required" if found is None else "invalid bearer token"
    raise HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def require_bearer(token: str) -> Callable[[Handler], Handler]:
    """Decorator: the handler runs only for requests carrying ``token`` (else 401, JSON body).

    ``token`` is typically ``read_token_file(settings.http.ingest_token_file)``, read
    once when the routes are built.
    """
    if not token:
        raise ValueError("an empty bearer token would let every request through")

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: Request) -> Response:
            check_bearer(request, token)
            return await handler(request)

        return guarded

    return decorate


# --- the built-in endpoints -------------------------------------------------------------------------------


def builtin_routes(view: AgentView) -> list[Route]:
    """The agent's own endpoints (GET, and HEAD through Starlette). Every handler runs on the
    event loop: the view is not thread-safe and must not need to be."""

    async def healthz(request: Request) -> Response:
        # Answering at all proves the process and its event loop are alive.
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, body = view.readiness()
        return json_response(body, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        refresh = getattr(view, "refresh_metrics", None)
        if refresh is not None:
            result = refresh()
            if inspect.isawaitable(result):
                await result
        body, content_type = view.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    async def status(request: Request) -> Response:
        return json_response(view.status())

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/status", status),
    ]


# --- the server -------------------------------------------------------------------------------------------


class HttpServer:
    """Serves the agent's endpoints and the added ``routes`` on ``listen`` from the running event loop.

    ``await start()`` binds and starts accepting (raises ``HttpListenError`` when
    the address is unusable); ``await stop()`` stops accepting, closes idle
    keep-alive connections, lets in-flight requests finish (at most
    ``graceful_timeout`` seconds; one still running then is answered 503) and
    closes. Also an async context manager.

    ``routes`` (and ``add_routes()`` before ``start()``) take Starlette routes
    (``Route(path, handler, methods=[...])``): this is where MES ingest and the
    buffer admin endpoints plug in.
    """

    def __init__(
        self,
        listen: str,
        view: AgentView,
        *,
        routes: Iterable[BaseRoute] = (),
        max_body_bytes: int = 1024 * 1024,
        graceful_timeout: float = 5.0,
    ) -> None:
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self.max_body_bytes = max_body_bytes
        self._graceful_timeout = graceful_timeout
        self._routes: list[BaseRoute] = [*builtin_routes(view), *routes]
        self._app: Starlette | None = None
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []
        self._requests: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def add_routes(self, routes: Iterable[BaseRoute]) -> None:
        """Serve ``routes`` too; only before ``start()``."""
        if self._server is not None:
            raise RuntimeError("routes must be added before the HTTP server starts")
        self._routes.extend(routes)

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
        host: str = self._sockets[0].getsockname()[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind ``listen`` and start serving; returns once connections are accepted."""
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        sockets = await self._bind()
        self._app = Starlette(
            routes=self._routes,
            exception_handlers={HTTPException: _http_error, Exception: _server_error},
        )
        config = uvicorn.Config(
            self._serve_request,
            interface="asgi3",
            http="h11",
            ws="none",
            lifespan="off",
            loop="none",
            log_config=None,  # the agent configured logging
            log_level=logging.WARNING,  # uvicorn's loggers: warnings and errors only
            access_log=False,
            proxy_headers=False,  # nothing proxies the agent: the peer address is the client's
            server_header=False,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=self._graceful_timeout,  # type: ignore[arg-type]  # seconds, float works
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)  # as Server.serve() does; "off": no lifespan events
        try:
            await server.startup(sockets=sockets)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._server, self._sockets, self._stopping = server, sockets, False
        # uvicorn's tick: refreshes the Date header once a second and notices should_exit.
        self._ticker = asyncio.create_task(server.main_loop(), name="http-server")
        log.debug("HTTP server listening", extra={"listen": self.listen, "url": self.url})

    async def _bind(self) -> list[socket.socket]:
        """Listening sockets for every address ``listen`` resolves to (one port for all)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.host or None, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            reason = f"cannot resolve {self.host!r}: {exc.strerror or exc}"
            raise HttpListenError(self.listen, reason, exc.errno) from exc
        sockets: list[socket.socket] = []
        port = self._requested_port
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # "[::]" alone must not take the IPv4 port too
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                sock.listen(128)
                sock.setblocking(False)
                port = sock.getsockname()[1]  # port 0: the other addresses take the same one
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise HttpListenError(self.listen, exc.strerror or str(exc), exc.errno) from exc
        return sockets

    async def _serve_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application uvicorn runs: the Starlette app with the body limit, its failures logged once."""
        assert self._app is not None
        task = asyncio.current_task()
        if task is not None and task not in self._requests:
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
        started = False
        limit, received = self.max_body_bytes, 0
        declared = Headers(scope=scope).get("content-length", "")
        too_large = HTTPException(413, f"the request body is larger than {limit} bytes")

        async def limited_receive() -> Message:
            # Raised into the handler reading the body; Starlette answers it (JSON, via _http_error).
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, limited_receive, tracked_send)
        except asyncio.CancelledError:
            # Cancelled by uvicorn's shutdown once graceful_timeout passed: answer it and let
            # the task end (uvicorn does not wait for it); any other cancellation propagates.
            if not self._stopping or started:
                raise
            log.warning("HTTP request cut short at stop", extra={"path": scope.get("path")})
            await error_response(503, "the agent is stopping")(scope, receive, send)
        except Exception:
            # Starlette already answered 500 (JSON); its re-raise would make uvicorn log it again.
            log.exception("HTTP handler failed", extra={"method": scope.get("method"), "path": scope.get("path")})

    async def stop(self) -> None:
        """Stop accepting, close idle connections, finish in-flight requests, close. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.should_exit = True
        try:
            await server.shutdown(sockets=self._sockets)
            if self._ticker is not None:
                await self._ticker  # ends at its next tick (0.1 s)
            if self._requests:  # requests cut short: let them finish answering
                await asyncio.wait(set(self._requests), timeout=1.0)
        finally:
            for sock in self._sockets:
                sock.close()
            self._sockets, self._ticker = [], None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
