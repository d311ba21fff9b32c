"""The agent's HTTP surface: /healthz, /readyz, /metrics, /status, and the routes other modules add.

An ``aiohttp.web`` application served from the agent's own event loop (no thread,
no second loop) by an ``AppRunner`` and ``TCPSite``. The server has no periodic
tick: nothing runs while no client is connected, which keeps the idle CPU near
zero. The access log is off (monitoring scrapes every few seconds; an INFO line
per scrape would drown the log).

Other modules plug their endpoints in as aiohttp route definitions, before
``start()``::

    server = HttpServer(listen, view, routes=[web.post("/v1/events", ingest)])
    server.add_routes([web.get("/v1/buffer/stats", stats)])

Request bodies are limited to ``max_body_bytes`` (aiohttp's ``client_max_size``):
a handler reading a larger body gets ``413``. Errors (404, 405, 413, 500, and any
``web.HTTPException`` a handler raises) are answered as JSON ``{"error": ...}``.
``require_bearer`` guards a handler with a bearer token read from a file.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import wraps
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import msgspec
from aiohttp import hdrs, web

from agent.metrics import Metrics

log = logging.getLogger(__name__)

JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


# --- responses -------------------------------------------------------------------------------------------


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``body`` as a JSON response.

    msgspec rather than json.dumps: it encodes the agent's Structs (ComponentStatus)
    and datetimes directly, and writes NaN/inf (an unknown drain time) as null where
    json.dumps(allow_nan=False) would fail the request.
    """
    return web.Response(body=msgspec.json.encode(body), status=status, content_type=JSON, headers=headers)


def error_response(status: int, detail: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """``{"error": "<reason phrase, lower case>", "detail": ...}`` with ``status``."""
    try:
        phrase = HTTPStatus(status).phrase.lower()
    except ValueError:
        phrase = "error"
    body = {"error": phrase}
    if detail:
        body["detail"] = detail
    return json_response(body, status, headers)


_ENTITY_HEADERS = frozenset({hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.CONTENT_ENCODING})


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors as JSON; an exception escaping a handler is logged once and answered 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == JSON:
            raise  # a redirect, or an error a handler already wrote as JSON
        headers = {name: value for name, value in exc.headers.items() if name not in _ENTITY_HEADERS}
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}: ") else None
        return error_response(exc.status, detail, headers)
    except Exception:
        log.exception("HTTP handler failed", extra={"method": request.method, "path": request.path})
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


def bearer_token_matches(request: web.Request, token: str) -> bool | None:
    """Whether the request's ``Authorization: Bearer <token>`` is ``token``; None when it sends none.

    Compared in constant time (``hmac.compare_digest``), so the time taken tells
    nothing about how much of a guess was right.
    """
    scheme, _, sent = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
    if scheme.lower() != "bearer" or not sent.strip():
        return None
    return hmac.compare_digest(sent.strip().encode("utf-8"), token.encode("utf-8"))


def check_bearer(request: web.Request, token: str) -> None:
    """Raise ``web.HTTPUnauthorized`` (401, ``WWW-Authenticate: Bearer``) unless the request carries ``token``."""
    matches = bearer_token_matches(request, token)
    if matches:
        return
    challenge = 'Bearer realm="plantgate"' if matches is None else 'Bearer realm="plantgate", error="invalid_token"'
    detail = "bearer token required" if matches is None else "invalid bearer token"
    raise web.HTTPUnauthorized(headers={hdrs.WWW_AUTHENTICATE: challenge}, text=detail)


def require_bearer(token: str) -> Callable[[Handler], Handler]:
    """Decorator: the handler runs only for requests carrying ``token`` (else 401, JSON body).

    ``token`` is typically ``read_token_file(settings.http.ingest_token_file)``, read
    once when the routes are built.
    """
    if not token:
        raise ValueError("an empty bearer token would let every request through")

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            check_bearer(request, token)
            return await handler(request)

        return guarded

    return decorate


# --- the built-in endpoints -------------------------------------------------------------------------------


def builtin_routes(view: AgentView) -> list[web.RouteDef]:
    """The agent's own endpoints (GET, and HEAD through aiohttp). Every handler runs on the
    event loop: the view is not thread-safe and must not need to be."""

    async def healthz(request: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive.
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, body = view.readiness()
        return json_response(body, 200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        refresh = getattr(view, "refresh_metrics", None)
        if refresh is not None:
            result = refresh()
            if inspect.isawaitable(result):
                await result
        body, content_type = view.metrics.render()
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})

    async def status(request: web.Request) -> web.Response:
        return json_response(view.status())

    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.get("/status", status),
    ]


# --- the server -------------------------------------------------------------------------------------------


class HttpServer:
    """Serves the agent's endpoints and the added ``routes`` on ``listen`` from the running event loop.

    ``await start()`` binds and starts accepting (raises ``HttpListenError`` when
    the address is unusable); ``await stop()`` stops accepting, closes idle
    keep-alive connections, lets in-flight requests finish (at most
    ``graceful_timeout`` seconds) and closes. Also an async context manager.

    ``routes`` (and ``add_routes()`` before ``start()``) take aiohttp route
    definitions (``web.get(...)``, ``web.post(...)``, a ``web.RouteTableDef``):
    this is where MES ingest and the buffer admin endpoints plug in.
    """

    def __init__(
        self,
        listen: str,
        view: AgentView,
        *,
        routes: Iterable[web.AbstractRouteDef] = (),
        max_body_bytes: int = 1024 * 1024,
        graceful_timeout: float = 5.0,
    ) -> None:
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self.max_body_bytes = max_body_bytes
        self._graceful_timeout = graceful_timeout
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])
        """The aiohttp application: add routes (or ``on_shutdown`` hooks) before ``start()``."""
        self.app.add_routes(builtin_routes(view))
        self.app.add_routes(routes)
        self._runner: web.AppRunner | None = None
        self._addresses: list[Any] = []

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Serve ``routes`` too; only before ``start()`` (aiohttp freezes the router then)."""
        if self._runner is not None:
            raise RuntimeError("routes must be added before the HTTP server starts")
        self.app.add_routes(routes)

    @property
    def port(self) -> int:
        """The bound port (the real one when ``listen`` asked for port 0)."""
        if not self._addresses:
            raise RuntimeError("the HTTP server is not started")
        port: int = self._addresses[0][1]
        return port

    @property
    def url(self) -> str:
        """``http://host:port`` of the first bound address, for logs and tests."""
        if not self._addresses:
            raise RuntimeError("the HTTP server is not started")
        host = self._addresses[0][0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind ``listen`` and start serving; returns once connections are accepted."""
        if self._runner is not None:
            raise RuntimeError("the HTTP server is already started")
        # access_log=None: no line per request; handle_signals=False: the agent owns SIGTERM.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=self._graceful_timeout)
        await runner.setup()
        site = web.TCPSite(runner, self.host or None, self._requested_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = exc.strerror or str(exc)
            if exc.errno is not None and exc.errno < 0:  # socket.gaierror: the host does not resolve
                reason = f"cannot resolve {self.host!r}: {reason}"
            raise HttpListenError(self.listen, reason, exc.errno) from exc
        self._runner = runner
        self._addresses = runner.addresses
        log.debug("HTTP server listening", extra={"listen": self.listen, "url": self.url})

    async def stop(self) -> None:
        """Stop accepting, close idle connections, finish in-flight requests, close. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            await runner.cleanup()
        finally:
            self._addresses = []

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
