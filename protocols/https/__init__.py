"""HTTPS sink: batches of CloudEvents to the ERP-facing middleware.

Wire mapping (contract): each ``deliver`` POSTs ``application/cloudevents-batch+json``
(a JSON array of the events as the buffer stored them) to ``url``. 2xx and 409:
acknowledged. 429 and 503: retried after ``Retry-After``. Other 5xx, timeouts and
connection errors: retried with the agent's capped, jittered backoff. 400/422 (and
413): the batch is split in halves until the refused events are found; those alone
become dead letters with the response body as the reason, the rest are delivered
in order. 401/403: retried, never dead letters, state ``unauthorized`` (with OAuth2
the token is fetched anew once first).

This package's ``__init__`` holds only the config model (``HttpsSinkConfig``), so the
settings validate a ``[[sinks.https]]`` entry without importing httpx;
``protocols.https.sink`` holds the sink (``HttpsSink``), imported by ``build``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.config_types import BuildContext, ConfigModel, Duration, mask_secret, read_secret, server_url
from agent.sink import SinkConfig

if TYPE_CHECKING:
    import ssl

    from agent.preflight import Finding
    from protocols.https.sink import HttpsSink

__all__ = ["HttpsSinkConfig", "OAuth2Config", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (where plain http is acceptable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_http_url(value: str, *, plain_ok: bool) -> str:
    value = value.strip()
    server_url(value, ("https", "http") if plain_ok else ("https",))
    return value


class OAuth2Config(ConfigModel):
    """OAuth2 client credentials (RFC 6749 section 4.4): the sink fetches and caches a bearer token."""

    token_url: str = Field(description="The authorization server's token endpoint (https)")
    client_id: str = Field(min_length=1, description="OAuth2 client id")
    client_secret_file: Path | None = Field(
        None, description="File holding the client secret (e.g. a systemd credential); wins over client_secret"
    )
    client_secret: SecretStr | None = Field(
        None, description="Client secret, from the environment only (never write it in the file)"
    )
    scope: str | None = Field(None, description="Requested scope(s), space separated")
    audience: str | None = Field(None, description="Requested audience (some providers need it)")
    client_auth: Literal["basic", "post"] = Field(
        "basic",
        description='How the client authenticates at the token endpoint: "basic" (HTTP Basic, the RFC\'s '
        'default) or "post" (client_id and client_secret in the form body)',
    )
    ca_file: Path | None = Field(
        None, description="PEM CA(s) of the token endpoint; default: the sink's ca_file, else the system CAs"
    )
    refresh_at: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="Fetch a new token once this fraction of its lifetime (expires_in) has passed",
    )

    @field_validator("token_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = _check_http_url(value, plain_ok=True)
        parts = urlsplit(value)
        if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            raise ValueError("the token endpoint must be https (http only on loopback, for testing)")
        return value

    @model_validator(mode="after")
    def _needs_secret(self) -> OAuth2Config:
        if self.client_secret_file is None and self.client_secret is None:
            raise ValueError("oauth2 needs client_secret_file (or client_secret from the environment)")
        return self


class HttpsSinkConfig(SinkConfig):
    """One ``[[sinks.https]]`` entry: the receiver, its TLS, its credentials and the batch size."""

    name: str = Field(
        min_length=1,
        description="Name of this sink; the buffer keys its backlog by it, so renaming starts a new backlog",
    )
    url: str = Field(
        description="Where batches are POSTed. https://; http:// is accepted (plantgate check warns) "
        "for a receiver on loopback or for testing",
        examples=["https://middleware.example.com/v1/events"],
    )
    batch_max: int = Field(500, ge=1, le=10000, description="Most events in one request")
    timeout: Duration = Field(
        10.0, gt=0, description="Time allowed for connecting, the TLS handshake, sending and each read"
    )
    http2: bool = Field(True, description="Offer HTTP/2 (ALPN); HTTP/1.1 is used when the server does not take it")
    ca_file: Path | None = Field(
        None, description="PEM file of the CA(s) that sign the receiver's certificate (default: system CAs)"
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS; needs key_file")
    key_file: Path | None = Field(None, description="Private key (PEM) of cert_file")
    bearer_token_file: Path | None = Field(
        None,
        description="File holding a static bearer token; re-read when the file changes (rotated credentials)",
    )
    bearer_token: SecretStr | None = Field(
        None, description="Static bearer token, from the environment only (never write it in the file)"
    )
    oauth2: OAuth2Config | None = Field(None, description="OAuth2 client credentials instead of a static token")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_http_url(value, plain_ok=True)

    @model_validator(mode="after")
    def _check_combinations(self) -> HttpsSinkConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        static = self.bearer_token_file is not None or self.bearer_token is not None
        if static and self.oauth2 is not None:
            raise ValueError("use either a static bearer token (bearer_token_file) or oauth2, not both")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError("TLS files need an https:// url")
        return self

    @property
    def tls(self) -> bool:
        """True for ``https://``."""
        return urlsplit(self.url).scheme == "https"

    @property
    def shown_url(self) -> str:
        """The url for summaries, logs and status: a query string (some APIs take a key there) masked."""
        parts = urlsplit(self.url)
        return parts._replace(query="********").geturl() if parts.query else self.url

    def describe(self, context: BuildContext) -> list[str]:
        """Url, lanes, batch size and authentication; secrets masked."""
        auth = ""
        if self.oauth2 is not None:
            o = self.oauth2
            secret = mask_secret(o.client_secret, o.client_secret_file)
            auth = f" oauth2={o.token_url} client_id={o.client_id} client_secret={secret}"
        elif self.bearer_token_file is not None or self.bearer_token is not None:
            auth = f" bearer_token={mask_secret(self.bearer_token, self.bearer_token_file)}"
        mtls = f" client_cert={self.cert_file}" if self.cert_file else ""
        return [f"{self.name} {self.shown_url} lanes={','.join(self.lanes)} batch_max={self.batch_max}{auth}{mtls}"]

    def warnings(self) -> list[str]:
        """Plain http: events (and any token) travel unencrypted."""
        if self.tls:
            return []
        host = urlsplit(self.url).hostname or ""
        where = "on loopback" if is_loopback(host) else f"to {host}"
        credentials = self.bearer_token_file is not None or self.bearer_token is not None or self.oauth2 is not None
        what = "events and the bearer token travel" if credentials else "events travel"
        return [f"sinks.https.{self.name}: {what} unencrypted over http:// ({where}); use https://"]

    def ssl_context(self, context: BuildContext) -> ssl.SSLContext:
        """The verifying TLS context: ``ca_file`` (else the system CAs), the client certificate for mTLS.

        Raises ``ValueError("ca_file: ...")`` (or ``cert_file``) naming what cannot be read.
        """
        return tls_context(
            context.resolve(self.ca_file) if self.ca_file else None,
            context.resolve(self.cert_file) if self.cert_file else None,
            context.resolve(self.key_file) if self.key_file else None,
        )

    def build(self, context: BuildContext) -> HttpsSink:
        """The sink this entry describes; httpx is imported here, not with the config.

        Every file the sink needs (token, client secret, certificates) is read now, so
        ``plantgate check`` names one it cannot read.
        """
        token_file = context.resolve(self.bearer_token_file) if self.bearer_token_file else None
        read_secret(token_file, None, key="bearer_token")
        if self.oauth2 is not None and self.oauth2.client_secret_file is not None:
            try:
                read_secret(context.resolve(self.oauth2.client_secret_file), None, key="client_secret")
            except ValueError as exc:
                raise ValueError(f"oauth2.{exc}") from exc  # the key sits in the oauth2 table
        from protocols.https.sink import HttpsSink

        return HttpsSink(self, context)

    async def preflight(self, context: BuildContext) -> list[Finding]:
        """TLS handshake and OPTIONS to the receiver with the credentials; an OAuth2 token fetched."""
        from protocols.https.preflight import preflight

        return await preflight(self, context)


def tls_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """A client TLS context that verifies the server; ``ValueError("<key>: ...")`` for an unreadable file."""
    import ssl

    if ca_file is None:
        ctx = ssl.create_default_context()
    else:
        # A private CA pins the receiver: with ca_file, the system CAs are not trusted beside it.
        try:
            ctx = ssl.create_default_context(cafile=_readable(ca_file, "ca_file"))
        except ssl.SSLError as exc:
            raise ValueError(f"ca_file: {ca_file} holds no usable CA certificate: {exc.reason or exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        try:
            ctx.load_cert_chain(_readable(cert_file, "cert_file"), _readable(key_file, "key_file"))
        except ssl.SSLError as exc:
            raise ValueError(f"cert_file: cannot use {cert_file} with {key_file}: {exc.reason or exc}") from exc
    return ctx


def _readable(path: Path, key: str) -> str:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{key}: cannot read {path}: {exc.strerror}") from exc
    return str(path)
