"""The HTTPS pre-flight: the TLS handshake and an ``OPTIONS`` to the receiver, and an OAuth2 token.

The receiver is asked ``OPTIONS url`` with the configured credentials (no events are
sent): any answer proves TCP, TLS (verified as the sink verifies) and HTTP; 401/403
means the receiver refuses the credentials. With ``oauth2`` a token is fetched from
the token endpoint exactly as the sink would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.config_types import BuildContext, read_secret
from agent.preflight import Finding, error, ok, warning

if TYPE_CHECKING:
    from protocols.https import HttpsSinkConfig


async def preflight(config: HttpsSinkConfig, context: BuildContext) -> list[Finding]:
    """One finding for the receiver, one for the OAuth2 token when configured."""
    import anyio
    import httpx

    from protocols.https import tls_context
    from protocols.https.oauth2 import ClientCredentials, TokenUnavailable, describe_error

    verify = config.ssl_context(context)
    user_agent = f"plantgate/{context.version} check"
    findings: list[Finding] = []
    token: str | None = None
    if config.oauth2 is not None:
        o = config.oauth2
        token_verify = verify
        if o.ca_file is not None:
            token_verify = tls_context(context.resolve(o.ca_file), None, None)
        elif config.cert_file is not None:
            token_verify = tls_context(context.resolve(config.ca_file) if config.ca_file else None, None, None)
        credentials = ClientCredentials(
            o,
            secret_file=context.resolve(o.client_secret_file) if o.client_secret_file else None,
            verify=token_verify,
            timeout=config.timeout,
            user_agent=user_agent,
        )
        try:
            token = await credentials.token()
            findings.append(ok(f"OAuth2 token obtained from {o.token_url} for client {o.client_id}"))
        except TokenUnavailable as exc:
            findings.append(error(f"no OAuth2 token: {exc}"))
        finally:
            await credentials.aclose()
    else:
        token_file = context.resolve(config.bearer_token_file) if config.bearer_token_file else None
        env_token = config.bearer_token.get_secret_value() if config.bearer_token else None
        token = read_secret(token_file, env_token, key="bearer_token")
    headers = {"user-agent": user_agent}
    if token:
        headers["authorization"] = f"Bearer {token}"
    transport_errors = (httpx.HTTPError, anyio.EndOfStream, anyio.BrokenResourceError, OSError)
    async with httpx.AsyncClient(
        verify=verify, http2=config.http2, timeout=httpx.Timeout(config.timeout), follow_redirects=False
    ) as client:
        try:
            response = await client.request("OPTIONS", config.url, headers=headers)
        except transport_errors as exc:
            return [error(f"{config.shown_url}: {describe_error(exc)}"), *findings]
    secure = "TLS verified, " if config.tls else ""
    answered = f"{config.shown_url}: {secure}{response.http_version} answered OPTIONS with {response.status_code}"
    if response.status_code in (401, 403):
        findings.insert(0, error(f"{answered}: the receiver refuses the credentials"))
    elif response.status_code >= 500:
        findings.insert(0, warning(f"{answered}: the receiver reports a fault of its own"))
    else:
        findings.insert(0, ok(answered))
    return findings
