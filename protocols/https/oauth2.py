"""Bearer tokens for the HTTPS sink: a static token from a file (re-read when rotated) or OAuth2.

``FileToken`` stats its file at most once a second and re-reads it when its inode,
size or modification time changed, so a credential rotated by a deployment tool
(a new file moved into place, or rewritten) is used from the next batch on.

``ClientCredentials`` is the OAuth2 client-credentials grant (RFC 6749, 4.4): the
token is cached and fetched anew once ``refresh_at`` (default 90 %) of its
lifetime has passed, or when the receiver answered 401 (``invalidate``). A failed
refresh while the cached token is still valid keeps using it; with no valid token
the failure is a ``TokenUnavailable`` carrying when to try again (capped, jittered
backoff), so a broken token endpoint is not hammered once per batch.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path
from typing import NoReturn

import anyio
import httpx
import msgspec

from agent.backoff import Backoff
from agent.config_types import read_secret
from protocols.https import OAuth2Config

# Re-check the token file no more often than this (a stat per batch at 100 batches/s is waste).
_STAT_INTERVAL = 1.0
# A token without expires_in is used until the receiver refuses it, or for this long at most.
_DEFAULT_LIFETIME = 3600.0
_ERROR_TEXT_MAX = 200


class _NoAuth(httpx.Auth):
    """Credentials in the form body instead of an Authorization header."""


_NO_AUTH = _NoAuth()


class TokenUnavailable(Exception):
    """No usable token now; ``retry_after`` seconds until the next attempt is worthwhile."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FileToken:
    """A static bearer token from a file, re-read when the file changes (rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value: str | None = None
        self._identity: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.rotations = 0
        """How many times a changed file was read after the first read."""

    def token(self) -> str:
        """The current token; ``TokenUnavailable`` when the file cannot be read or is empty."""
        now = time.monotonic()
        if self._value is not None and now - self._checked < _STAT_INTERVAL:
            return self._value
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise TokenUnavailable(f"bearer_token_file: cannot read {self.path}: {exc.strerror}", 1.0) from exc
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if identity != self._identity or self._value is None:
            try:
                value = read_secret(self.path, None, key="bearer_token")
            except ValueError as exc:
                raise TokenUnavailable(str(exc), 1.0) from exc
            if not value:
                raise TokenUnavailable(f"bearer_token_file: {self.path} is empty", 1.0)
            if self._value is not None:
                self.rotations += 1
            self._value, self._identity = value, identity
        return self._value


class _TokenResponse(msgspec.Struct):
    access_token: str
    token_type: str = "Bearer"
    expires_in: float | None = None


class _TokenError(msgspec.Struct):
    error: str = ""
    error_description: str = ""


class ClientCredentials:
    """OAuth2 client credentials with a cached token (see the module docstring)."""

    def __init__(
        self,
        config: OAuth2Config,
        *,
        secret_file: Path | None,
        verify: ssl.SSLContext,
        timeout: float,
        user_agent: str,
    ) -> None:
        self.config = config
        self._secret_file = secret_file
        self._verify = verify
        self._timeout = timeout
        self._user_agent = user_agent
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._expires = 0.0  # monotonic
        self._refresh = 0.0  # monotonic
        self._next_attempt = 0.0
        self._backoff = Backoff(base=0.5, cap=30.0)
        self._lock = asyncio.Lock()
        self.fetched = 0
        """Tokens obtained from the endpoint since start."""
        self.last_error: str | None = None

    async def token(self) -> str:
        """A valid token, fetched when none is cached or the cached one is due for refresh."""
        async with self._lock:
            now = time.monotonic()
            if self._token is not None and now < self._refresh:
                return self._token
            if now < self._next_attempt:
                if self._token is not None and now < self._expires:
                    return self._token
                raise TokenUnavailable(self.last_error or "token endpoint unavailable", self._next_attempt - now)
            try:
                await self._fetch()
            except TokenUnavailable:
                if self._token is not None and time.monotonic() < self._expires:
                    return self._token  # refresh failed early: the cached token still holds
                raise
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """The receiver refused ``token`` (401): the next ``token()`` fetches a new one."""
        if self._token == token:
            self._token = None
            self._next_attempt = 0.0

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _fetch(self) -> None:
        config = self.config
        try:
            secret = read_secret(
                self._secret_file,
                config.client_secret.get_secret_value() if config.client_secret else None,
                key="client_secret",
            )
        except ValueError as exc:
            self._failed(str(exc))
        form = {"grant_type": "client_credentials"}
        if config.scope:
            form["scope"] = config.scope
        if config.audience:
            form["audience"] = config.audience
        auth: httpx.Auth = httpx.BasicAuth(config.client_id, secret or "")
        if config.client_auth == "post":
            auth = _NO_AUTH
            form["client_id"] = config.client_id
            form["client_secret"] = secret or ""
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                verify=self._verify, timeout=self._timeout, headers={"user-agent": self._user_agent}
            )
        started = time.monotonic()
        try:
            response = await self._client.post(
                config.token_url, data=form, auth=auth, headers={"accept": "application/json"}
            )
        except (httpx.HTTPError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            self._failed(f"token endpoint {config.token_url}: {describe_error(exc)}")
        if response.status_code != 200:
            self._failed(f"token endpoint answered HTTP {response.status_code}{_oauth_error(response.content)}")
        try:
            answer = msgspec.json.decode(response.content, type=_TokenResponse)
        except msgspec.DecodeError as exc:
            self._failed(f"token endpoint answered an unusable token response: {exc}")
        if answer.token_type.lower() != "bearer" or not answer.access_token:
            self._failed(f"token endpoint answered token_type {answer.token_type!r}, not a bearer token")
        lifetime = answer.expires_in if answer.expires_in and answer.expires_in > 0 else _DEFAULT_LIFETIME
        self._token = answer.access_token
        self._expires = started + lifetime
        self._refresh = started + lifetime * config.refresh_at
        self._backoff.reset()
        self._next_attempt = 0.0
        self.fetched += 1
        self.last_error = None

    def _failed(self, message: str) -> NoReturn:
        """Record a failed fetch and raise ``TokenUnavailable`` with the backoff's delay."""
        self.last_error = message
        delay = self._backoff.next_delay()
        self._next_attempt = time.monotonic() + delay
        raise TokenUnavailable(message, delay)


def _oauth_error(body: bytes) -> str:
    """``": invalid_client (bad secret)"`` from an RFC 6749 error answer; never the whole body."""
    try:
        error = msgspec.json.decode(body, type=_TokenError)
    except msgspec.DecodeError:
        return ""
    text = error.error + (f" ({error.error_description})" if error.error_description else "")
    return f": {text[:_ERROR_TEXT_MAX]}" if text else ""


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of a request failure: TLS verification named as such,
    else the innermost operating-system error (connection refused, reset by peer), else the exception."""
    os_error: OSError | None = None
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 10:
        seen += 1
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {cause.verify_message or cause.reason}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {cause.reason or cause}"
        if isinstance(cause, OSError) and cause.strerror:
            os_error = cause
        cause = cause.__cause__ or cause.__context__
    kind = "cannot connect" if isinstance(exc, httpx.ConnectError) else type(exc).__name__
    if isinstance(exc, anyio.EndOfStream):
        return "the server closed the connection"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({kind})"
    if os_error is not None:
        # a server that requires a client certificate we did not send closes TLS 1.3 this way
        return f"{kind}: {(os_error.strerror or str(os_error)).lower()}"
    return f"{kind}: {exc}" if str(exc) else kind
