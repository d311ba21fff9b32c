"""The HTTPS sink (``HttpsSink``), built by ``protocols.https.HttpsSinkConfig``; the wire mapping is there.

One ``httpx.AsyncClient`` lives as long as the sink: connections are kept alive
and HTTP/2 is offered (ALPN), HTTP/1.1 used when the server does not take it; the
version in use shows in ``status.info["http_version"]``. httpx costs about 0.7 ms
of CPU per request whatever the body, so throughput comes from batches (one
request per ``deliver``), not from concurrent requests. The request body is the
buffer's encoded events joined into a JSON array: nothing is encoded twice.

Outcomes per answer (see also ``retry_after``); every ``RetryLater`` carries a
``reason`` for the journal's attempt status (``HTTP 503``, ``timeout``,
``connection refused``, ...):

- 2xx, 409: every event ``ACKED``; a 2xx whose JSON body has ``"references"``
  (an object ``{event id: reference}`` or a list of ``{"id", "reference"}``)
  gives ``Delivered(reference=...)`` for the events it names (the delivery
  journal keeps the reference); any other body is ignored;
- 429, 503: ``RetryLater(after=Retry-After)`` (seconds or an HTTP date); without
  the header the agent's own backoff;
- other 5xx, timeouts, connection and TLS errors: ``RetryLater`` with no hint, so the
  agent's delivery loop waits its capped (5 s), fully jittered exponential backoff.
  A kept-alive connection that the server closed just as it was reused (no answer,
  reset, closed while writing) is retried once at once on a new connection first;
- 400, 422, 413: the batch is split in halves, recursively, within the same call
  (left half first) until the refused events are single: those are ``Rejected``
  with ``"HTTP 422: <body>"`` (at most 1 KiB), the rest ``ACKED``. When a left half
  is accepted whole, its right sibling is known to hold the refusal and is split
  without being sent as a whole; a single event inferred this way carries the body
  of the smallest refused batch that held it. Isolating one poison event in 500
  takes 10-17 requests (bench ``https``). A retryable answer during the split ends the call:
  what was acknowledged stays ``ACKED``, everything after it ``RETRY`` (in order);
- 401, 403: with OAuth2 the token is fetched anew and the request repeated, once
  per ``deliver``; otherwise (and if that fails too) ``RETRY`` and state
  ``unauthorized``, never a dead letter;
- any other status (a wrong url: 404, 405, a redirect): ``RETRY``, state
  ``disconnected`` with the status as ``last_error``: a misconfiguration must not
  turn the backlog into dead letters.

``status.info``: ``http_version`` (``HTTP/1.1`` or ``HTTP/2``), ``requests`` (POSTs sent),
``last_status``, and ``oauth2_tokens_fetched`` or ``token_file_rotations``.

State: ``starting`` until the receiver answered once (``run()`` sends an
``OPTIONS`` request at start and after connection errors, so monitoring sees a
reachable receiver without waiting for traffic), ``connected`` after any answer
that shows the receiver works, ``reconnecting`` after connection errors, timeouts
and 5xx, ``unauthorized``, ``disconnected`` (see above), ``stopped``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple

import anyio
import httpx
import msgspec

from agent.backoff import Backoff
from agent.config_types import BuildContext
from agent.events import Lane
from agent.health import ComponentStatus, ConnectionState
from agent.sink import ACKED, RETRY, BufferedEvent, Delivered, Outcome, Rejected, RetryLater
from protocols.https import HttpsSinkConfig, tls_context
from protocols.https.oauth2 import ClientCredentials, FileToken, TokenUnavailable, describe_error

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/cloudevents-batch+json"
REASON_MAX = 1024
"""A dead letter's reason holds at most this many bytes of the receiver's answer."""
_REFUSED = frozenset({400, 413, 422})
_THROTTLED = frozenset({429, 503})
_PROBE_BACKOFF_CAP = 5.0
# What a request can raise for connection trouble. httpx wraps most of it in HTTPError, but a
# server closing the connection while an HTTP/2 request is written surfaces as anyio's own
# stream errors (httpcore does not map them on that path).
_TRANSPORT_ERRORS = (httpx.HTTPError, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_STALE_CONNECTION = (
    httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, anyio.EndOfStream, anyio.BrokenResourceError
)
# httpx logs a line per request at INFO, and the HTTP/2 header codec (hpack) logs every header,
# the Authorization header included, at DEBUG: held at WARNING whatever the agent's log level.
_QUIET_LOGGERS = ("httpx", "httpcore", "h2", "hpack")


class _Answer(NamedTuple):
    """What one request told us about the events it carried."""

    kind: Literal["acked", "refused", "retry"]
    reason: str = ""
    retry: RetryLater = RETRY
    references: dict[str, str] | None = None  # event id -> the receiver's reference (a 2xx's "references")


_ACKED_ANSWER = _Answer("acked")


class HttpsSink:
    """POSTs batches of buffered events to one receiver; see the module docstring for the contract.

    Never raises for receiver trouble: ``deliver`` answers per event and ``status``
    says what is wrong.
    """

    def __init__(self, config: HttpsSinkConfig, context: BuildContext) -> None:
        self.config = config
        self.name = config.name
        self.url = config.url
        self._shown_url = config.shown_url
        self.lanes: frozenset[Lane] = frozenset(config.lanes)
        self.batch_max = config.batch_max
        self.status = ComponentStatus(name=config.name, kind="https")
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self._verify = config.ssl_context(context)
        self._user_agent = f"plantgate/{context.version}"
        self._file_token = FileToken(context.resolve(config.bearer_token_file)) if config.bearer_token_file else None
        self._env_token = config.bearer_token.get_secret_value() if config.bearer_token else None
        self._oauth: ClientCredentials | None = None
        if config.oauth2 is not None:
            o = config.oauth2
            verify = self._verify
            if o.ca_file is not None:
                try:
                    verify = tls_context(context.resolve(o.ca_file), None, None)
                except ValueError as exc:
                    raise ValueError(f"oauth2.{exc}") from exc
            elif config.cert_file is not None:
                # The token endpoint gets the receiver's CAs, not the client certificate meant for the receiver.
                verify = tls_context(context.resolve(config.ca_file) if config.ca_file else None, None, None)
            self._oauth = ClientCredentials(
                o,
                secret_file=context.resolve(o.client_secret_file) if o.client_secret_file else None,
                verify=verify,
                timeout=config.timeout,
                user_agent=self._user_agent,
            )
        self._client: httpx.AsyncClient | None = None
        self._unreachable = asyncio.Event()
        self._unreachable.set()  # nothing known yet: run() probes
        self.requests = 0
        """POST requests sent (each ``deliver`` is one, plus one per half while splitting a refused batch)."""
        self.refused_requests = 0
        """POST requests answered 400/413/422."""

    # --- lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Probe the receiver at start and after connection errors; close the client when cancelled."""
        backoff = Backoff(base=0.2, cap=_PROBE_BACKOFF_CAP)
        try:
            while True:
                await self._unreachable.wait()
                if await self._probe():
                    backoff.reset()
                    self._unreachable.clear()
                    await self._warm_token()
                else:
                    await asyncio.sleep(backoff.next_delay())
        finally:
            self.status.set_state("stopped")
            client, self._client = self._client, None
            if client is not None:
                await client.aclose()
            if self._oauth is not None:
                await self._oauth.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            config = self.config
            self._client = httpx.AsyncClient(
                verify=self._verify,
                http2=config.http2,
                timeout=httpx.Timeout(config.timeout),
                # One deliver at a time plus the probe: a couple of connections are all we use.
                limits=httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=60.0),
                headers={"user-agent": self._user_agent},
                follow_redirects=False,  # a redirect is a misconfigured url, not something to follow with events
            )
        return self._client

    async def _probe(self) -> bool:
        """Any HTTP answer to ``OPTIONS url`` shows the receiver reachable (TCP, TLS, HTTP)."""
        try:
            response = await self._http().request("OPTIONS", self.url)
        except _TRANSPORT_ERRORS as exc:
            self._set_state("reconnecting", f"{self._shown_url}: {describe_error(exc)}")
            return False
        self.status.info["http_version"] = response.http_version
        if self.status.state in ("starting", "reconnecting"):
            self._set_state("connected")
        return True

    async def _warm_token(self) -> None:
        if self._oauth is None:
            return
        try:
            await self._oauth.token()
        except TokenUnavailable as exc:
            self._set_state("unauthorized", str(exc))

    # --- delivery --------------------------------------------------------------------------------------

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        """POST ``batch`` as one JSON array; split it on 400/422 to find the refused events."""
        if not batch:
            return []
        outcomes: list[Outcome] = [RETRY] * len(batch)
        bodies = [event.body for event in batch]
        attempt = _Attempt([event.id for event in batch])
        await self._settle(bodies, 0, len(batch), outcomes, None, attempt)
        return outcomes

    async def _settle(
        self,
        bodies: list[bytes],
        lo: int,
        hi: int,
        outcomes: list[Outcome],
        refusal: str | None,
        attempt: _Attempt,
    ) -> bool:
        """Settle ``bodies[lo:hi]``; False when a retryable answer ended the call (the rest stays RETRY).

        ``refusal`` is set when this range is already known to be refused (its parent
        was, and the parent's left half was accepted whole).
        """
        if refusal is None:
            answer = await self._post(bodies, lo, hi, attempt)
            if answer.kind == "acked":
                outcomes[lo:hi] = [ACKED] * (hi - lo)
                if answer.references:
                    references, ids = answer.references, attempt.ids
                    for index in range(lo, hi):
                        reference = references.get(ids[index])
                        if reference is not None:
                            outcomes[index] = Delivered(reference=reference)
                return True
            if answer.kind == "retry":
                outcomes[lo:] = [answer.retry] * (len(outcomes) - lo)
                return False
            refusal = answer.reason
        if hi - lo == 1:
            outcomes[lo] = Rejected(refusal)
            return True
        mid = (lo + hi) // 2
        if not await self._settle(bodies, lo, mid, outcomes, None, attempt):
            return False
        left_accepted = all(outcomes[i] is ACKED or type(outcomes[i]) is Delivered for i in range(lo, mid))
        return await self._settle(bodies, mid, hi, outcomes, refusal if left_accepted else None, attempt)

    async def _post(self, bodies: list[bytes], lo: int, hi: int, attempt: _Attempt) -> _Answer:
        try:
            token = await self._bearer()
        except TokenUnavailable as exc:
            self._set_state("unauthorized", str(exc))
            return _Answer("retry", retry=RetryLater(after=exc.retry_after, reason="no token"))
        content = b"[" + b",".join(bodies[lo:hi]) + b"]"
        headers = {"content-type": CONTENT_TYPE}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        client = self._http()
        try:
            try:
                response = await client.post(self.url, content=content, headers=headers)
            except _STALE_CONNECTION:
                # A kept-alive connection the server closed as we reused it: one new connection at once
                # (the events carry their ids, so a batch the server did take is deduplicated there).
                response = await client.post(self.url, content=content, headers=headers)
        except _TRANSPORT_ERRORS as exc:
            self._set_state("reconnecting", f"{self._shown_url}: {describe_error(exc)}")
            self._unreachable.set()
            return _Answer("retry", retry=RetryLater(reason=_transport_reason(exc)))
        self.requests += 1
        status = response.status_code
        info = self.status.info
        info["http_version"] = response.http_version
        info["last_status"] = str(status)
        info["requests"] = str(self.requests)
        if 200 <= status < 300:
            self._set_state("connected")
            references = _references(response.content)
            return _ACKED_ANSWER if references is None else _Answer("acked", references=references)
        if status == 409:
            self._set_state("connected")
            return _ACKED_ANSWER
        if status in _REFUSED:
            self.refused_requests += 1
            self._set_state("connected")
            return _Answer("refused", reason=_reason(response))
        if status in (401, 403):
            if self._oauth is not None and token is not None and not attempt.refreshed:
                attempt.refreshed = True  # once per deliver: a token the receiver keeps refusing is not a loop
                self._oauth.invalidate(token)
                return await self._post(bodies, lo, hi, attempt)
            how = "OAuth2 token" if self._oauth is not None else "bearer token" if token else "no credentials"
            self._set_state("unauthorized", f"HTTP {status} from {self._shown_url} ({how} refused)")
            return _Answer("retry", retry=RetryLater(reason=f"HTTP {status}"))
        if status in _THROTTLED:
            after = retry_after(response.headers.get("retry-after"))
            hint = f", Retry-After {after:g} s" if after is not None else ""
            state: ConnectionState = "connected" if status == 429 else "reconnecting"
            self._set_state(state, f"HTTP {status} from {self._shown_url}{hint}")
            return _Answer("retry", retry=RetryLater(after=after, reason=f"HTTP {status}"))
        if status >= 500:
            self._set_state("reconnecting", f"HTTP {status} from {self._shown_url}")
            return _Answer("retry", retry=RetryLater(reason=f"HTTP {status}"))
        where = f"HTTP {status} from {self._shown_url}"
        self._set_state("disconnected", f"{where}: the receiver takes no events here; check url")
        return _Answer("retry", retry=RetryLater(reason=f"HTTP {status}"))

    async def _bearer(self) -> str | None:
        if self._oauth is not None:
            token = await self._oauth.token()
            self.status.info["oauth2_tokens_fetched"] = str(self._oauth.fetched)
            return token
        if self._file_token is not None:
            token = self._file_token.token()
            self.status.info["token_file_rotations"] = str(self._file_token.rotations)
            return token
        return self._env_token

    def _set_state(self, state: ConnectionState, error: str | None = None) -> None:
        """Move to ``state``; one log line per change of state, never per request."""
        status = self.status
        before = status.state
        status.set_state(state, error)
        if state == before:
            return
        if state == "connected":
            if before != "starting":
                log.info("HTTPS receiver accepts events again", extra={"sink": self.name, "url": self._shown_url})
        elif state == "unauthorized":
            log.error(
                "HTTPS receiver refuses our credentials; events are kept and retried",
                extra={"sink": self.name, "url": self._shown_url, "error": error},
            )
        else:
            log.warning(
                "HTTPS receiver not accepting events; retrying",
                extra={"sink": self.name, "url": self._shown_url, "state": state, "error": error},
            )


class _Attempt:
    """One ``deliver`` call: its events' ids, and what it already tried (the OAuth2 refresh on 401, once)."""

    __slots__ = ("ids", "refreshed")

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.refreshed = False


_references_decoder = msgspec.json.Decoder()


def _references(content: bytes) -> dict[str, str] | None:
    """The receiver's references from a 2xx body ``{"references": ...}``: an object ``{event id: reference}``
    or a list of ``{"id": ..., "reference": ...}``; None for any other body (most receivers send none)."""
    if b'"references"' not in content:  # the common case costs a byte search, not a decode
        return None
    try:
        body = _references_decoder.decode(content)
    except msgspec.DecodeError:
        return None
    found = body.get("references") if isinstance(body, dict) else None
    references: dict[str, str] = {}
    if isinstance(found, dict):
        for key, value in found.items():
            if isinstance(value, str | int) and not isinstance(value, bool):
                references[key] = str(value)
    elif isinstance(found, list):
        for item in found:
            if isinstance(item, dict):
                key, value = item.get("id"), item.get("reference")
                if isinstance(key, str) and isinstance(value, str | int) and not isinstance(value, bool):
                    references[key] = str(value)
    return references or None


def _transport_reason(exc: BaseException) -> str:
    """A short attempt status for the journal: ``timeout``, ``connection refused``, else the error's description."""
    cause: BaseException | None = exc
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, httpx.TimeoutException | TimeoutError):
            return "timeout"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    return describe_error(exc)


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After``: delay-seconds or an HTTP date; None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _reason(response: httpx.Response) -> str:
    """``"HTTP 422: <body>"``, the body cut to ``REASON_MAX`` bytes (dead letters keep it)."""
    body = response.content[:REASON_MAX].decode("utf-8", errors="replace")
    return f"HTTP {response.status_code}: {body}" if body else f"HTTP {response.status_code}"
