"""The MES: a webhook on the agent's HTTP server, or a polled REST endpoint.

This module holds the ``[[sources.mes]]`` config model and its mapping models;
the webhook (``protocols.mes.webhook``), the poller (``protocols.mes.poll``, which
imports httpx) and the native-payload mapping (``protocols.mes.mapping``) are
imported by ``MesSourceConfig.build``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.config_types import BuildContext, ConfigModel, Duration, mask_secret
from agent.events import LANE_OF_TYPE, TYPE_PREFIX
from agent.source import Source, SourceConfig

if TYPE_CHECKING:
    from agent.preflight import Finding

__all__ = ["FieldPath", "MesMapping", "MesSourceConfig", "canonical_name", "parse_path"]

FieldPath = tuple[str | int, ...]
"""A parsed field path: object keys (str) and list indexes (int), from the root."""

_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(-?\d+)\]|\[\"([^\"]*)\"\]|\['([^']*)'\]")
_MAPPING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def parse_path(text: str) -> FieldPath:
    """``$.a.b``, ``$.items[0].x``, ``$["key with spaces"]`` -> its segments; ``$`` is the whole value.

    Raises ValueError with a hint for anything else.
    """
    value = text.strip()
    if not value.startswith("$"):
        raise ValueError(f"{text!r} is not a field path; write it as \"$.field\", \"$.a.b\" or \"$.list[0].x\"")
    segments: list[str | int] = []
    position = 1
    while position < len(value):
        match = _SEGMENT.match(value, position)
        if match is None:
            raise ValueError(
                f"{text!r} is not a field path (at character {position + 1}); "
                "write it as \"$.field\", \"$.a.b\", \"$.list[0].x\" or '$[\"odd key\"]'"
            )
        key, index, quoted, single = match.groups()
        if index is not None:
            segments.append(int(index))
        else:
            segments.append(key if key is not None else (quoted if quoted is not None else single))
        position = match.end()
    return tuple(segments)


def canonical_name(type_text: str) -> str | None:
    """The canonical type name of ``io.plantgate.X`` or of the bare ``X``; None when it is not canonical."""
    name = type_text[len(TYPE_PREFIX) :] if type_text.startswith(TYPE_PREFIX) else type_text
    return name if name in LANE_OF_TYPE else None


def _check_path(value: str | None) -> str | None:
    if value is not None:
        parse_path(value)
        return value.strip()
    return None


class MesMapping(ConfigModel):
    """``[sources.mes.mappings.<name>]``: an MES's own JSON -> one canonical event type.

    Paths point into each record (``$`` is the record); ``items`` points into the
    whole body and says where the list of records is.
    """

    type: str = Field(
        ..., description="Canonical type of the events made, e.g. \"production.completed\" (io.plantgate. optional)"
    )
    items: str | None = Field(
        None,
        description="Path of the list of records in the body (e.g. \"$.confirmations\"); without it a JSON "
        "array body is a list of records and an object body is one record",
    )
    id: str | None = Field(
        None,
        description="Path of the record's own id; the event id is derived from it (stable across MES retries). "
        "Without it the id is derived from the record's whole content",
    )
    time: str | None = Field(
        None, description="Path of when it happened (RFC 3339 / ISO 8601); without it: when the agent received it"
    )
    timezone: str = Field(
        "UTC", description="Time zone of times written without an offset (IANA name, e.g. \"Europe/Berlin\")"
    )
    subject: str | None = Field(
        None, description="Path of the business key; without it: the work_order field, else the lot field"
    )
    correlationid: str | None = Field(None, description="Path of a correlation id to keep")
    fields: dict[str, str] = Field(
        ...,
        min_length=1,
        description="data key -> path. A key named quantity or ending in _quantity becomes "
        "{\"value\": \"<decimal>\", \"uom\": ...}; identifiers (work_order, item, lot, serial, station) become strings",
    )
    optional: list[str] = Field(
        default_factory=list, description="Keys of `fields` a record may lack (left out of data); all others required"
    )
    uom: str | None = Field(
        None,
        description="Unit of the quantity fields: a path (\"$.unit\") or a literal UN/ECE code (\"EA\"); "
        "not needed when the quantity is already {\"value\", \"uom\"}",
    )

    @field_validator("type")
    @classmethod
    def _canonical_type(cls, value: str) -> str:
        name = canonical_name(value.strip())
        if name is None:
            raise ValueError(f"{value!r} is not a canonical event type (see `plantgate schema events`)")
        return name

    @field_validator("items", "id", "time", "subject", "correlationid")
    @classmethod
    def _valid_path(cls, value: str | None) -> str | None:
        return _check_path(value)

    @field_validator("fields")
    @classmethod
    def _valid_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for key, path in value.items():
            if not key:
                raise ValueError("a data key cannot be empty")
            try:
                parse_path(path)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from exc
        return {key: path.strip() for key, path in value.items()}

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{value!r} is not a known time zone (IANA name such as \"Europe/Berlin\")") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MesMapping:
        unknown = [key for key in self.optional if key not in self.fields]
        if unknown:
            raise ValueError(f"optional names {', '.join(unknown)}, which are not keys of fields")
        if self.uom is not None and self.uom.strip().startswith("$"):
            parse_path(self.uom)
        return self


class MesSourceConfig(SourceConfig):
    """``[[sources.mes]]``: the MES, posting events to the agent (webhook) or polled over REST (poll)."""

    name: str = Field(..., min_length=1, description="Name of this source, used in events, /status and metrics")
    mode: Literal["webhook", "poll"] = Field(
        "webhook",
        description="webhook: POST /v1/events (CloudEvents) and /v1/mes/<mapping> (native JSON) on [http].listen; "
        "poll: GET `url` every `interval`",
    )
    mappings: dict[str, MesMapping] = Field(
        default_factory=dict,
        description="Native payload mappings by name: webhook POST /v1/mes/<name>; poll: the one named by `mapping`",
    )
    commit_timeout: Duration = Field(
        10.0, gt=0, description="webhook: longest a request waits for its commit before it is answered 503"
    )
    retry_after: Duration = Field(
        5.0, gt=0, description="webhook: the Retry-After of a 503 (buffer refusing writes), whole seconds"
    )
    # --- poll ---
    url: str | None = Field(None, description="poll: the MES REST endpoint (http:// or https://)")
    interval: Duration = Field(10.0, gt=0, description="poll: time between two polls (after the last page)")
    mapping: str | None = Field(
        None, description="poll: the mapping (a key of `mappings`) applied to each record; without it records "
        "are CloudEvents"
    )
    records: str = Field("$", description="poll: path of the list of records in each response page")
    cursor_param: str = Field("since", min_length=1, description="poll: query parameter carrying the cursor")
    cursor_field: str | None = Field(
        None, description="poll: path in the last record of a page giving the next cursor (e.g. \"$.updatedAt\")"
    )
    cursor_response: str | None = Field(
        None, description="poll: path in the response page giving the next cursor (e.g. \"$.cursor\")"
    )
    initial_cursor: str | None = Field(None, description="poll: cursor of the very first poll (none: no parameter)")
    next: str | None = Field(
        None, description="poll: path of the next page's URL in the response; without it the Link header (rel=next)"
    )
    max_pages: int = Field(1000, ge=1, description="poll: pages followed in one poll at most")
    timeout: Duration = Field(10.0, gt=0, description="poll: timeout of each request")
    max_backoff: Duration = Field(30.0, gt=0, description="poll: longest wait between retries after a failed poll")
    bearer_token_file: Path | None = Field(None, description="poll: file holding the bearer token")
    bearer_token: SecretStr | None = Field(None, description="poll: bearer token from the environment")
    username: str | None = Field(None, min_length=1, description="poll: user for HTTP basic auth")
    password_file: Path | None = Field(None, description="poll: file holding the basic auth password")
    password: SecretStr | None = Field(None, description="poll: basic auth password from the environment")
    ca_file: Path | None = Field(None, description="poll: CA bundle (PEM) to verify the MES's certificate")

    @field_validator("mappings")
    @classmethod
    def _mapping_names(cls, value: dict[str, MesMapping]) -> dict[str, MesMapping]:
        for name in value:
            if not _MAPPING_NAME.match(name):
                raise ValueError(f"mapping name {name!r} must be letters, digits, '_', '-' or '.' (it is a URL path)")
        return value

    @field_validator("records", "cursor_field", "cursor_response", "next")
    @classmethod
    def _valid_path(cls, value: str | None) -> str | None:
        return _check_path(value)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put credentials in username and password_file, not in the URL")
        return value

    @model_validator(mode="after")
    def _by_mode(self) -> MesSourceConfig:
        poll_keys = [
            key
            for key in ("url", "mapping", "cursor_field", "cursor_response", "initial_cursor", "next",
                        "bearer_token_file", "bearer_token", "username", "password_file", "password", "ca_file")
            if getattr(self, key) is not None
        ]  # fmt: skip
        if self.mode == "webhook":
            if poll_keys:
                raise ValueError(f"{', '.join(poll_keys)} apply only to mode = \"poll\"")
            return self
        if self.url is None:
            raise ValueError("mode = \"poll\" needs url")
        if self.mapping is not None and self.mapping not in self.mappings:
            raise ValueError(f"mapping {self.mapping!r} is not a key of mappings")
        if self.cursor_field is not None and self.cursor_response is not None:
            raise ValueError("set cursor_field or cursor_response, not both")
        bearer = self.bearer_token_file is not None or self.bearer_token is not None
        if (self.password_file is not None or self.password is not None) and self.username is None:
            raise ValueError("password_file/password need a username")
        if self.username is not None and self.password_file is None and self.password is None:
            raise ValueError("username needs password_file (or a password from the environment)")
        if bearer and self.username is not None:
            raise ValueError("use a bearer token or basic auth (username), not both")
        if self.ca_file is not None and not self.url.startswith("https://"):
            raise ValueError("ca_file applies only to an https:// url")
        return self

    def describe(self, context: BuildContext) -> list[str]:
        """One line for the source, one per mapping; secrets masked."""
        if self.mode == "webhook":
            token = context.ingest_token_file
            line = f"{self.name} webhook POST /v1/events token={mask_secret(None, token) if token else '(none)'}"
        else:
            auth = ""
            if self.bearer_token_file is not None or self.bearer_token is not None:
                auth = f" bearer={mask_secret(self.bearer_token, self.bearer_token_file)}"
            elif self.username is not None:
                auth = f" user={self.username} password={mask_secret(self.password, self.password_file)}"
            source = self.cursor_field or self.cursor_response
            cursor = f"{self.cursor_param}<-{source}" if source else "(none)"
            line = f"{self.name} poll {self.url} every {self.interval:g}s cursor={cursor}{auth}"
        lines = [line]
        for name, mapping in self.mappings.items():
            where = f"POST /v1/mes/{name}" if self.mode == "webhook" else "records"
            lines.append(f"  mapping {name} ({where}) -> {mapping.type} fields={','.join(mapping.fields)}")
        return lines

    def warnings(self) -> list[str]:
        """A poll without a cursor; credentials over plain http."""
        found: list[str] = []
        if self.mode == "poll":
            if self.cursor_field is None and self.cursor_response is None:
                found.append(
                    f"sources.mes.{self.name}: no cursor_field or cursor_response: every poll reads everything "
                    "again (ids dedupe it, but the MES does the work)"
                )
            secret = self.bearer_token_file or self.bearer_token or self.username
            if secret is not None and self.url is not None and self.url.startswith("http://"):
                found.append(f"sources.mes.{self.name}: credentials sent over plain http://; prefer https://")
        return found

    def build(self, context: BuildContext) -> Source:
        """The webhook or the poller this entry describes; reads the token or password files now.

        The poller imports httpx here, not when the config is read.
        """
        if self.mode == "webhook":
            from protocols.mes.webhook import MesWebhookSource

            if context.ingest_token_file is None:
                raise ValueError("mode: the webhook needs [http].ingest_token_file (the bearer token callers send)")
            # One agent serves one POST /v1/events: a second webhook entry would never receive anything.
            owner = context.shared("mes-webhook", lambda: self.name)
            if owner != self.name:
                raise ValueError(f"mode: source {owner!r} already is the MES webhook; use one webhook entry per agent")
            from agent.http_server import read_token_file

            token = read_token_file(context.resolve(context.ingest_token_file))
            return MesWebhookSource(self, token=token, site=context.site, agent_id=context.agent_id)
        from protocols.mes.poll import MesPollSource

        return MesPollSource(self, context)

    async def preflight(self, context: BuildContext, *, ack_tags: frozenset[str] = frozenset()) -> list[Finding]:
        """poll: one GET of the url with the credentials; webhook: nothing to reach."""
        from protocols.mes.preflight import preflight

        return await preflight(self, context)
