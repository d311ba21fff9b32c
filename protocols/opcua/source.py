"""OPC UA source: subscriptions on a PLC's OPC UA server, readings in batches, reconnect, handshake writes.

One subscription carries every tag, each a monitored item with an explicit
server-side queue. Every publish response becomes exactly one
``output.readings(batch)`` call.

Nothing the server can still give back is lost. The source runs its own publish
loop instead of asyncua's (which acknowledges every notification as soon as its
callback returns): a notification is acknowledged, in the next PublishRequest, only
after ``output.readings`` returned, i.e. once the batch is committed to the buffer.
A batch that cannot be committed is retried (counted in ``uncommitted`` and in
``status.info``), and no Publish request goes out meanwhile: the values wait in the
server's per-item queues (``queue_size``, oldest dropped first, reported through the
status code's overflow bit) and in its retransmission queue.

The subscription outlives the session (``subscription_lifetime``). Its id, the last
committed sequence number and the revised parameters are kept in the buffer
database (``output.save_state``). A new session, after a reconnect or a restart
(also after ``kill -9``), takes it over with TransferSubscriptions and fetches with
Republish every notification the server still holds that was not committed, so the
values produced while the agent was away are recovered up to what the server
queued; the transfer asks for initial values, which come after the republished
notifications. A server that cannot transfer it (expired, server restarted, service
not supported) gets a new subscription, logged once. So does one that answers the
transfer Good but sends no Publish response for it within its keep-alive period
(asyncua's server keeps serving the old connection), and, at once, a subscription
whose previous take-over was never proven so (``_Subscription.proven``).

Publish responses are decoded by ``protocols.opcua.publish`` (values as tuples
straight from the bytes, read through the connection's public ``send_request``)
when it passes its self-check against asyncua's decoder at connect and
``fast_decoder`` is on; otherwise asyncua's ``UaClient.publish`` decodes them.
``status.info["decoder"]`` says which.

Connection loss is seen by asyncua's connection supervisor: at once when the
socket closes (server restart), within about twice ``watchdog_interval`` when the
server stops answering (it reads ``ServerStatus.State`` once per interval), by the
publish loop when a request fails, and by our own keep-alive check when publish
responses stop arriving. Then the source drops the client, backs off
(``agent.backoff.Backoff``, capped at ``reconnect_max_backoff``), builds a new
client and takes the subscription over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec
from asyncua import Client, ua
from asyncua.client.ua_client import UASocketProtocol
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.crypto import security_policies
from asyncua.crypto.uacrypto import CertProperties
from asyncua.ua.ua_binary import struct_from_binary
from asyncua.ua.uaerrors import UaStructParsingError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.backoff import Backoff
from agent.config_types import read_secret
from agent.events import Quality, Reading
from agent.health import ComponentStatus
from agent.source import BufferUnavailable, SourceError, SourceOutput
from protocols.opcua import OpcUaSourceConfig, pki
from protocols.opcua import publish as fast_publish
from protocols.opcua.publish import FastDataChange, Item

logger = logging.getLogger(__name__)

_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "None": security_policies.SecurityPolicyNone,
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_MODES = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

# The server answers a subscription with no changes by a keep-alive about this often.
_KEEPALIVE_PERIOD = 5.0
# Sessions of a client that vanished are reclaimed by the server after this long: long
# enough to outlive a short network outage (asyncua's server deletes the subscriptions of
# a timed-out session), short because PLCs allow only a handful of sessions. The
# subscription itself lives for ``subscription_lifetime`` on servers that keep it.
_SESSION_TIMEOUT = 120.0
_STATE_KEY = "subscription"
_MAX_NOTIFICATIONS_PER_PUBLISH = 10_000
# PLCs limit the operations per request (MaxMonitoredItemsPerCall, often 1000); stay below.
_MAX_ITEMS_PER_CALL = 500

_SEVERITY_SHIFT = 30  # StatusCode bits 31..30: 00 good, 01 uncertain, 10/11 bad
_OVERFLOW_BITS = 0x0480  # InfoType "DataValue" (bit 10) + Overflow (bit 7): the server queue dropped values
_PLAIN_TYPES = frozenset({bool, int, float, str})
_SKIP = object()
_EPOCH_GUARD = 1971  # servers send 1601-01-01 (FILETIME 0) for "no timestamp"


def parse_node_id(text: str) -> ua.NodeId:
    """Parse an OPC UA node id string (``ns=2;s=Press7.Temperature``, ``i=2258``, ``nsu=<uri>;s=X``)."""
    try:
        node = ua.NodeId.from_string(text.strip())
    except Exception as exc:  # asyncua raises UaStringParsingError, or ValueError for bad parts
        raise ValueError(
            f"{text!r} is not an OPC UA node id; write it as \"ns=2;s=Name\", \"ns=3;i=1001\" or \"nsu=<uri>;s=Name\""
        ) from exc
    if node.Identifier in ("", None, b""):
        raise ValueError(f"{text!r} has an empty identifier")
    if isinstance(node, ua.ExpandedNodeId) and node.ServerIndex:
        raise ValueError(f"{text!r} points to another server (svr=); only local node ids are supported")
    return node


class _Subscription(msgspec.Struct):
    """The subscription a session reads from, as kept in the buffer for the next session to take over.

    Saved after every committed batch, so it is encoded with msgspec: with 10,000
    monitored items the encode is 0.05 ms, where ``dataclasses.asdict`` + ``json``
    took 8 ms, ten times a second.
    """

    subscription_id: int
    committed: int  # sequence number of the last notification committed (0: none yet)
    fingerprint: str  # of the config its monitored items were made from
    interval: float  # revised publishing interval, seconds
    keepalive: int  # revised max keep-alive count
    monitored: list[int]  # client handles (tag indexes) with a monitored item
    # False from a take-over until a Publish response for the subscription arrives: a
    # restart that finds it False knows the last take-over of it never delivered.
    proven: bool = True

    def to_json(self) -> str:
        return _SUBSCRIPTION_ENCODER.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> _Subscription:
        return msgspec.json.decode(text, type=cls)


_SUBSCRIPTION_ENCODER = msgspec.json.Encoder()


def _after(number: int, reference: int) -> bool:
    """Whether sequence number ``number`` comes after ``reference`` (they wrap at 2**32)."""
    return 0 < (number - reference) % 2**32 < 2**31


def _protocol(client: Client) -> UASocketProtocol:
    protocol = client.uaclient.protocol
    if protocol is None:
        raise ConnectionError("connection is not open")
    return protocol


class UntrustedServer(Exception):
    """The server's certificate is not in the trust list: refused before any secure channel or password."""


class _ConnectionLost(Exception):
    """The session stopped working (socket closed, watchdog probe failed, subscription dead)."""


class _PemOrDer:
    """A certificate or key file read once at start: its bytes and asyncua's format name."""

    def __init__(self, path: Path, *, key: str, private: bool = False):
        try:
            self.data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{key}: cannot read {path}: {exc.strerror}") from exc
        self.extension = "pem" if self.data.lstrip().startswith(b"-----BEGIN") else "der"
        try:
            if private:
                if self.extension == "pem":
                    serialization.load_pem_private_key(self.data, password=None)
                else:
                    serialization.load_der_private_key(self.data, password=None)
                self.certificate: x509.Certificate | None = None
            elif self.extension == "pem":
                self.certificate = x509.load_pem_x509_certificate(self.data)
            else:
                self.certificate = x509.load_der_x509_certificate(self.data)
        except (ValueError, TypeError) as exc:
            what = "an unencrypted private key" if private else "an X.509 certificate"
            raise ValueError(f"{key}: {path} is not {what} in DER or PEM form ({exc})") from exc

    def properties(self) -> CertProperties:
        return CertProperties(self.data, self.extension)


def _application_uri(certificate: x509.Certificate | None, name: str) -> str:
    # Servers check that the ApplicationUri of the session matches the URI in the client
    # certificate (BadCertificateUriInvalid otherwise), so take it from the certificate.
    if certificate is not None:
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
            if uris:
                return uris[0]
        except x509.ExtensionNotFound:
            pass
    return f"urn:{socket.gethostname()}:plantgate:{name}"


def _describe(exc: BaseException) -> str:
    """One line for logs and /status: what went wrong, with the OPC UA status name when there is one."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    if isinstance(exc, ua.UaStatusCodeError | _ConnectionLost | UntrustedServer):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _item(notification: ua.MonitoredItemNotification) -> Item:
    """A MonitoredItemNotification decoded by asyncua, as the fast decoder's tuple."""
    dv = notification.Value
    status = dv.StatusCode
    return (
        notification.ClientHandle,
        dv.Value,
        status.value if status is not None else 0,
        dv.SourceTimestamp,
        dv.ServerTimestamp,
    )


def _plain(value: Any) -> Any:
    """A value of a non-plain OPC UA type as bool/int/float/str, or ``_SKIP`` for arrays and blobs."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.NodeId | ua.QualifiedName):
        return value.to_string()
    if isinstance(value, list | tuple | bytes | bytearray):
        return _SKIP
    if isinstance(value, int | float | str):  # subclasses of plain types
        return value
    return str(value)


class _AsyncuaNoiseFilter(logging.Filter):
    """Drops asyncua's own reports of a connection loss that this source reports once itself.

    On every server restart asyncua logs a traceback ("Publish iteration crashed") and
    two warnings while the dead client is closed; the source's single WARNING line
    says the same. Anything else from asyncua passes unchanged.
    """

    _EXPECTED = (
        "close_session was called but connection is closed",
        "close_session but connection wasn't established",
        "close_secure_channel was called but connection is closed",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith("Publish iteration crashed") and record.exc_info:
            return not isinstance(record.exc_info[1], OSError | TimeoutError)
        return message not in self._EXPECTED


_NOISE_FILTER = _AsyncuaNoiseFilter()


def _install_noise_filter() -> None:
    for name in ("asyncua.client.ua_session.UaSession", "asyncua.client.ua_client.UaClient"):
        log = logging.getLogger(name)
        if _NOISE_FILTER not in log.filters:
            log.addFilter(_NOISE_FILTER)


class OpcUaSource:
    """Reads the tags of one OPC UA server by subscription and writes handshake tags back.

    Implements ``agent.source.Source``. ``run`` connects, subscribes, delivers one
    batch of readings per publish response, and reconnects with backoff whenever
    the server goes away. ``status`` tells monitoring the connection state and, in
    ``degraded``, every node the server refuses or reports Bad (retried every
    ``bad_node_retry``).
    """

    kind = "opcua"

    def __init__(self, config: OpcUaSourceConfig, *, data_dir: Path, agent_id: str | None = None):
        self.config = config
        self.name = config.name
        self.status = ComponentStatus(name=config.name, kind=self.kind)
        self._tags = [tag.tag for tag in config.tags]
        self._nodes = [tag.node for tag in config.tags]  # as configured: the key in status.degraded
        self._node_ids = [parse_node_id(node) for node in self._nodes]
        self._handle_of_tag = {tag: handle for handle, tag in enumerate(self._tags)}

        def resolve(path: Path) -> Path:
            return path if path.is_absolute() else data_dir / path

        self._password = read_secret(
            resolve(config.password_file) if config.password_file is not None else None,
            config.password.get_secret_value() if config.password is not None else None,
            key="password",
        )
        self._certificate: _PemOrDer | None = None
        self._private_key: _PemOrDer | None = None
        self._server_certificate: _PemOrDer | None = None
        if config.certificate is not None and config.private_key is not None:
            self._certificate = _PemOrDer(resolve(config.certificate), key="certificate")
            self._private_key = _PemOrDer(resolve(config.private_key), key="private_key", private=True)
        if config.server_certificate is not None:
            self._server_certificate = _PemOrDer(resolve(config.server_certificate), key="server_certificate")
        self._application_uri = _application_uri(
            self._certificate.certificate if self._certificate else None, config.name
        )
        self._data_dir = data_dir
        self._agent_id = agent_id or socket.gethostname()
        self._trust = pki.TrustList(resolve(config.trust_dir), data_dir / pki.UNTRUSTED_DIR, source=config.name)
        self._accepted_unverified: set[str] = set()  # thumbprints already logged as accepted unverified

        # State of the current session; replaced on every reconnect.
        self._client: Client | None = None
        self._resolved: dict[int, ua.NodeId] = {}  # handle -> node id with the server's namespace index
        self._refused: dict[int, str] = {}  # handle -> why the server refused to monitor it
        self._write_types: dict[int, ua.VariantType] = {}
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._last_publish = 0.0
        self._publishing = False
        self._skipped_types: set[int] = set()
        self._overflow_logged_at = -math.inf
        self.overflows = 0
        """Values the server reported as dropped from a full monitored-item queue (overflow bit)."""
        self.fast_notifications = 0
        """DataChangeNotifications decoded by ``protocols.opcua.publish`` (not asyncua's generic decoder)."""
        self.uncommitted = 0
        """Batches ``output.readings`` failed to commit (not acknowledged, retried)."""
        self.transfers = 0
        """Subscriptions taken over from an earlier session (TransferSubscriptions)."""
        self.transfer_fallbacks = 0
        """Take-overs the server refused (a new subscription was created instead)."""
        self.republished = 0
        """Notifications fetched again with Republish after a take-over."""
        self.silent_takeovers = 0
        """Take-overs the server answered Good but after which no Publish response came (a new subscription then)."""
        self._take = self._items_taker()
        self._acks: list[ua.SubscriptionAcknowledgement] = []  # committed, to send with the next Publish
        self._taken: _Subscription | None = None  # the subscription to take over / in use
        self._active: _Subscription | None = None  # the subscription the publish loop delivers for
        self._heard = asyncio.Event()  # a Publish response came for a taken-over subscription
        self._replacing: asyncio.Event | None = None  # set once a replacing subscription stands
        self._silent_logged = False
        self._state_loaded = False
        self._state_task: asyncio.Task[None] | None = None
        self._state_errors = 0
        self._fallback_logged = False
        self._decoder_logged = False
        self._uncommitted_logged_at = -math.inf

    def tags(self) -> Sequence[str]:
        """The tag names of this source, in config order."""
        return list(self._tags)

    # --- run: connect, subscribe, reconnect -------------------------------------------------

    async def run(self, output: SourceOutput) -> None:
        """Read until cancelled; reconnect with backoff whenever the server goes away."""
        _install_noise_filter()
        cap = self.config.reconnect_max_backoff
        backoff = Backoff(base=min(0.5, cap), cap=cap, minimum=min(0.2, cap))
        log = {"source": self.name, "endpoint": self.config.endpoint}
        failures = 0  # attempts since the last working session
        down_since: float | None = None
        ever_connected = False

        def connected() -> None:
            nonlocal ever_connected
            self.status.set_state("connected")
            extra = {**log, "tags": len(self._tags) - len(self._refused), "refused": len(self._refused)}
            if not ever_connected:
                logger.info("Connected to OPC UA server", extra={**extra, "attempts": failures + 1})
            else:
                downtime = round(time.monotonic() - (down_since or time.monotonic()), 1)
                logger.info(
                    "Reconnected to OPC UA server", extra={**extra, "attempts": failures, "downtime_s": downtime}
                )
            ever_connected = True

        try:
            while True:
                try:
                    await self._session(output, on_connected=connected)
                except Exception as exc:  # a PLC that is away, or any protocol failure: retry, never fatal
                    error = _describe(exc)
                    expected = isinstance(
                        exc, OSError | TimeoutError | ua.UaError | _ConnectionLost | UntrustedServer
                    )
                    if self.status.state == "connected":
                        failures = 0
                        down_since = time.monotonic()
                        backoff.reset()
                        logger.warning(
                            "Connection to OPC UA server lost",
                            extra={**log, "error": error},
                            exc_info=None if expected else exc,
                        )
                    elif failures == 0:
                        down_since = down_since or time.monotonic()
                        logger.warning(
                            "Cannot connect to OPC UA server, retrying",
                            extra={**log, "error": error},
                            exc_info=None if expected else exc,
                        )
                    else:
                        logger.debug("Reconnect attempt failed", extra={**log, "error": error, "attempt": failures})
                    failures += 1
                    self.status.set_state("reconnecting", error)
                await backoff.wait()
        except asyncio.CancelledError:
            self.status.set_state("stopped")
            raise

    async def _session(self, output: SourceOutput, *, on_connected: Callable[[], None]) -> None:
        """One connection: connect, take over or create the subscription, deliver until lost (raises)."""
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._resolved = {}
        self._write_types = {}
        if not self._state_loaded:
            self._taken = await self._load_state(output)
            self._state_loaded = True
        client = self._new_client()
        connected = False
        try:
            await self._secure(client)
            await client.connect()
            connected = True
            publish = self._publisher(client)
            self._heard = asyncio.Event()
            self._replacing = None
            subscription = await self._take_over(client, output)
            if subscription is None:
                self._acks = []  # acknowledgements for a subscription that is gone
                subscription = await self._subscribe(client, output)
            self._active = subscription
            self._last_publish = time.monotonic()
            self._client = client
            # Reset the backoff only after the subscription stands: a server that accepts
            # sessions but fails every subscription must not be hammered.
            on_connected()
            publisher = asyncio.create_task(self._publish_loop(publish, output), name=f"opcua-publish-{self.name}")
            try:
                if not subscription.proven:
                    subscription = await self._prove(client, output, subscription)
                await self._watch(client, output, subscription)
            finally:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
                await self._state_saved()
        finally:
            self._client = None
            await self._close(client, polite=connected and not self._lost.is_set())

    async def configured_client(self) -> Client:
        """An unconnected asyncua client set up exactly as this source connects: identity, user, security.

        For ``plantgate check --connect`` and ``plantgate browse --source``; they report a lost
        connection themselves, so no loss callback is set.
        """
        client = self._new_client()
        client.connection_lost_callback = None
        await self._secure(client)
        return client

    def _new_client(self) -> Client:
        config = self.config
        client = Client(config.endpoint, timeout=config.timeout, watchdog_intervall=config.watchdog_interval)
        client.name = "plantgate"
        client.description = f"plantgate {self.name}"
        client.application_uri = self._application_uri
        client.product_uri = "urn:plantgate"
        client.session_timeout = int(max(_SESSION_TIMEOUT, 10 * config.watchdog_interval) * 1000)
        if config.username is not None:
            client.set_user(config.username)
            if self._password is not None:
                client.set_password(self._password)

        async def lost(exc: Exception) -> None:
            if isinstance(exc, TimeoutError):
                self._connection_lost("server stopped answering (watchdog probe timed out)")
            else:
                self._connection_lost(f"connection lost ({_describe(exc)})")

        client.connection_lost_callback = lost
        return client

    async def _secure(self, client: Client) -> None:
        """Set up a secure policy: the agent's certificate (generated when none is configured) and the
        server's, pinned or checked against the trust list before any secure channel or password."""
        if self.config.security_policy == "None":
            return
        if self._certificate is None or self._private_key is None:
            self._own_certificate()
            client.application_uri = self._application_uri
        assert self._certificate is not None and self._private_key is not None
        policy = _POLICIES[self.config.security_policy]
        mode = _MODES[self.config.security_mode]
        if self._server_certificate is not None:
            server = self._server_certificate.properties()
        else:
            server = CertProperties(await self._trusted_server_certificate(client, policy, mode), "der")
        await client.set_security(
            policy,
            certificate=self._certificate.properties(),
            private_key=self._private_key.properties(),
            server_certificate=server,
            mode=mode,
        )

    def _own_certificate(self) -> None:
        """Load the generated application certificate, generating it on first start."""
        certificate, key, generated = pki.ensure_application_certificate(self._data_dir, self._agent_id)
        self._certificate = _PemOrDer(certificate, key="certificate")
        self._private_key = _PemOrDer(key, key="private_key", private=True)
        self._application_uri = _application_uri(self._certificate.certificate, self.name)
        sha1, _ = pki.thumbprints(self._certificate.data)
        self.status.info["certificate"] = f"{certificate} (SHA-1 {sha1})"
        assert self._certificate.certificate is not None
        expires = self._certificate.certificate.not_valid_after_utc
        if expires - datetime.now(UTC) < pki.RENEW_BEFORE:
            # Renewing means importing the new certificate into every server: say so well before.
            logger.warning(
                "OPC UA application certificate expires soon; delete it and its key to have a new one generated, "
                "then make the server trust the new one",
                extra={"source": self.name, "certificate": str(certificate), "expires": expires.isoformat()},
            )
        if generated:
            logger.warning(
                "OPC UA application certificate generated; the server must trust it (copy it into its trusted clients)",
                extra={
                    "source": self.name,
                    "certificate": str(certificate),
                    "sha1": sha1,
                    "application_uri": self._application_uri,
                },
            )

    async def _trusted_server_certificate(
        self, client: Client, policy: type[security_policies.SecurityPolicy], mode: ua.MessageSecurityMode
    ) -> bytes:
        """The certificate of the server's endpoint for ``policy``/``mode``, once the trust list accepts it.

        asyncua then checks that the session is opened with this very certificate.
        """
        endpoints = await client.connect_and_get_server_endpoints()
        endpoint = Client.find_endpoint(endpoints, mode, policy.URI)
        der = pki.first_certificate(endpoint.ServerCertificate or b"")
        verdict = self._trust.check(der)
        saved = f" (saved as {verdict.saved_to})" if verdict.saved_to else ""
        if not verdict.trusted:
            self.status.info["server_certificate"] = f"refused: SHA-1 {verdict.sha1}"
            move = (
                f"; if it is the server's, move {verdict.saved_to} into {self._trust.directory}"
                if verdict.saved_to
                else f"; if it is the server's, copy it into {self._trust.directory}"
            )
            raise UntrustedServer(
                f"server certificate {verdict.subject} (SHA-1 {verdict.sha1}, SHA-256 {verdict.sha256}) "
                f"is not in the trust list {self._trust.directory}{move}"
            )
        if verdict.reason == "trust list empty":
            self.status.info["server_certificate"] = f"unverified (trust list empty): SHA-1 {verdict.sha1}"
            if verdict.sha1 not in self._accepted_unverified:
                self._accepted_unverified.add(verdict.sha1)
                logger.warning(
                    "OPC UA server certificate accepted unverified: the trust list is empty; "
                    "move the saved certificate into it to refuse any other",
                    extra={
                        "source": self.name,
                        "subject": verdict.subject,
                        "sha1": verdict.sha1,
                        "sha256": verdict.sha256,
                        "saved_to": str(verdict.saved_to) if verdict.saved_to else None,
                        "trust_dir": str(self._trust.directory),
                    },
                )
        else:
            self.status.info["server_certificate"] = f"trusted ({verdict.reason}): SHA-1 {verdict.sha1}{saved}"
        return der

    def _subscription_parameters(self) -> ua.CreateSubscriptionParameters:
        interval = self.config.publishing_interval
        keepalive = max(3, math.ceil(_KEEPALIVE_PERIOD / interval))
        return ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval * 1000,
            # The server keeps the subscription (and what we did not acknowledge) this long
            # without Publish requests: while we back-pressure, and after we went away.
            RequestedLifetimeCount=max(3 * keepalive, math.ceil(self.config.subscription_lifetime / interval)),
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=_MAX_NOTIFICATIONS_PER_PUBLISH,
            PublishingEnabled=True,
            Priority=0,
        )

    async def _close(self, client: Client, *, polite: bool) -> None:
        """Close the session and stop asyncua's tasks; bounded in time. The subscription stays on the server.

        ``polite``: tell the server (CloseSession, keeping the subscription, so the next
        start takes it over with the values produced meanwhile). Otherwise the connection
        is dead, hung or was never made: a request would only fail or wait out the timeout,
        so the socket is dropped and only asyncua's own tasks are stopped.
        """
        try:
            async with asyncio.timeout(self.config.timeout):
                if polite:
                    await client.uaclient.close_session(delete_subscriptions=False)
                    await client.disconnect()
                else:
                    # disconnect() would send CloseSession and CloseSecureChannel on a dead connection
                    # and log each failure as an ERROR with a traceback: a normal disconnect is no error.
                    client.disconnect_socket()
                    await client.close_session()  # stops asyncua's tasks; its request fails at once
        except Exception as exc:
            logger.debug("Closing the OPC UA client failed", extra={"source": self.name, "error": _describe(exc)})

    def _connection_lost(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    # --- the subscription: take over the previous one, or create one ----------------------------

    def _fingerprint(self) -> str:
        """What the monitored items of a subscription depend on: a changed config is not taken over."""
        config = self.config
        what = [config.endpoint, self._nodes, config.queue_size, config.sampling_interval]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

    async def _load_state(self, output: SourceOutput) -> _Subscription | None:
        try:
            text = await output.load_state(_STATE_KEY)
        except Exception as exc:
            logger.warning(
                "Cannot read the OPC UA subscription kept in the buffer; creating a new one",
                extra={"source": self.name, "error": _describe(exc)},
            )
            return None
        if not text:
            return None
        try:
            return _Subscription.from_json(text)
        except (ValueError, TypeError, KeyError, msgspec.DecodeError) as exc:
            logger.warning(
                "Ignoring an unreadable OPC UA subscription state", extra={"source": self.name, "error": repr(exc)}
            )
            return None

    async def _save_state(self, output: SourceOutput, state: str | None) -> None:
        """Keep what the next start needs to take the subscription over (``_Subscription.to_json``)."""
        try:
            await output.save_state(_STATE_KEY, state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Only the take-over after a restart suffers (it would repeat or miss a batch).
            self._state_errors += 1
            if self._state_errors == 1 or self._state_errors % 1000 == 0:
                logger.warning(
                    "Cannot keep the OPC UA subscription state in the buffer",
                    extra={"source": self.name, "error": _describe(exc), "failures": self._state_errors},
                )

    async def _take_over(self, client: Client, output: SourceOutput) -> _Subscription | None:
        """Transfer the previous session's subscription to this one, and republish what the server kept.

        Returns None (a new subscription is then created) when there is none, the config
        changed, or the server cannot transfer it (expired, restarted, not supported).
        """
        previous = self._taken
        if previous is None:
            return None
        log = {"source": self.name, "subscription_id": previous.subscription_id}
        if previous.fingerprint != self._fingerprint():
            logger.info("OPC UA tags changed since the last subscription; not taking it over", extra=log)
            self._save_state_soon(output, None)
            await self._state_saved()
            return None
        try:
            # SendInitialValues: the first Publish after the transfer carries the current value
            # of every monitored item, after the notifications republished below, as a new
            # subscription's first Publish does (the rules start from current values).
            results = await client.uaclient.transfer_subscriptions(
                ua.TransferSubscriptionsParameters(
                    SubscriptionIds=[ua.UInt32(previous.subscription_id)], SendInitialValues=True
                )
            )
            status = results[0].StatusCode if results else ua.StatusCode(ua.UInt32(ua.StatusCodes.BadUnexpectedError))
        except ua.UaStatusCodeError as exc:  # BadServiceUnsupported, BadNotImplemented, ...
            status = ua.StatusCode(ua.UInt32(exc.code))
            results = []
        if not status.is_good():
            self.transfer_fallbacks += 1
            self.status.info["subscription"] = f"new ({status.name} on transfer)"
            if not self._fallback_logged:
                self._fallback_logged = True
                logger.warning(
                    "OPC UA server cannot transfer the previous subscription; creating a new one "
                    "(values it held are not recovered)",
                    extra={**log, "error": status.name},
                )
            else:
                logger.info("OPC UA subscription not transferred", extra={**log, "error": status.name})
            self._save_state_soon(output, None)
            await self._state_saved()
            return None
        subscription = msgspec.structs.replace(previous)
        self.transfers += 1
        await self._resolve_all(client)
        available = sorted(int(n) for n in results[0].AvailableSequenceNumbers)
        republished = 0
        for number in available:
            if not _after(number, subscription.committed):
                self._acks.append(ua.SubscriptionAcknowledgement(subscription.subscription_id, number))
                continue
            try:
                message = await client.uaclient.session.republish(subscription.subscription_id, number)
            except ua.UaStatusCodeError as exc:  # BadMessageNotAvailable: the server dropped it meanwhile
                logger.warning(
                    "OPC UA server no longer holds a notification", extra={**log, "sequence": number, "error": str(exc)}
                )
                continue
            if message.NotificationData:
                await self._deliver(output, subscription, message)
                republished += 1
        self.republished += republished
        if not previous.proven:
            # The previous take-over of this subscription was answered Good and then never
            # delivered (the agent stopped before it could tell): the server takes it over
            # in name only. What it kept was republished above; now a working one.
            await self._abandon(client, subscription, "previous take-over gave no notification")
            return None
        subscription.proven = False
        # The nodes the server refused before: tried again now, as a new subscription would.
        pending = [h for h in range(len(self._tags)) if h not in subscription.monitored]
        if pending:
            refused = await self._monitor(client, subscription.subscription_id, pending)
            subscription.monitored = sorted(set(subscription.monitored) | (set(pending) - set(refused)))
        self.status.info["subscription"] = f"taken over ({republished} republished)"
        logger.info(
            "OPC UA subscription taken over",
            extra={**log, "available": len(available), "republished": republished},
        )
        self._save_state_soon(output, subscription)
        await self._state_saved()
        return subscription

    async def _prove(self, client: Client, output: SourceOutput, subscription: _Subscription) -> _Subscription:
        """Wait for the taken-over subscription's first Publish response; replace it if none comes.

        A server may answer TransferSubscriptions with Good and yet go on serving the
        subscription to the old connection (asyncua's server does), so the new session
        never hears of it again. Data or keep-alive, a response is due within the
        keep-alive period whatever the data does; a compliant server sends the initial
        values at once.
        """
        keepalive_period = subscription.keepalive * subscription.interval or _KEEPALIVE_PERIOD
        deadline = keepalive_period + subscription.interval + self.config.timeout
        heard = asyncio.create_task(self._heard.wait())
        lost = asyncio.create_task(self._lost.wait())
        try:
            await asyncio.wait([heard, lost], timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        finally:
            heard.cancel()
            lost.cancel()
        if self._lost.is_set():
            raise _ConnectionLost(self._lost_reason or "connection lost")
        if self._heard.is_set():
            return subscription
        replacing = self._replacing = asyncio.Event()
        try:
            await self._abandon(client, subscription, "take-over gave no notification")
            new = await self._subscribe(client, output)
            self._active = new
        finally:
            replacing.set()
        return new

    def _proven(self, output: SourceOutput, subscription: _Subscription) -> None:
        subscription.proven = True
        self._heard.set()
        self._save_state_soon(output, subscription)

    async def _abandon(self, client: Client, subscription: _Subscription, why: str) -> None:
        """Give up a taken-over subscription that does not deliver: delete it (best effort), count, log."""
        self.transfer_fallbacks += 1
        self.silent_takeovers += 1
        self.status.info["subscription"] = "new (no notification after take-over)"
        log = {"source": self.name, "subscription_id": subscription.subscription_id}
        if not self._silent_logged:
            self._silent_logged = True
            logger.warning(f"OPC UA {why}; creating a new subscription", extra=log)
        else:
            logger.info(f"OPC UA {why}; creating a new subscription", extra=log)
        request = ua.DeleteSubscriptionsRequest()
        request.Parameters = ua.DeleteSubscriptionsParameters(SubscriptionIds=[ua.UInt32(subscription.subscription_id)])
        try:
            await _protocol(client).send_request(request, timeout=self.config.timeout)
        except Exception as exc:  # the server keeps it until its lifetime ends; nothing else to do
            logger.debug("Deleting the silent subscription failed", extra={**log, "error": _describe(exc)})

    async def _subscribe(self, client: Client, output: SourceOutput) -> _Subscription:
        """A new subscription with a monitored item per tag (the ones the server refuses are retried)."""
        request = ua.CreateSubscriptionRequest()
        request.Parameters = self._subscription_parameters()
        # Sent through the connection's public send_request, not uaclient.create_subscription,
        # which would start asyncua's publish loop (it acknowledges what it receives at once).
        data = await _protocol(client).send_request(request)
        response = struct_from_binary(ua.CreateSubscriptionResponse, data)
        response.ResponseHeader.ServiceResult.check()
        result = response.Parameters
        refused = await self._monitor(client, result.SubscriptionId, range(len(self._tags)))
        subscription = _Subscription(
            subscription_id=int(result.SubscriptionId),
            committed=0,
            fingerprint=self._fingerprint(),
            interval=max(result.RevisedPublishingInterval / 1000, 0.0),
            keepalive=max(int(result.RevisedMaxKeepAliveCount), 1),
            monitored=[h for h in range(len(self._tags)) if h not in refused],
        )
        self.status.info.setdefault("subscription", "new")
        self._save_state_soon(output, subscription)
        await self._state_saved()
        return subscription

    async def _resolve_all(self, client: Client) -> None:
        """The server's namespace indexes of every node (for writes after a take-over)."""
        if any(isinstance(node_id, ua.ExpandedNodeId) for node_id in self._node_ids):
            namespaces = await client.get_namespace_array()
        else:
            namespaces = []
        for handle in range(len(self._tags)):
            self._resolve(handle, namespaces)

    # --- publish: our own loop, acknowledging only what is committed -----------------------------

    def _publisher(self, client: Client) -> Callable[[list[ua.SubscriptionAcknowledgement]], Awaitable[Any]]:
        """How this session sends a PublishRequest: with the fast decoder if it passes its check, else asyncua's."""
        problem: str | None = "turned off (fast_decoder = false)"
        if self.config.fast_decoder:
            problem = fast_publish.problem(client)
        if problem is None:
            self.status.info["decoder"] = "fast"
            return fast_publish.publisher(client)
        if self.config.fast_decoder and not self._decoder_logged:
            self._decoder_logged = True
            logger.warning(
                "Fast OPC UA publish decoder not used; asyncua decodes (slower, same results)",
                extra={"source": self.name, "reason": problem},
            )
        self.status.info["decoder"] = "asyncua"
        return client.uaclient.publish

    async def _publish_loop(
        self,
        publish: Callable[[list[ua.SubscriptionAcknowledgement]], Awaitable[Any]],
        output: SourceOutput,
    ) -> None:
        """Publish, commit, acknowledge in the next request; until the connection ends (then sets ``_lost``).

        One request is outstanding at a time, so while a batch waits for its commit (the
        buffer back-pressures) no request goes out and the server keeps the values.
        Delivers for ``_active``, which a silent take-over replaces while the loop runs.
        """
        try:
            while True:
                acks = self._acks
                try:
                    response = await publish(acks)
                except (ua.uaerrors.BadTimeout, ua.uaerrors.BadTooManyPublishRequests):
                    continue  # the acks are sent again (harmless if the server has them)
                except UaStructParsingError:
                    # asyncua logged it; the notification is not acknowledged, so the server
                    # keeps it for the take-over of the next session
                    raise _ConnectionLost("unreadable publish response") from None
                if self._acks is acks:
                    self._acks = []
                else:
                    del self._acks[: len(acks)]
                self._last_publish = time.monotonic()
                result = response.Parameters
                subscription = self._active
                assert subscription is not None
                if result.SubscriptionId != subscription.subscription_id:
                    if self._replacing is None:
                        continue  # not ours (a subscription of this session we do not know)
                    # The replacing subscription may answer before its id is known here.
                    await self._replacing.wait()
                    subscription = self._active
                    assert subscription is not None
                    if result.SubscriptionId != subscription.subscription_id:
                        continue
                if not subscription.proven:
                    self._proven(output, subscription)
                message = result.NotificationMessage
                if message.NotificationData:
                    await self._deliver(output, subscription, message)
        except asyncio.CancelledError:
            raise
        except (ua.uaerrors.BadNoSubscription, ua.uaerrors.BadSubscriptionIdInvalid) as exc:
            self._connection_lost(f"subscription gone ({_describe(exc)})")
        except Exception as exc:
            self._connection_lost(f"publish failed ({_describe(exc)})")

    async def _deliver(
        self, output: SourceOutput, subscription: _Subscription, message: ua.NotificationMessage
    ) -> None:
        """Commit one notification message as one batch (retrying until it is), then queue its acknowledgement."""
        self._publishing = True
        try:
            backoff: Backoff | None = None
            batch: list[Reading] | None = None
            while True:
                try:
                    if batch is None:
                        batch = self._readings_of(message.NotificationData)
                    if batch:
                        await output.readings(batch)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Not acknowledged: the server keeps it (and, as we send no Publish meanwhile,
                    # the values after it) until the commit succeeds.
                    self.uncommitted += 1
                    self.status.info["uncommitted"] = str(self.uncommitted)
                    now = time.monotonic()
                    if now - self._uncommitted_logged_at >= 60:
                        self._uncommitted_logged_at = now
                        logger.warning(
                            "OPC UA readings not committed; not acknowledged to the server, retrying",
                            extra={
                                "source": self.name,
                                "error": _describe(exc),
                                "sequence": message.SequenceNumber,
                                "failures": self.uncommitted,
                            },
                            exc_info=None if isinstance(exc, BufferUnavailable) else exc,
                        )
                    backoff = backoff or Backoff(base=0.05, cap=2.0, minimum=0.02)
                    await backoff.wait()
        finally:
            self._publishing = False
            self._last_publish = time.monotonic()
        self._acks.append(ua.SubscriptionAcknowledgement(subscription.subscription_id, message.SequenceNumber))
        if _after(message.SequenceNumber, subscription.committed):
            subscription.committed = int(message.SequenceNumber)
        self._save_state_soon(output, subscription)

    def _save_state_soon(self, output: SourceOutput, subscription: _Subscription | None) -> None:
        """Save the committed sequence number without holding up the next Publish (one save at a time, in order).

        It only keeps a restart from fetching again the one batch whose acknowledgement
        had not reached the server yet, so it need not delay the acknowledgement.
        """
        self._taken = subscription  # what the next session of this run takes over
        previous = self._state_task
        snapshot = subscription.to_json() if subscription is not None else None  # as it is now, not when saved

        async def save() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await self._save_state(output, snapshot)

        self._state_task = asyncio.create_task(save(), name=f"opcua-state-{self.name}")

    async def _state_saved(self) -> None:
        """Wait (bounded) for the last scheduled state save, e.g. before the session closes."""
        task, self._state_task = self._state_task, None
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self.config.timeout)

    async def _watch(self, client: Client, output: SourceOutput, subscription: _Subscription) -> None:
        """Wait for the connection to end; meanwhile retry refused nodes and check keep-alives.

        Wakes only for a retry or a keep-alive deadline (seconds apart), never polls.
        """
        # The server sends at least a keep-alive every keepalive period; silence much longer
        # than that (while we are not ourselves holding the publish loop) means the
        # subscription or the publish loop died even though the socket is up.
        interval = subscription.interval
        keepalive_period = subscription.keepalive * interval or _KEEPALIVE_PERIOD
        keepalive_timeout = 2 * keepalive_period + interval + self.config.timeout
        retry_at = time.monotonic() + self.config.bad_node_retry
        while True:
            now = time.monotonic()
            if not self._publishing and now - self._last_publish > keepalive_timeout:
                self._connection_lost(f"no publish response for {round(now - self._last_publish)}s")
            pending = [h for h in range(len(self._tags)) if h not in subscription.monitored]
            if pending and now >= retry_at:
                refused = await self._monitor(client, subscription.subscription_id, pending, retry=True)
                if len(refused) < len(pending):
                    subscription.monitored = sorted(set(subscription.monitored) | (set(pending) - set(refused)))
                    self._save_state_soon(output, subscription)
                retry_at = now + self.config.bad_node_retry
            wake = self._last_publish + keepalive_timeout if not self._publishing else now + keepalive_timeout
            if pending:
                wake = min(wake, retry_at)
            try:
                await asyncio.wait_for(self._lost.wait(), max(wake - now, 0.05))
            except TimeoutError:
                continue
            raise _ConnectionLost(self._lost_reason or "connection lost")

    # --- monitored items ------------------------------------------------------------------------

    async def _monitor(
        self, client: Client, subscription_id: int, handles: Sequence[int], *, retry: bool = False
    ) -> list[int]:
        """Create monitored items for ``handles``; returns the handles the server refused."""
        handles = list(handles)
        failed: dict[int, str] = {}
        if any(isinstance(self._node_ids[h], ua.ExpandedNodeId) for h in handles if h not in self._resolved):
            namespaces = await client.get_namespace_array()
        else:
            namespaces = []
        requests: list[ua.MonitoredItemCreateRequest] = []
        requested: list[int] = []
        sampling_ms = self.config.sampling_interval * 1000 if self.config.sampling_interval > 0 else -1.0
        for handle in handles:
            node_id = self._resolved.get(handle) or self._resolve(handle, namespaces)
            if node_id is None:
                failed[handle] = "BadNamespaceUnknown"
                continue
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(NodeId=node_id, AttributeId=ua.AttributeIds.Value),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=ua.MonitoringParameters(
                        ClientHandle=handle,
                        SamplingInterval=sampling_ms,
                        QueueSize=self.config.queue_size,
                        DiscardOldest=True,
                    ),
                )
            )
            requested.append(handle)
        results: list[ua.MonitoredItemCreateResult] = []
        for start in range(0, len(requests), _MAX_ITEMS_PER_CALL):
            results += await client.uaclient.create_monitored_items(
                ua.CreateMonitoredItemsParameters(
                    SubscriptionId=subscription_id,
                    ItemsToCreate=requests[start : start + _MAX_ITEMS_PER_CALL],
                    # Source only: the source time is what events carry, and decoding a second
                    # timestamp per value is a measurable share of the client's CPU.
                    TimestampsToReturn=ua.TimestampsToReturn.Source,
                )
            )
        for handle, result in zip(requested, results, strict=True):
            if not result.StatusCode.is_good():
                failed[handle] = result.StatusCode.name
        degraded = self.status.degraded
        for handle in requested:
            reason = None if handle in failed else self._refused.pop(handle, None)
            if reason is not None:
                # Only the refusal is cleared here; a Bad value is the notifications' business.
                if degraded.get(self._nodes[handle]) == reason:
                    del degraded[self._nodes[handle]]
                logger.info(
                    "OPC UA node subscribed after being refused",
                    extra={"source": self.name, "node": self._nodes[handle], "tag": self._tags[handle]},
                )
        for handle, reason in failed.items():
            node = self._nodes[handle]
            if self._refused.get(handle) != reason:
                logger.warning(
                    "OPC UA node refused, retrying periodically",
                    extra={"source": self.name, "node": node, "tag": self._tags[handle], "error": reason},
                )
            elif retry:
                logger.debug("OPC UA node still refused", extra={"source": self.name, "node": node, "error": reason})
            self._refused[handle] = reason
            degraded[node] = reason
        return list(failed)

    def _resolve(self, handle: int, namespaces: list[str]) -> ua.NodeId | None:
        node_id = self._node_ids[handle]
        if isinstance(node_id, ua.ExpandedNodeId) and node_id.NamespaceUri:
            try:
                index = namespaces.index(node_id.NamespaceUri)
            except ValueError:
                return None
            node_id = ua.NodeId(node_id.Identifier, ua.Int16(index), node_id.NodeIdType)
        self._resolved[handle] = node_id
        return node_id

    # --- the hot path: one publish response -> one batch ----------------------------------------

    def _readings_of(self, notifications: Sequence[Any]) -> list[Reading]:
        """The readings of one notification message (either decoder's), in server order."""
        take = self._take
        batch: list[Reading] = []
        for notification in notifications:
            kind = type(notification)
            if kind is FastDataChange:
                self.fast_notifications += 1
                take(notification.items, batch)
            elif kind is ua.DataChangeNotification:
                take([_item(n) for n in notification.MonitoredItems], batch)
            elif isinstance(notification, ua.StatusChangeNotification):
                self._subscription_status(notification.Status)
        return batch

    def _items_taker(self) -> Callable[[list[Item], list[Reading]], None]:
        """The per-value logic, shared by both decoders: items -> readings appended to a batch.

        An item is ``(client_handle, value, status_code, source_time, server_time)``
        (``protocols.opcua_publish.Item``); ``value`` is a plain value or a ``ua.Variant``.
        """
        tags = self._tags
        nodes = self._nodes
        count = len(tags)
        degraded = self.status.degraded
        plain = _PLAIN_TYPES
        variant_type = ua.Variant

        def take(items: list[Item], batch: list[Reading]) -> None:
            now: datetime | None = None
            append = batch.append
            for handle, value, code, stamp, server_stamp in items:
                if handle >= count:  # not one of ours (cannot happen with a sane server)
                    continue
                if stamp is None or stamp.year < _EPOCH_GUARD:
                    stamp = server_stamp
                    if stamp is None or stamp.year < _EPOCH_GUARD:
                        stamp = now = now or datetime.now(UTC)
                severity = code >> _SEVERITY_SHIFT
                quality: Quality
                if severity >= 2:
                    value = None
                    quality = "bad"
                    self._bad_value(handle, code)
                else:
                    if value is not None and type(value) not in plain:
                        variant = None
                        if type(value) is variant_type:
                            variant = value
                            value = variant.Value
                        if value is not None and type(value) not in plain:
                            original = value
                            value = _plain(value)
                            if value is _SKIP:
                                name = variant.VariantType.name if variant is not None else type(original).__name__
                                self._skip(handle, name)
                                continue
                    quality = "good" if severity == 0 else "uncertain"
                    if degraded and nodes[handle] in degraded:
                        self._good_value(handle)
                if code & _OVERFLOW_BITS == _OVERFLOW_BITS:
                    self._overflow(handle)
                append(Reading(tags[handle], value, stamp, quality))

        return take

    def _subscription_status(self, status: ua.StatusCode) -> None:
        # BadTimeout: the server expired the subscription; BadShutdown: asyncua saw the
        # connection die. Either way only a new session and subscription help.
        if not status.is_good():
            self._connection_lost(f"subscription ended: {status.name}")

    def _bad_value(self, handle: int, code: int) -> None:
        node = self._nodes[handle]
        reason = ua.StatusCode(ua.UInt32(code)).name
        if self.status.degraded.get(node) != reason:
            self.status.degraded[node] = reason
            logger.warning(
                "OPC UA node reports a bad value",
                extra={"source": self.name, "node": node, "tag": self._tags[handle], "error": reason},
            )

    def _good_value(self, handle: int) -> None:
        node = self._nodes[handle]
        if self.status.degraded.pop(node, None) is not None:
            logger.info("OPC UA node good again", extra={"source": self.name, "node": node, "tag": self._tags[handle]})

    def _skip(self, handle: int, type_name: str) -> None:
        if handle not in self._skipped_types:
            self._skipped_types.add(handle)
            logger.warning(
                "OPC UA value skipped: arrays and byte strings are not supported",
                extra={
                    "source": self.name,
                    "node": self._nodes[handle],
                    "tag": self._tags[handle],
                    "type": type_name,
                },
            )

    def _overflow(self, handle: int) -> None:
        self.overflows += 1
        now = time.monotonic()
        if now - self._overflow_logged_at >= 60:
            self._overflow_logged_at = now
            logger.warning(
                "OPC UA server dropped values from a full queue; raise queue_size or relieve the buffer",
                extra={"source": self.name, "node": self._nodes[handle], "overflows": self.overflows},
            )

    # --- write: the PLC handshake ---------------------------------------------------------------

    async def write(self, tag: str, value: Any) -> None:
        """Write ``value`` to the tag's node, encoded as the node's data type (Boolean for an ack).

        Only the value is sent, no timestamps or status: many PLCs (S7-1500, Kepware)
        refuse those with BadWriteNotSupported. Raises ``SourceError`` when not
        connected or when the server refuses the write.
        """
        handle = self._handle_of_tag.get(tag)
        if handle is None:
            raise SourceError(f"{self.name}: no tag {tag!r} on this source")
        client = self._client
        if client is None:
            raise SourceError(f"{self.name}: not connected to {self.config.endpoint}; cannot write {tag}")
        node_id = self._resolved.get(handle)
        if node_id is None:
            reason = self._refused.get(handle, "not resolved")
            raise SourceError(f"{self.name}: node {self._nodes[handle]} of {tag} is not available ({reason})")
        try:
            vtype = self._write_types.get(handle)
            if vtype is None:
                vtype = await self._variant_type(client, node_id)
                self._write_types[handle] = vtype
            variant = ua.Variant(_coerce(value, vtype), vtype)
            results = await client.uaclient.write(
                ua.WriteParameters(
                    NodesToWrite=[
                        ua.WriteValue(
                            NodeId=node_id,
                            AttributeId=ua.AttributeIds.Value,
                            Value=ua.DataValue(variant, StatusCode=None),
                        )
                    ]
                )
            )
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{self.name}: cannot write {value!r} to {tag} ({self._nodes[handle]}): {exc}") from exc
        except Exception as exc:
            raise SourceError(f"{self.name}: writing {tag} failed: {_describe(exc)}") from exc
        status = results[0]
        if not status.is_good():
            raise SourceError(f"{self.name}: server refused the write to {tag} ({self._nodes[handle]}): {status.name}")

    async def _variant_type(self, client: Client, node_id: ua.NodeId) -> ua.VariantType:
        data_type = await client.get_node(node_id).read_data_type()
        if data_type.NamespaceIndex == 0 and isinstance(data_type.Identifier, int) and 1 <= data_type.Identifier <= 25:
            return ua.VariantType(data_type.Identifier)
        # a derived type (an enumeration, a vendor subtype of Double, ...): find its base
        vtype: ua.VariantType = await data_type_to_variant_type(client.get_node(data_type))
        return vtype


_INTEGER_TYPES = frozenset(
    {
        ua.VariantType.SByte,
        ua.VariantType.Byte,
        ua.VariantType.Int16,
        ua.VariantType.UInt16,
        ua.VariantType.Int32,
        ua.VariantType.UInt32,
        ua.VariantType.Int64,
        ua.VariantType.UInt64,
    }
)


def _coerce(value: Any, vtype: ua.VariantType) -> Any:
    """``value`` as the Python type asyncua encodes for ``vtype``; ValueError when it does not fit."""
    if vtype is ua.VariantType.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        raise ValueError(f"a Boolean node takes true or false, not {value!r}")
    if vtype in _INTEGER_TYPES:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return int(value)
        raise ValueError(f"a {vtype.name} node takes an integer, not {value!r}")
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, int | float):
            return float(value)
        raise ValueError(f"a {vtype.name} node takes a number, not {value!r}")
    if vtype is ua.VariantType.String:
        return str(value)
    return value
