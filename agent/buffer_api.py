"""The running agent's buffer admin endpoints: what ``plantgate buffer`` asks a live agent.

``GET /v1/buffer/stats``, ``GET /v1/buffer/dead-letters``, ``POST /v1/buffer/replay``
and ``POST /v1/buffer/purge`` run the same ``BufferAdmin`` the CLI runs on a stopped
agent's file, here on the agent's open buffer, so sequence numbers, cursors and the
dedupe set stay consistent.

Access: with ``[http].ingest_token_file`` every endpoint needs that bearer token.
Without one they answer only on a loopback listen address (the CLI on the same host);
on any other address they refuse with 403 rather than let anyone purge the backlog.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.events import Lane
from agent.http_server import check_bearer, json_response, parse_listen, read_token_file
from agent.rules import map_event
from agent.settings import MappingsSection, Settings
from buffer import Buffer
from buffer.admin import BufferAdmin

log = logging.getLogger(__name__)

PATHS = ("/v1/buffer/stats", "/v1/buffer/dead-letters", "/v1/buffer/replay", "/v1/buffer/purge")


def buffer_routes(
    settings: Settings,
    buffer: Buffer,
    sinks: Mapping[str, Iterable[Lane]],
    mappings: Callable[[], MappingsSection] | None = None,
) -> list[Route]:
    """The four admin routes on ``buffer`` for the configured ``sinks`` (name -> lanes).

    A replay maps through ``mappings()`` at the time of the request (the agent's
    current ``[mappings]``, reloaded on SIGHUP), else through the settings' own.
    """
    current = mappings or (lambda: settings.mappings)

    def remap(event: dict[str, Any]) -> dict[str, Any]:
        return map_event(current(), event)

    admin = BufferAdmin(buffer, sinks=sinks, remap=remap)
    token_file = settings.http.ingest_token_file
    token = read_token_file(settings.data_path(token_file)) if token_file is not None else None
    loopback = _is_loopback(settings.http.listen)

    async def handle(request: Request) -> Response:
        if token is not None:
            check_bearer(request, token)
        elif not loopback:
            return json_response(
                {"error": "buffer administration needs [http].ingest_token_file on a non-loopback listen address"},
                status=403,
            )
        path = request.url.path
        status, answer = await admin.handle(request.method, path, request.query_params, await request.body())
        if request.method == "POST" and status == 200:
            remote = request.client.host if request.client is not None else None
            log.warning("Buffer changed by an operator", extra={"path": path, "remote": remote, "result": answer})
        return json_response(answer, status=status)

    # GET (and HEAD) and POST reach BufferAdmin, which answers 405 for the wrong one on a path.
    return [Route(path, handle, methods=["GET", "POST"]) for path in PATHS]


def _is_loopback(listen: str) -> bool:
    host, _ = parse_listen(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
