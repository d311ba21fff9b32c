"""The MES poll: GET an MES REST endpoint every ``interval``, page by page, resuming at a durable cursor.

One poll: ``GET url?<cursor_param>=<cursor>`` (no parameter before the first
cursor), then each next page (``next`` path in the body, else the ``Link`` header
with ``rel="next"``), at most ``max_pages``. Each page's events are committed
together with the cursor after that page (``SourceOutput.events(..., state=)``), so
a ``kill -9`` between pages resumes at the last committed page; ids dedupe any
overlap. The cursor after a page is taken from its last record (``cursor_field``)
or from the response (``cursor_response``).

``ETag``: the first request of a poll sends ``If-None-Match`` with the ETag the
same request got last time; ``304`` means nothing new. Failures (connection
errors, timeouts, 4xx/5xx, a body that is not JSON or has no list of records) set
the state to ``reconnecting`` with ``last_error`` and the poll is retried with
capped jittered backoff (or after the MES's ``Retry-After`` on 429/503), never a
crash. A record that does not fit (bad CloudEvent, missing mapped field) is not
silently dropped: it is logged with its page, index and path, counted in
``status.info["rejected_records"]`` and shown in ``status.degraded`` until a poll
without rejections; the cursor moves past it so one bad record does not stop
the feed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from agent.backoff import Backoff
from agent.config_types import BuildContext, read_secret
from agent.events import CloudEvent, identifier_string
from agent.health import ComponentStatus
from agent.source import SourceError, SourceOutput
from protocols.mes import MesSourceConfig, parse_path
from protocols.mes.ingest import InvalidRequest, build_events, decode_events
from protocols.mes.mapping import CompiledMapping, lookup, value_at

log = logging.getLogger(__name__)

_MISSING_LIST = "the response has no list of records at {path}"


class PollError(Exception):
    """One poll failed (the MES answered an error, or something that is not a page of records)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class MesPollSource:
    """Polls the MES REST endpoint (see the module docstring)."""

    kind = "mes"

    def __init__(self, config: MesSourceConfig, context: BuildContext):
        assert config.url is not None  # the config model requires it in poll mode
        self.config = config
        self.name = config.name
        self.url = config.url
        self.status = ComponentStatus(name=config.name, kind=self.kind)
        self.status.info["mode"] = "poll"
        bearer_file = context.resolve(config.bearer_token_file) if config.bearer_token_file else None
        inline = config.bearer_token.get_secret_value() if config.bearer_token else None
        self._bearer = read_secret(bearer_file, inline, key="bearer_token")
        password_file = context.resolve(config.password_file) if config.password_file else None
        password = config.password.get_secret_value() if config.password else None
        self._password = read_secret(password_file, password, key="password")
        ca_file = context.resolve(config.ca_file) if config.ca_file is not None else None
        try:
            self._verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ca_file: cannot load {ca_file}: {exc}") from exc
        self._verify.minimum_version = ssl.TLSVersion.TLSv1_2
        self._mapping = (
            CompiledMapping(config.mapping, config.mappings[config.mapping], source_name=config.name, site=context.site)
            if config.mapping is not None
            else None
        )
        self._site = context.site
        self._records = parse_path(config.records)
        self._cursor_field = parse_path(config.cursor_field) if config.cursor_field else None
        self._cursor_response = parse_path(config.cursor_response) if config.cursor_response else None
        self._next = parse_path(config.next) if config.next else None
        self._etag: tuple[str, str] | None = None  # (first request URL, its ETag)
        self.cursor: str | None = None
        """The committed cursor (what the next poll asks from)."""
        self.pages = 0
        """Pages committed since start."""
        self.rejected_records = 0
        self._rejected_this_poll = 0

    def tags(self) -> Sequence[str]:
        """The MES sends events, not tag values."""
        return ()

    async def write(self, tag: str, value: Any) -> None:
        """Nothing to write to: the MES has no tags."""
        raise SourceError(f"{self.name}: the MES source has no tag {tag!r} to write")

    async def run(self, output: SourceOutput) -> None:
        """Poll every ``interval`` until cancelled; back off after a failed poll."""
        config = self.config
        self.cursor = await output.load_state("cursor") or config.initial_cursor
        cap = config.max_backoff
        backoff = Backoff(base=min(1.0, cap), cap=cap, minimum=min(0.2, cap))
        headers = {"Accept": "application/json"}
        if self._bearer:
            headers["Authorization"] = f"Bearer {self._bearer}"
        auth = httpx.BasicAuth(config.username, self._password or "") if config.username else None
        extra = {"source": self.name, "url": self.url}
        failures = 0
        try:
            async with httpx.AsyncClient(
                timeout=config.timeout, verify=self._verify, auth=auth, headers=headers, follow_redirects=True
            ) as client:
                while True:
                    try:
                        await self._poll(client, output)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # an MES that is away or answers garbage: retry, never fatal
                        error = _describe(exc)
                        if failures == 0:
                            expected = isinstance(exc, httpx.HTTPError | PollError | OSError | TimeoutError)
                            log.warning(
                                "MES poll failed; retrying with backoff",
                                extra={**extra, "error": error, "cursor": self.cursor},
                                exc_info=None if expected else exc,
                            )
                        else:
                            log.debug("MES poll failed again", extra={**extra, "error": error, "attempt": failures})
                        failures += 1
                        self.status.set_state("reconnecting", error)
                        hint = exc.retry_after if isinstance(exc, PollError) else None
                        delay = min(hint, config.max_backoff) if hint is not None else backoff.next_delay()
                        await asyncio.sleep(delay)
                        continue
                    if failures:
                        log.info("MES poll working again", extra={**extra, "attempts": failures})
                    failures = 0
                    backoff.reset()
                    self.status.set_state("connected")
                    await asyncio.sleep(config.interval)
        finally:
            self.status.set_state("stopped")

    async def _poll(self, client: httpx.AsyncClient, output: SourceOutput) -> None:
        """One poll: every page from the committed cursor, each committed with the cursor after it."""
        config = self.config
        params = {config.cursor_param: self.cursor} if self.cursor is not None else {}
        request = httpx.URL(self.url).copy_merge_params(params)
        first_url = str(request)
        self._rejected_this_poll = 0
        for page in range(config.max_pages):
            headers = {}
            if page == 0 and self._etag is not None and self._etag[0] == first_url:
                headers["If-None-Match"] = self._etag[1]
            response = await client.get(request, headers=headers)
            if response.status_code == 304:
                break
            if not response.is_success:
                raise PollError(f"HTTP {response.status_code} from {request}", _retry_after(response))
            try:
                body = msgspec.json.decode(response.content)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise PollError(f"the response from {request} is not JSON: {exc}") from None
            records = lookup(body, self._records)
            if not isinstance(records, list):
                raise PollError(_MISSING_LIST.format(path=config.records) + f" ({request})")
            events = self._events(records, str(request))
            cursor = self._cursor_after(body, records)
            changed = cursor is not None and cursor != self.cursor
            if events or changed:
                await output.events(events, state={"cursor": cursor} if changed else None)
            if changed:
                self.cursor = cursor
            self.pages += 1
            self.status.info["pages"] = str(self.pages)
            if self.cursor is not None:
                self.status.info["cursor"] = self.cursor
            if page == 0 and "etag" in response.headers:
                self._etag = (first_url, response.headers["etag"])
            link = self._next_link(body, response)
            if link is None:
                break
            request = response.url.join(link)
        else:
            log.warning(
                "MES poll stopped after max_pages; the rest follows at the next poll",
                extra={"source": self.name, "max_pages": config.max_pages, "cursor": self.cursor},
            )
        if self._rejected_this_poll == 0:
            self.status.degraded.pop("records", None)

    def _events(self, records: list[Any], page: str) -> list[CloudEvent]:
        """The page's records as events; records that do not fit are logged and counted, not dropped silently."""
        received = datetime.now(UTC)
        problems: list[tuple[int | None, str, str]] = []
        if self._mapping is not None:
            events, errors = self._mapping.events(records, received=received)
            problems = [(e.index, e.field, e.message) for e in errors]
        else:
            events = []
            for position, record in enumerate(records):
                try:
                    body = msgspec.json.encode(record)
                    events.extend(build_events(decode_events(body, batch=False), site=self._site))
                except InvalidRequest as exc:
                    first = exc.errors[0] if exc.errors else None
                    problems.append((position, first.field if first else "$", first.message if first else exc.message))
        if problems:
            where, field, message = problems[0]
            self.rejected_records += len(problems)
            self._rejected_this_poll += len(problems)
            self.status.info["rejected_records"] = str(self.rejected_records)
            self.status.degraded["records"] = (
                f"{len(problems)} record(s) rejected on {page}: [{where}] {field}: {message}"
            )
            log.error(
                "MES records rejected; not stored",
                extra={
                    "source": self.name,
                    "page": page,
                    "rejected": len(problems),
                    "index": where,
                    "field": field,
                    "error": message,
                    "record": _excerpt(records[where] if isinstance(where, int) else None),
                },
            )
        return events

    def _cursor_after(self, body: Any, records: list[Any]) -> str | None:
        found: Any = None
        if self._cursor_field is not None and records:
            found = value_at(records[-1], self._cursor_field)
        elif self._cursor_response is not None:
            found = value_at(body, self._cursor_response)
        if found is None or isinstance(found, dict | list):
            return self.cursor
        return identifier_string(found)

    def _next_link(self, body: Any, response: httpx.Response) -> str | None:
        if self._next is not None:
            found = value_at(body, self._next)
            return found if isinstance(found, str) and found else None
        link = response.links.get("next")
        return link.get("url") if link else None


def _retry_after(response: httpx.Response) -> float | None:
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and not isinstance(exc, PollError) else (text or type(exc).__name__)


def _excerpt(record: Any, limit: int = 200) -> str:
    text = msgspec.json.encode(record).decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "..."

