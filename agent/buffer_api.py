"""The running agent's buffer admin endpoints: what ``plantgate buffer`` asks a live agent.

``GET /v1/buffer/stats``, ``GET /v1/buffer/dead-letters``, ``POST /v1/buffer/replay``
and ``POST /v1/buffer/purge`` run the same ``BufferAdmin`` the CLI runs on a stopped
agent's file, here on the agent's open buffer, so sequence numbers, cursors and the
dedupe set stay consistent.

Access (``OperatorAccess``): what changes the buffer (replay, purge) needs the admin
token of ``[http].admin_token_file`` when one is configured, and then the ingest token
is refused for it: the MES that holds the ingest token can post events but not purge
the backlog. Without an admin token the ingest token serves, as before. Reading
(stats, dead letters) takes either token. With no token configured at all the
endpoints answer only on a loopback listen address (the CLI on the same host); on any
other address they refuse with 403 rather than let anyone purge the backlog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.events import Lane
from agent.http_server import check_any_bearer, is_loopback_listen, json_response, read_token_file
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
    access = OperatorAccess.from_settings(settings)

    async def handle(request: Request) -> Response:
        refused = access.check(request, "change" if request.method == "POST" else "read")
        if refused is not None:
            return json_response({"error": refused}, status=403)
        path = request.url.path
        status, answer = await admin.handle(request.method, path, request.query_params, await request.body())
        if request.method == "POST" and status == 200:
            remote = request.client.host if request.client is not None else None
            log.warning("Buffer changed by an operator", extra={"path": path, "remote": remote, "result": answer})
        return json_response(answer, status=status)

    # GET (and HEAD) and POST reach BufferAdmin, which answers 405 for the wrong one on a path.
    return [Route(path, handle, methods=["GET", "POST"]) for path in PATHS]


class OperatorAccess:
    """Who may read and who may change the buffer over HTTP (see the module docstring).

    Built once from the settings (the token files are read at start); ``check`` raises
    ``HTTPException(401)`` for a missing or wrong bearer token and returns the reason
    for a 403 when no token is configured on a listen address beyond loopback.
    """

    def __init__(self, *, admin_token: str | None, ingest_token: str | None, loopback: bool):
        self._admin = admin_token
        self._ingest = ingest_token
        self.loopback = loopback
        """Whether the HTTP server listens on loopback only."""

    @classmethod
    def from_settings(cls, settings: Settings) -> OperatorAccess:
        """The access of ``settings``' ``[http]`` (raises ``ValueError`` naming an unreadable token file)."""
        http = settings.http
        admin = read_token_file(settings.data_path(http.admin_token_file)) if http.admin_token_file else None
        ingest = read_token_file(settings.data_path(http.ingest_token_file)) if http.ingest_token_file else None
        return cls(admin_token=admin, ingest_token=ingest, loopback=is_loopback_listen(http.listen))

    def tokens(self, action: Literal["read", "change"]) -> list[str]:
        """The bearer tokens that allow ``action`` (empty: none configured)."""
        if action == "change" and self._admin is not None:
            return [self._admin]
        return [token for token in (self._admin, self._ingest) if token is not None]

    @property
    def change_token(self) -> Literal["admin", "ingest"] | None:
        """Which token a change needs: ``"admin"``, ``"ingest"``, or None (none configured)."""
        if self._admin is not None:
            return "admin"
        return "ingest" if self._ingest is not None else None

    def check(self, request: Request, action: Literal["read", "change"]) -> str | None:
        """None when ``request`` may do ``action``; the reason to refuse it with 403 otherwise.

        Raises ``HTTPException(401)`` when a token is configured and the request lacks it.
        """
        tokens = self.tokens(action)
        if tokens:
            check_any_bearer(request, tokens)
            return None
        if not self.loopback:
            return REFUSED_BEYOND_LOOPBACK
        return None


REFUSED_BEYOND_LOOPBACK = (
    "buffer administration needs [http].admin_token_file or [http].ingest_token_file on a non-loopback listen address"
)
