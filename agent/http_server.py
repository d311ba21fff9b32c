"""The agent's HTTP surface: /healthz, /readyz, /metrics, /status (and, later, MES ingest).

A small HTTP/1.1 server of our own on asyncio streams, inside the agent's event loop:
no thread, no second loop. It used to be a Starlette app under uvicorn, but importing
those (uvicorn pulls click, Starlette pulls anyio, ...) cost about 3 MB RSS for four GET
endpoints, out of a 70 MB budget on a small industrial PC. ``h11`` does the HTTP
parsing and framing (request line, headers, chunked bodies, keep-alive rules, size
limits); this module does only the glue: accept, read with timeouts, route, write.

No periodic tick of any kind: the idle CPU budget is 0.01 core. Nothing runs while no
client is connected; a connection is one coroutine, and its timeouts are deadlines on
its own reads (``asyncio.timeout``), not timer tasks. For the same reason there are no
``Date``/``Server`` headers; nothing that talks to the agent needs them.

The socket is bound here, before serving, so a port in use is a clear
``HttpListenError`` naming the address, and ``127.0.0.1:0`` gives a free port for tests.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import h11
import msgspec

from agent.metrics import Metrics

log = logging.getLogger(__name__)

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

_READ_SIZE = 65536
_IO_TIMEOUT = 10.0
"""Seconds of silence tolerated while reading a request body, and to get a response out."""
_LINGER = 2.0
"""After an error response sent before the request was read in full, how long to keep
discarding what the client still sends, so our close does not reset the connection
(and lose the response) while its request is in flight."""


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


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, read in full (the body is complete and within ``max_body_bytes``)."""

    method: str
    """Upper case as sent, e.g. ``"GET"``; ``"HEAD"`` reaches a GET route's handler as ``"HEAD"``."""
    path: str
    """The target's path as sent (not percent-decoded), without the query."""
    query: str = ""
    """What follows ``?`` in the target, as sent; empty when there is none."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Names in lower case; a repeated header's values joined with ``", "``."""
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler returns. ``Content-Type`` and ``Content-Length`` come from the fields;
    ``headers`` adds others (``Allow``, ``Retry-After``, ...)."""

    body: bytes = b""
    status: int = 200
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    """``handler`` answers ``methods`` on exactly ``path`` (no patterns); a GET route answers HEAD too."""

    path: str
    handler: Handler
    methods: tuple[str, ...] = ("GET",)


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    # msgspec rather than json.dumps: it encodes the agent's Structs (ComponentStatus)
    # and datetimes directly, and writes NaN/inf (an unknown drain time) as null where
    # json.dumps(allow_nan=False) would fail the request.
    return Response(msgspec.json.encode(body), status, JSON, headers or {})


def _error(status: int, detail: str | None = None, headers: Mapping[str, str] | None = None) -> Response:
    body = {"error": HTTPStatus(status).phrase.lower()}
    if detail:
        body["detail"] = detail
    return _json(body, status, headers)


def builtin_routes(view: AgentView) -> list[Route]:
    """The agent's own endpoints. Every handler is ``async`` and runs on the event loop:
    the view is not thread-safe and must not need to be."""

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
        return Response(body, content_type=content_type)

    async def status(request: Request) -> Response:
        return _json(view.status())

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/status", status),
    ]


class _Connection:
    """One client connection: its streams, its h11 state machine and its task."""

    __slots__ = ("h11", "idle", "reader", "task", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[Any]) -> None:
        self.reader = reader
        self.writer = writer
        self.task = task
        self.h11 = h11.Connection(h11.SERVER)  # headers over 16 KiB: RemoteProtocolError, hint 431
        self.idle = True
        """Waiting for the first byte of a request: ``stop()`` closes such a connection at once."""


class HttpServer:
    """Serves the agent's endpoints (and ``extra_routes``) on ``listen`` from the running event loop.

    ``await start()`` binds and starts accepting (raises ``HttpListenError`` when
    the address is unusable); ``await stop()`` stops accepting, closes idle
    keep-alive connections, lets in-flight requests finish (at most
    ``graceful_timeout`` seconds) and closes. Also an async context manager.

    ``extra_routes`` are served beside the built-in endpoints: this is where
    ``POST /v1/events`` (MES ingest) plugs in, owned by its own module.

    Limits, so a misbehaving client cannot exhaust the agent: a request body over
    ``max_body_bytes`` gets 413 without being read; headers must be complete within
    ``header_timeout`` seconds; a kept-alive connection silent for
    ``keep_alive_timeout`` seconds is closed; beyond ``max_connections`` open
    connections, a new one is closed at once.
    """

    def __init__(
        self,
        listen: str,
        view: AgentView,
        *,
        extra_routes: Sequence[Route] = (),
        graceful_timeout: float = 5,
        max_body_bytes: int = 1024 * 1024,
        max_connections: int = 64,
        header_timeout: float = 10.0,
        keep_alive_timeout: float = 5.0,
    ) -> None:
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self._routes: dict[str, dict[str, Handler]] = {}
        for route in (*builtin_routes(view), *extra_routes):
            methods = self._routes.setdefault(route.path, {})
            for method in route.methods:
                if method.upper() in methods:
                    raise ValueError(f"route {method.upper()} {route.path} is defined twice")
                methods[method.upper()] = route.handler
        for methods in self._routes.values():
            if "GET" in methods:
                methods.setdefault("HEAD", methods["GET"])
        self._graceful_timeout = graceful_timeout
        self._max_body_bytes = max_body_bytes
        self._max_connections = max_connections
        self._header_timeout = header_timeout
        self._keep_alive_timeout = keep_alive_timeout
        self._servers: list[asyncio.Server] | None = None
        self._sockets: list[socket.socket] = []
        self._connections: set[_Connection] = set()
        self._stopping = False

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
        if self._servers is not None:
            raise RuntimeError("the HTTP server is already started")
        sockets = self._bind()
        servers: list[asyncio.Server] = []
        try:
            for sock in sockets:
                servers.append(await asyncio.start_server(self._serve_connection, sock=sock, limit=_READ_SIZE))
        except OSError as exc:
            for server in servers:
                server.close()
            for sock in sockets:
                sock.close()
            raise HttpListenError(self.listen, exc.strerror or str(exc), exc.errno) from exc
        self._stopping = False
        self._servers = servers
        self._sockets = sockets
        log.info("HTTP server listening", extra={"listen": self.listen, "url": self.url})

    async def stop(self) -> None:
        """Stop accepting, close idle connections, finish in-flight requests, close. Safe to call twice."""
        servers, sockets = self._servers, self._sockets
        if servers is None:
            return
        self._servers = None
        self._stopping = True  # a connection finishing its request closes instead of waiting for another
        try:
            for server in servers:
                server.close()
            for connection in self._connections:
                if connection.idle:
                    connection.task.cancel()
            busy = {connection.task for connection in self._connections}
            if busy:
                _, late = await asyncio.wait(busy, timeout=self._graceful_timeout)
                if late:
                    log.warning("HTTP requests cut short by shutdown", extra={"requests": len(late)})
                    for task in late:
                        task.cancel()
                    await asyncio.wait(late)
            for server in servers:
                await server.wait_closed()
        finally:
            for connection in self._connections:  # only when stop() itself was cancelled
                connection.task.cancel()
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

    # --- one connection ------------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The task asyncio starts for each accepted connection; it ends when the connection closes."""
        task = asyncio.current_task()
        if self._stopping or len(self._connections) >= self._max_connections or task is None:
            writer.close()  # nothing buffered: the close is immediate, no need to wait on it
            return
        connection = _Connection(reader, writer, task)
        self._connections.add(connection)
        try:
            linger = await self._converse(connection)
            await self._close(connection, linger)
        except (OSError, TimeoutError, h11.RemoteProtocolError) as exc:
            # the client went away, went silent or broke the protocol while we answered: just drop it
            log.debug("HTTP connection dropped", extra={"error": repr(exc)})
        except asyncio.CancelledError:
            # stop() cancels an idle connection, or one still busy after the graceful timeout.
            # The task must still end normally: asyncio's streams (3.11) call task.exception()
            # on it when done, which raises for a cancelled task and logs an error.
            pass
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self._connections.discard(connection)
            writer.transport.abort()  # no-op after a clean close; drops the rest otherwise

    async def _converse(self, connection: _Connection) -> bool:
        """Serve requests on ``connection`` until it is to be closed; whether to linger before closing."""
        conn = connection.h11
        while True:
            try:
                event = await self._next_request(connection)
                if event is None:
                    return False
                connection.idle = False
                await self._answer(connection, event)
            except h11.RemoteProtocolError as exc:
                if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    return False
                log.debug("HTTP request malformed", extra={"error": str(exc)})
                response = _error(exc.error_status_hint, str(exc))
                await self._send(connection, response, head=False)
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE and not self._stopping:
                conn.start_next_cycle()
                continue
            return conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    async def _receive(self, connection: _Connection, deadline: float) -> None:
        """Feed h11 the next bytes from the client (``b""`` at EOF); TimeoutError past ``deadline``."""
        async with asyncio.timeout_at(deadline):
            data = await connection.reader.read(_READ_SIZE)
        connection.h11.receive_data(data)

    async def _next_request(self, connection: _Connection) -> h11.Request | None:
        """The next request's head, or None when the client closed or stayed silent too long."""
        conn = connection.h11
        now = asyncio.get_running_loop().time()
        idle_deadline = now + self._keep_alive_timeout
        header_deadline = now + self._header_timeout
        connection.idle = not conn.trailing_data[0]  # a pipelined request may already be here
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    await self._receive(connection, idle_deadline if connection.idle else header_deadline)
                except TimeoutError:
                    return None
                connection.idle = connection.idle and not conn.trailing_data[0]
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed (or PAUSED, which a fresh cycle never is)

    async def _answer(self, connection: _Connection, head: h11.Request) -> None:
        """Read the body of ``head``, run its handler and send the response."""
        conn = connection.h11
        method = head.method.decode("ascii")
        target = head.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for raw_name, raw_value in head.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        declared = headers.get("content-length")
        if declared is not None and int(declared) > self._max_body_bytes:  # h11 checked it is a number
            await self._send(connection, _error(413), head=False)
            return
        if conn.they_are_waiting_for_100_continue:
            await self._write(
                connection, conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
            )
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                await self._receive(connection, asyncio.get_running_loop().time() + _IO_TIMEOUT)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body_bytes:  # chunked: no length said up front
                    await self._send(connection, _error(413), head=False)
                    return
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed: the client gave up; nobody to answer
                return

        methods = self._routes.get(path)
        if methods is None:
            response = _error(404)
        elif method not in methods:
            response = _error(405, headers={"Allow": ", ".join(methods)})
        else:
            request = Request(method, path, query, headers, bytes(body))
            try:
                response = await methods[method](request)
                if not isinstance(response, Response):
                    raise TypeError(f"the handler returned {type(response).__name__}, not a Response")
            except Exception:
                log.exception("HTTP handler failed", extra={"method": method, "path": path})
                response = _error(500)
        await self._send(connection, response, head=method == "HEAD")

    async def _send(self, connection: _Connection, response: Response, *, head: bool) -> None:
        """Send ``response`` (only its head for a HEAD request); ``Connection: close`` when stopping."""
        conn = connection.h11
        status = response.status
        no_body = status in (204, 304)
        headers = (
            [] if no_body else [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
        )
        headers.extend(response.headers.items())
        if self._stopping:
            headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if response.body and not (head or no_body):
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self._write(connection, data)

    async def _write(self, connection: _Connection, data: bytes | None) -> None:
        if data:
            connection.writer.write(data)
            async with asyncio.timeout(_IO_TIMEOUT):  # a client that does not read is dropped
                await connection.writer.drain()

    async def _close(self, connection: _Connection, linger: bool) -> None:
        """Close cleanly: flush what was written; with ``linger``, first read and discard what the
        client still sends (its unread request), so the kernel does not answer it with a reset."""
        reader, writer = connection.reader, connection.writer
        if linger and writer.can_write_eof():
            writer.write_eof()
            try:
                async with asyncio.timeout(_LINGER):
                    while await reader.read(_READ_SIZE):
                        pass
            except (TimeoutError, OSError):
                pass
        writer.close()
        async with asyncio.timeout(_IO_TIMEOUT):
            await writer.wait_closed()
