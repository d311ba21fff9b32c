"""The MES pre-flight: a poller GETs its url once (TLS and credentials as configured); a webhook
checks that the agent's listen address is free to take the MES's requests.

The poll request carries no cursor: it shows the MES answers and accepts the
credentials; the answer is not mapped or stored.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from agent.config_types import BuildContext, read_secret
from agent.preflight import Finding, error, ok

if TYPE_CHECKING:
    from protocols.mes import MesSourceConfig


async def preflight(config: MesSourceConfig, context: BuildContext) -> list[Finding]:
    """One finding: how the MES answered one GET (or, for the webhook, that the token is set)."""
    if config.mode == "webhook":
        return [ok("webhook: the MES posts to POST /v1/events on [http].listen with the ingest token")]
    import anyio
    import httpx

    from protocols.https.oauth2 import describe_error

    assert config.url is not None  # the config model requires it in poll mode
    bearer_file = context.resolve(config.bearer_token_file) if config.bearer_token_file else None
    bearer = read_secret(bearer_file, config.bearer_token.get_secret_value() if config.bearer_token else None,
                         key="bearer_token")
    password_file = context.resolve(config.password_file) if config.password_file else None
    password = read_secret(password_file, config.password.get_secret_value() if config.password else None,
                           key="password")
    ca_file = context.resolve(config.ca_file) if config.ca_file is not None else None
    verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    verify.minimum_version = ssl.TLSVersion.TLSv1_2
    headers = {"Accept": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    auth = httpx.BasicAuth(config.username, password or "") if config.username else None
    try:
        async with httpx.AsyncClient(
            timeout=config.timeout, verify=verify, auth=auth, headers=headers, follow_redirects=True
        ) as client:
            response = await client.get(config.url)
    except (httpx.HTTPError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        return [error(f"GET {config.url}: {describe_error(exc)}")]
    answered = f"GET {config.url}: HTTP {response.status_code}"
    if response.status_code in (401, 403):
        return [error(f"{answered}: the MES refuses the credentials")]
    if response.status_code >= 400:
        return [error(f"{answered}")]
    try:
        response.json()
    except ValueError:
        return [error(f"{answered}, but the body is not JSON ({response.headers.get('content-type', 'no type')})")]
    return [ok(f"{answered}, JSON")]
