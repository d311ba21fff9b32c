"""A real HTTPS receiver for CloudEvents batches on loopback, with scripted behaviours, and an OAuth2 token endpoint.

``HttpsReceiver`` serves a Starlette app with hypercorn (HTTP/2 and HTTP/1.1 over
TLS with ALPN, certificates from a trustme CA) on its own thread and event loop,
so a test can stop it synchronously (an outage) and start it again on the same
port. Routes: ``POST /events`` (the sink's url; ``OPTIONS`` answers 204) and
``POST /token`` (an OAuth2 client-credentials token endpoint, RFC 6749 4.4).

Behaviours a test sets on the receiver:

- ``script(status, times, headers)``: the next ``times`` event requests get
  ``status`` (a 503 storm, 429 with ``Retry-After``), before anything else is looked at;
- events whose ``data.poison`` is true make the whole request 422 with a JSON body
  naming them (``{"rejected": [ids]}``); nothing of a refused request is stored;
- ``accept_status``: what a good batch gets (200 by default; 409 "already there");
- ``bearer_token``: 401 unless ``Authorization: Bearer <it>``;
  ``issuer``: 401 unless the bearer token is one this (or another) receiver's token
  endpoint issued and has not expired or been revoked;
- ``require_client_cert``: the TLS handshake needs a client certificate signed by the CA.

Everything it saw is kept: ``events`` (accepted, in order), ``requests`` (one
``Seen`` per event request), ``tokens_issued``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Seen:
    """One request to ``/events`` as the receiver saw it."""

    status: int
    count: int
    http_version: str
    authorization: str | None
    content_type: str | None
    ids: list[str]


@dataclass
class Certificates:
    """A trustme CA, a server certificate for 127.0.0.1/localhost and a client certificate, as files."""

    directory: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        client = self.ca.issue_cert("plantgate-client@example.com")
        self.ca_file = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_cert = self.directory / "server.pem"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(str(self.server_cert), append=True)
        self.server_key = self.directory / "server.key"
        server.private_key_pem.write_to_path(str(self.server_key))
        self.client_cert = self.directory / "client.pem"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        self.client_key = self.directory / "client.key"
        client.private_key_pem.write_to_path(str(self.client_key))


class TokenIssuer:
    """The token endpoint's memory: which tokens it issued and until when they hold."""

    def __init__(self, client_id: str, client_secret: str, expires_in: float = 300.0) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self._lock = threading.Lock()
        self._valid: dict[str, float] = {}
        self.issued: list[str] = []
        self.issued_at: list[float] = []
        """When each token was issued (``time.monotonic()``)."""
        self.refused = 0
        self.fail_next = 0
        """The next this many token requests are answered 503."""

    def valid(self, token: str) -> bool:
        with self._lock:
            until = self._valid.get(token)
            return until is not None and time.monotonic() < until

    def revoke_all(self) -> None:
        """Every issued token stops being accepted (the receiver answers 401)."""
        with self._lock:
            self._valid.clear()

    async def endpoint(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
            if form.get("grant_type") != "client_credentials":
                return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
            if client_id != self.client_id or secret != self.client_secret:
                self.refused += 1
                return JSONResponse({"error": "invalid_client", "error_description": "bad secret"}, status_code=401)
            token = f"tok-{len(self.issued) + 1}-{time.monotonic_ns()}"
            self.issued.append(token)
            self.issued_at.append(time.monotonic())
            self._valid[token] = time.monotonic() + self.expires_in
        body = {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        return JSONResponse(body, headers={"cache-control": "no-store"})


class HttpsReceiver:
    """The receiver (see the module docstring); ``start()``/``stop()`` are synchronous, the server has its thread."""

    def __init__(
        self,
        certs: Certificates | None,
        *,
        require_client_cert: bool = False,
        http2: bool = True,
        issuer: TokenIssuer | None = None,
        token_issuer: TokenIssuer | None = None,
    ) -> None:
        self.certs = certs
        self.require_client_cert = require_client_cert
        self.http2 = http2
        self.issuer = issuer
        """Event requests need a token this issuer holds valid."""
        self.token_issuer = token_issuer
        """Serve ``POST /token`` from this issuer."""
        self.port = free_port()
        self.bearer_token: str | None = None
        self.accept_status = 200
        self._lock = threading.Lock()
        self._script: deque[tuple[int, dict[str, str]]] = deque()
        self.events: list[dict[str, Any]] = []
        self.requests: list[Seen] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        routes = [Route("/events", self._events, methods=["POST", "OPTIONS"])]
        if token_issuer is not None:
            routes.append(Route("/token", token_issuer.endpoint, methods=["POST"]))
        self.app = Starlette(routes=routes)

    @property
    def url(self) -> str:
        scheme = "https" if self.certs is not None else "http"
        return f"{scheme}://{HOST}:{self.port}/events"

    @property
    def token_url(self) -> str:
        scheme = "https" if self.certs is not None else "http"
        return f"{scheme}://{HOST}:{self.port}/token"

    # --- behaviours ---------------------------------------------------------------------------------------

    def script(self, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """The next ``times`` event requests are answered ``status`` (with ``headers``)."""
        with self._lock:
            self._script.extend([(status, headers or {})] * times)

    def ids(self) -> list[str]:
        """Ids of the accepted events, in arrival order (repeats included)."""
        with self._lock:
            return [event["id"] for event in self.events]

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self.requests)

    # --- the app ------------------------------------------------------------------------------------------

    async def _events(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"allow": "POST, OPTIONS"})
        body = await request.body()
        version = request.scope.get("http_version", "?")
        authorization = request.headers.get("authorization")
        try:
            events = json.loads(body)
        except ValueError:
            events = None
        ids = [e.get("id") for e in events] if isinstance(events, list) else []
        status, headers, answer = self._decide(authorization, request.headers.get("content-type"), events)
        with self._lock:
            self.requests.append(
                Seen(status, len(ids), version, authorization, request.headers.get("content-type"), ids)
            )
            if status in (200, 201, 202, 204):
                self.events.extend(events)
        return JSONResponse(answer, status_code=status, headers=headers)

    def _decide(
        self, authorization: str | None, content_type: str | None, events: Any
    ) -> tuple[int, dict[str, str], Any]:
        token = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
        if self.bearer_token is not None and token != self.bearer_token:
            return 401, {"www-authenticate": "Bearer"}, {"error": "invalid_token"}
        if self.issuer is not None and (token is None or not self.issuer.valid(token)):
            return 401, {"www-authenticate": 'Bearer error="invalid_token"'}, {"error": "invalid_token"}
        with self._lock:
            scripted = self._script.popleft() if self._script else None
        if scripted is not None:
            return scripted[0], scripted[1], {"scripted": scripted[0]}
        if content_type != "application/cloudevents-batch+json":
            return 415, {}, {"error": f"content type {content_type}"}
        if not isinstance(events, list) or not all(isinstance(e, dict) and "id" in e for e in events):
            return 400, {}, {"error": "not a JSON array of events"}
        poison = [e["id"] for e in events if isinstance(e.get("data"), dict) and e["data"].get("poison")]
        if poison:
            return 422, {}, {"rejected": poison, "error": "poison events"}
        return self.accept_status, {}, {"accepted": len(events)}

    # --- lifecycle ----------------------------------------------------------------------------------------

    def _config(self) -> Config:
        config = Config()
        config.bind = [f"{HOST}:{self.port}"]
        config.errorlog = None
        config.accesslog = None
        config.graceful_timeout = 0.5
        if self.certs is not None:
            config.certfile = str(self.certs.server_cert)
            config.keyfile = str(self.certs.server_key)
            config.alpn_protocols = ["h2", "http/1.1"] if self.http2 else ["http/1.1"]
            if self.require_client_cert:
                config.ca_certs = str(self.certs.ca_file)
                config.verify_mode = ssl.CERT_REQUIRED
        return config

    def start(self) -> HttpsReceiver:
        """Serve until ``stop()``; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the receiver is already running")
        ready = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            async def serving() -> None:
                self._loop = asyncio.get_running_loop()
                self._shutdown = asyncio.Event()
                task = asyncio.create_task(serve(self.app, self._config(), shutdown_trigger=self._shutdown.wait))
                deadline = time.monotonic() + 10
                # hypercorn has no "listening" signal: poll the port, bounded by the deadline
                while not task.done() and not _accepts(self.port) and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                ready.set()
                await task

            try:
                asyncio.run(serving())
            except BaseException as exc:
                failed.append(exc)
                ready.set()

        self._thread = threading.Thread(target=main, name=f"https-receiver-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failed:
            raise RuntimeError(f"HTTPS receiver did not start on port {self.port}: {failed}")
        return self

    def stop(self) -> None:
        """Close the listener and every connection; the port refuses connections when this returns.

        A TLS connection closes with an exchange of close_notify: when the client's event
        loop is the caller's (a test stopping the receiver under a live sink), that exchange
        can only finish after this returns, so the server's thread is left to end on its own
        once the listener is closed.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._shutdown is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._shutdown.set)
        thread.join(1.0)
        deadline = time.monotonic() + 10
        while _accepts(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTPS receiver still listening on {self.port} 10 s after stop")
            time.sleep(0.01)  # pacing the poll of a condition that has a deadline

    def __enter__(self) -> HttpsReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False
