"""A real asyncua server on a free loopback port (fixtures), and certificates for secure endpoints."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.simulator import PressSimulator


@pytest.fixture
async def press_server() -> AsyncIterator[PressSimulator]:
    """A started press simulator (no security) on a free port, stopped at teardown."""
    simulator = PressSimulator(port=0)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def make_certificate(
    directory: Path, name: str, application_uri: str, *, server: bool, pem: bool = False
) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate and its private key, written to ``directory``.

    The certificate carries ``application_uri`` and this host's name as subject alternative
    names, as OPC UA peers check. It is written as DER (``<name>.der``), or PEM with
    ``pem=True`` (``<name>.crt``: the content, not the extension, says PEM); the key is PEM.
    Returns ``(certificate_path, key_path)``.
    """
    key = cert_gen.generate_private_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {},
        [x509.UniformResourceIdentifier(application_uri), x509.DNSName(socket.gethostname())],
        [usage],
        days=2,
    )
    cert_path = directory / (f"{name}.crt" if pem else f"{name}.der")
    cert_path.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)
    )
    key_path = directory / f"{name}.key"
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path
