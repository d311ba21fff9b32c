"""The agent's OPC UA application certificate and the trust list of server certificates.

Layout under ``agent.data_dir`` (the folders of OPC UA's certificate stores)::

    pki/own/plantgate.der      the agent's application instance certificate, generated on first start
    pki/own/plantgate.pem      its private key (0600)
    pki/trusted/               server certificates (or the CAs that issued them) the agent trusts
    pki/untrusted/             server certificates seen but not trusted, named <source>-<sha1>.der

The certificate is generated only when a source uses a secure policy and names no
``certificate``; it carries the application URI ``urn:plantgate:{agent_id}`` (one
application, so one certificate for every OPC UA source of the agent).

The trust list is read at every connect, so a certificate copied into ``trusted/``
counts from the next attempt on, without a restart. When it holds certificates, a
server certificate is trusted when it is one of them (byte for byte) or was issued by
one of them (a CA, within its validity); anything else is refused before the agent
opens a secure channel or sends a password. When it is empty, the server's
certificate is accepted unverified and saved to ``untrusted/`` so it can be moved to
``trusted/``; ``plantgate check`` says the list is empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.files import private_directory

logger = logging.getLogger(__name__)

OWN_CERTIFICATE = Path("pki/own/plantgate.der")
"""The generated application certificate, relative to the data dir."""
OWN_KEY = Path("pki/own/plantgate.pem")
"""Its private key (PKCS#8 PEM, unencrypted, 0600), relative to the data dir."""
UNTRUSTED_DIR = Path("pki/untrusted")
"""Where server certificates that are not in the trust list are saved, relative to the data dir."""

CERTIFICATE_DAYS = 5 * 365
"""Validity of the generated certificate: long, because renewing means importing it into every PLC again."""
RENEW_BEFORE = timedelta(days=30)
"""A generated certificate this close to its end is reported at start."""
_MAX_UNTRUSTED = 100  # a server presenting a new certificate at every connect must not fill the disk
_SUFFIXES = (".der", ".pem", ".crt", ".cer")


def application_uri(agent_id: str) -> str:
    """The OPC UA application URI of the agent, as the generated certificate carries it."""
    return f"urn:plantgate:{agent_id}"


def thumbprints(der: bytes) -> tuple[str, str]:
    """``(sha1, sha256)`` hex digests of a DER certificate, as OPC UA tools and PLC web pages show them."""
    return hashlib.sha1(der).hexdigest(), hashlib.sha256(der).hexdigest()


def first_certificate(blob: bytes) -> bytes:
    """The first DER certificate of a chain (servers may send theirs followed by its issuers)."""
    if len(blob) < 4 or blob[0] != 0x30:
        return blob
    length = blob[1]
    if length < 0x80:
        return blob[: 2 + length]
    count = length & 0x7F
    if count > 4 or len(blob) < 2 + count:
        return blob
    return blob[: 2 + count + int.from_bytes(blob[2 : 2 + count], "big")]


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` 0600 through a temporary file renamed into place: never a half-written key."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def ensure_application_certificate(data_dir: Path, agent_id: str) -> tuple[Path, Path, bool]:
    """The agent's certificate and key under ``data_dir``, generated when missing.

    Returns ``(certificate, private_key, generated)``. The pki folders are created
    0700 (``trusted/`` too, empty, so operators see where server certificates go).
    Raises ``OSError`` naming the folder when it cannot be written.
    """
    certificate, key = data_dir / OWN_CERTIFICATE, data_dir / OWN_KEY
    try:
        private_directory(certificate.parent)
        private_directory(data_dir / "pki" / "trusted")
        if certificate.exists() and key.exists():
            return certificate, key, False
        private_key = cert_gen.generate_private_key()
        uri = application_uri(agent_id)
        generated = cert_gen.generate_self_signed_app_certificate(
            private_key,
            f"plantgate {agent_id}",
            {},
            [x509.UniformResourceIdentifier(uri), x509.DNSName(socket.gethostname())],
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            days=CERTIFICATE_DAYS,
        )
        # The key first: a certificate on disk always has its key beside it.
        _write_private(key, cert_gen.dump_private_key_as_pem(private_key))
        _write_private(certificate, generated.public_bytes(serialization.Encoding.DER))
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot create the OPC UA application certificate in {certificate.parent}: {exc.strerror}"
        ) from exc
    return certificate, key, True


@dataclass(frozen=True)
class Verdict:
    """What the trust list says about one server certificate."""

    trusted: bool
    reason: str
    """How it was decided: ``in the trust list (file)``, ``issued by file``, ``trust list empty``, ``not trusted``."""
    sha1: str
    sha256: str
    subject: str
    saved_to: Path | None
    """Where the certificate was saved when it is not in the trust list (``untrusted/``)."""


def _load(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca or certificate.issuer != issuer.subject:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    now = datetime.now(UTC)
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


class TrustList:
    """The server certificates the agent trusts: the files of ``directory``, read at every check."""

    def __init__(self, directory: Path, untrusted: Path, *, source: str):
        self.directory = directory
        self.untrusted = untrusted
        self.source = source
        self._unreadable: set[Path] = set()

    def certificates(self) -> list[tuple[Path, x509.Certificate]]:
        """Every certificate file of the folder (``.der``, ``.pem``, ``.crt``, ``.cer``); others are ignored."""
        found: list[tuple[Path, x509.Certificate]] = []
        try:
            paths = sorted(p for p in self.directory.iterdir() if p.suffix.lower() in _SUFFIXES and p.is_file())
        except FileNotFoundError:
            return found
        for path in paths:
            try:
                found.append((path, _load(path)))
            except (OSError, ValueError) as exc:
                if path not in self._unreadable:
                    self._unreadable.add(path)
                    logger.warning(
                        "File in the OPC UA trust list is not a certificate; ignored",
                        extra={"source": self.source, "path": str(path), "error": str(exc)},
                    )
        return found

    def check(self, der: bytes) -> Verdict:
        """Whether the server certificate ``der`` is trusted; saves it to ``untrusted/`` when it is not listed."""
        sha1, sha256 = thumbprints(der)
        try:
            certificate = x509.load_der_x509_certificate(der)
            subject = certificate.subject.rfc4514_string()
        except ValueError:
            return Verdict(False, "not an X.509 certificate", sha1, sha256, "?", None)
        listed = self.certificates()
        for path, trusted in listed:
            if trusted.public_bytes(serialization.Encoding.DER) == der:
                return Verdict(True, f"in the trust list ({path.name})", sha1, sha256, subject, None)
        for path, trusted in listed:
            if _issued_by(certificate, trusted):
                return Verdict(True, f"issued by {path.name}", sha1, sha256, subject, None)
        saved = self._save(der, sha1)
        reason = "trust list empty" if not listed else "not trusted"
        return Verdict(not listed, reason, sha1, sha256, subject, saved)

    def _save(self, der: bytes, sha1: str) -> Path | None:
        path = self.untrusted / f"{self.source}-{sha1}.der"
        if path.exists():
            return path
        with contextlib.suppress(OSError):  # saving is a convenience; the verdict stands without it
            private_directory(self.untrusted)
            if sum(1 for _ in self.untrusted.iterdir()) >= _MAX_UNTRUSTED:
                return None
            _write_private(path, der)
            return path
        return None
