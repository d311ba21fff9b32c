"""OPC UA security by default, against a real asyncua server with a Basic256Sha256 / SignAndEncrypt endpoint.

The server trusts only the client certificates the test allows (its public
certificate validator), so a session proves which certificate the agent sent:
the one it generated on first start under ``data_dir/pki/own``. The agent's trust
list (``pki/trusted``) refuses a server certificate it does not hold, naming its
thumbprints and the saved file to move; once moved, the next connect succeeds
without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.pipeline import Agent
from agent.registry import build_context
from agent.settings import ConfigError, parse_settings
from tests.peers.opcua_server import free_port, make_certificate
from tests.peers.waiting import wait_for

SERVER_URI = "urn:plantgate:test:secure-press"
AGENT_ID = "gw-sec"

CONFIG = """
[agent]
site = "plant-sec"
id = "{agent_id}"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sources.opcua]]
name = "press"
endpoint = "{endpoint}"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
publishing_interval = "50ms"
reconnect_max_backoff = "300ms"

  [[sources.opcua.tags]]
  tag = "press.temperature"
  node = "ns=2;s=Press7.Temperature"
"""


class SecureServer:
    """An asyncua server offering only Basic256Sha256 / SignAndEncrypt; trusts the client certificates `allowed`."""

    def __init__(self, directory: Path) -> None:
        self.certificate, self.key = make_certificate(directory, "server", SERVER_URI, server=True)
        self.der = self.certificate.read_bytes()
        self.allowed: set[bytes] = set()
        self.refused: list[bytes] = []
        self.accepted: list[bytes] = []
        self.endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
        self._server: Server | None = None

    async def _validate(self, certificate: x509.Certificate, application: ua.ApplicationDescription) -> None:
        der = certificate.public_bytes(serialization.Encoding.DER)
        if der not in self.allowed:
            self.refused.append(der)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        self.accepted.append(der)

    async def start(self) -> None:
        server = Server()
        await server.init()
        server.disable_clock()
        server.set_endpoint(self.endpoint)
        await server.set_application_uri(SERVER_URI)
        await server.load_certificate(self.der, "der")
        await server.load_private_key(self.key.read_bytes(), None, "pem")
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        server.set_certificate_validator(self._validate)
        index = await server.register_namespace("urn:plantgate:test:press")
        press = await server.nodes.objects.add_object(f"ns={index};s=Press7", ua.QualifiedName("Press7", index))
        await press.add_variable(f"ns={index};s=Press7.Temperature", ua.QualifiedName("Temperature", index), 20.0)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None


@contextlib.asynccontextmanager
async def secure_server(directory: Path) -> AsyncIterator[SecureServer]:
    server = SecureServer(directory)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_agent(data_dir: Path, endpoint: str) -> AsyncIterator[Agent]:
    settings = parse_settings(CONFIG.format(agent_id=AGENT_ID, data_dir=data_dir, endpoint=endpoint))
    agent = Agent(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def status_of(agent: Agent) -> dict[str, Any]:
    assert agent.http is not None
    async with httpx.AsyncClient(base_url=agent.http.url, timeout=5) as client:
        answer = await client.get("/status")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def sha1(der: bytes) -> str:
    return hashlib.sha1(der).hexdigest()


def loose_modes(root: Path) -> list[str]:
    """Every path under ``root`` (and root) that group or others may read, write or enter."""
    paths = [root, *root.rglob("*")]
    return [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o077]


async def test_generated_certificate_and_trust_list(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    trusted = data_dir / "pki" / "trusted"
    trusted.mkdir(parents=True)
    data_dir.chmod(0o700)
    (data_dir / "pki").chmod(0o700)
    trusted.chmod(0o700)
    # Another server's certificate: the list is not empty, so only what it holds is trusted.
    other, _ = make_certificate(tmp_path, "other-plc", "urn:other:plc", server=True)
    shutil.copy(other, trusted / "other-plc.der")
    (trusted / "other-plc.der").chmod(0o600)

    async with secure_server(tmp_path) as server, running_agent(data_dir, server.endpoint) as agent:
        source = agent.sources[0]
        thumbprint = sha1(server.der)
        saved = data_dir / "pki" / "untrusted" / f"press-{thumbprint}.der"

        # 1. The server's certificate is refused, named by its thumbprints and the file to move.
        error = await wait_for(
            lambda: thumbprint in (source.status.last_error or "") and source.status.last_error,
            message=lambda: f"refusal naming {thumbprint}; last_error={source.status.last_error!r}",
        )
        assert hashlib.sha256(server.der).hexdigest() in error
        assert f"move {saved} into {trusted}" in error
        assert source.status.state == "reconnecting"
        assert saved.read_bytes() == server.der
        body = await status_of(agent)
        assert thumbprint in str(body), "/status shows the refusal"
        assert server.refused == [] and server.accepted == [], "refused before any session was attempted"

        # The certificate the agent generated on first start: its URI, its key kept private.
        own = data_dir / "pki" / "own" / "plantgate.der"
        key = data_dir / "pki" / "own" / "plantgate.pem"
        generated = x509.load_der_x509_certificate(own.read_bytes())
        uris = generated.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:plantgate:{AGENT_ID}"]
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(own.stat().st_mode) == 0o600

        # 2. Moved into the trust list: the next attempt opens a session, without a restart.
        saved.rename(trusted / saved.name)
        await wait_for(lambda: server.refused, timeout=10, message="the server saw the agent's certificate")
        assert server.refused[0] == own.read_bytes(), "the agent sends the certificate it generated"
        assert source.status.state != "connected"

        # 3. The server trusts the generated certificate: connected.
        server.allowed.add(own.read_bytes())
        await wait_for(
            lambda: source.status.state == "connected",
            timeout=10,
            message=lambda: f"connected; state={source.status.state} last_error={source.status.last_error!r}",
        )
        assert server.accepted[-1] == own.read_bytes()
        assert f"in the trust list (press-{thumbprint}.der)" in source.status.info["server_certificate"]

    assert loose_modes(data_dir) == [], "everything under data_dir is the agent's alone"


async def test_an_empty_trust_list_accepts_the_server_unverified_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    caplog.set_level(logging.WARNING, logger="protocols.opcua.source")
    async with secure_server(tmp_path) as server:
        # The client certificate is generated before the agent starts here, so the server can trust it.
        settings = parse_settings(CONFIG.format(agent_id=AGENT_ID, data_dir=data_dir, endpoint=server.endpoint))
        from protocols.opcua import pki

        own, _, generated = pki.ensure_application_certificate(data_dir, AGENT_ID)
        assert generated
        server.allowed.add(own.read_bytes())
        assert pki.ensure_application_certificate(data_dir, AGENT_ID) == (own, _, False), "kept, not regenerated"
        agent = Agent(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            source = agent.sources[0]
            await wait_for(lambda: source.status.state == "connected", timeout=15, message="connected")
            thumbprint = sha1(server.der)
            assert source.status.info["server_certificate"] == f"unverified (trust list empty): SHA-1 {thumbprint}"
            saved = data_dir / "pki" / "untrusted" / f"press-{thumbprint}.der"
            assert saved.read_bytes() == server.der, "saved so it can be moved into the trust list"
            warned = [r for r in caplog.records if "accepted unverified" in r.getMessage()]
            assert len(warned) == 1 and warned[0].__dict__["sha1"] == thumbprint
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert loose_modes(data_dir) == []


def test_check_shows_the_certificate_and_warns_while_the_trust_list_is_empty(tmp_path: Path) -> None:
    text = CONFIG.format(agent_id=AGENT_ID, data_dir=tmp_path, endpoint="opc.tcp://127.0.0.1:4840")
    config = (settings := parse_settings(text)).sources.opcua[0]
    context = build_context(settings)
    lines = config.describe(context)
    assert f"  cert   {tmp_path}/pki/own/plantgate.der (generated on first start)" in lines
    assert f"  trust  {tmp_path}/pki/trusted (empty: any server certificate accepted)" in lines
    [warning] = config.warnings_at(context)
    assert warning.startswith(f"sources.opcua.press: the trust list {tmp_path}/pki/trusted is empty")

    (tmp_path / "pki" / "trusted").mkdir(parents=True)
    make_certificate(tmp_path / "pki" / "trusted", "plc", "urn:plc", server=True)
    assert config.warnings_at(context) == []
    assert f"  trust  {tmp_path}/pki/trusted (1 certificate)" in config.describe(context)


def test_a_certificate_without_its_key_is_a_config_error() -> None:
    text = CONFIG.format(agent_id=AGENT_ID, data_dir="/var/lib/plantgate", endpoint="opc.tcp://127.0.0.1:4840")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text.replace('name = "press"\n', 'name = "press"\ncertificate = "a.der"\n'))
    assert "certificate and private_key go together" in str(caught.value)
