"""MQTT sink: canonical events to a broker, acknowledged by the broker's PUBACK.

Wire mapping (contract): each event body (the structured-mode CloudEvent, as the
buffer stored it) is published with the configured QoS (default 1), not retained,
to ``{topic_prefix}/{lane}/{type without "io.plantgate."}``. On every connect the
agent publishes ``{"state": "online", "agent", "site", "version", "time"}``
retained to ``{topic_prefix}/status/{agent_id}``; ``offline`` is its last will,
and is also published before a clean disconnect. An event is ``ACKED`` only after
its PUBACK (for QoS 0: once written to the socket).

How paho is driven: no network thread. paho-mqtt's external-loop API (socket
callbacks plus ``loop_read`` / ``loop_write`` / ``loop_misc``; ``read_packets`` in
place of ``loop_read`` on the fast path, below) is wired to the asyncio loop: the
socket is registered with ``add_reader``, and with ``add_writer`` only while paho
has bytes queued (fast-path publishes are written at once), so PUBACKs are parsed on
the loop thread and each readable event settles every ack in the socket at once;
the waiting ``deliver`` is woken once per batch of acks, not once per ack.
``loop_misc`` (keepalive) runs about once a second. Only the blocking ``connect()``
(TCP, TLS handshake, DNS) runs in a short-lived daemon thread per attempt, before
the socket is handed to the loop.

Flow control is ours, not paho's: paho's own ``max_inflight_messages`` queue scans
its whole message dict on every ack (13.7k acks/s at 1000 in flight in an earlier
measurement), so it is switched off (0) and ``window`` bounds the unacknowledged
publishes instead; the window is refilled as soon as any ack arrives, which keeps
data flowing so our TCP ACKs ride on it. Brokers send PUBACKs with Nagle on
(mosquitto's default), so each PUBACK after the first waits for our TCP ACK: the
socket has TCP_NODELAY, and TCP_QUICKACK is re-armed after each read while acks are
owed, or every batch end would stall ~40 ms on the kernel's delayed ACK.

Fast path (``_FastPahoClient``): with paho alone, ~60 us of CPU went into each event,
two thirds of it parsing PUBACKs (three ``recv()`` calls, a ``Properties`` and a
``ReasonCode`` per 4-byte packet) and most of the rest in ``publish()`` (an
``MQTTMessage`` and a ``threading.Condition`` per message, one ``send()`` per packet).
So QoS 1 event publishes are encoded here and queued for paho's writer a window
refill at a time (a few ``send()`` calls), and the socket is read with one ``recv()``
of up to 64 KiB whose PUBACKs are matched right away; paho still handles the
connection itself and every other packet. That relies on paho internals, kept in that
one class and checked at start-up; if the check fails (another paho version), plain
paho is used: slower, same behaviour. Measured with the backlog drain bench (2 vCPU,
~500-byte events, QoS 1, window 500, mosquitto and a subscriber on the same machine):
12-16 us of agent CPU per event instead of 47-67, and 23-33k events/s instead of
12-15k; the broker and the subscriber are now the limit.

Duplicates: every connection uses a fresh paho ``Client`` with a clean session.
What was in flight when a connection dropped is reported ``RETRY`` and published
again by the next ``deliver`` (same CloudEvent id), never re-sent by paho on its
own; nothing is handed to paho while disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as paho
from paho.mqtt import __version__ as _PAHO_VERSION
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from agent.backoff import Backoff
from agent.config_types import BuildContext, Duration, mask_secret, read_secret
from agent.events import LANES, TYPE_PREFIX, Lane, utc_now
from agent.health import ComponentStatus
from agent.sink import ACKED, RETRY, BufferedEvent, Outcome, Rejected, SinkConfig

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS
# CONNACK reasons that mean "fix the credentials", reported as state "unauthorized".
_AUTH_REFUSALS = {"Bad user name or password", "Not authorized"}
# A connection must last this long before the reconnect backoff starts from scratch again,
# so two agents fighting over one client id do not reconnect in a tight loop.
_STABLE_AFTER = 10.0
# On shutdown: how long to wait for the PUBACK of the retained "offline", then for the close.
_OFFLINE_ACK_WAIT = 2.0
_CLOSE_WAIT = 1.0
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


# --- configuration ---------------------------------------------------------------------------------


class MqttSinkConfig(SinkConfig):
    """One ``[[sinks.mqtt]]`` entry: the broker, the topics and the delivery limits."""

    name: str = Field(
        min_length=1,
        description="Name of this sink; the buffer keys its backlog by it, so renaming starts a new backlog",
    )
    url: str = Field(
        description='Broker address: "mqtt://host:port" for plain TCP, "mqtts://host:port" for TLS '
        "(default ports 1883 and 8883). No credentials in the url: use username and password_file",
        examples=["mqtts://broker.example.com:8883"],
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        description='MQTT client id, unique on the broker; default "plantgate-{agent id}"',
    )
    topic_prefix: str | None = Field(
        None,
        min_length=1,
        description='Topic prefix; events go to "{topic_prefix}/{lane}/{type}", status to '
        '"{topic_prefix}/status/{agent id}". Default "plantgate/{site}"',
    )
    qos: int = Field(
        1, ge=0, le=1, description="MQTT QoS of event publishes: 1 (PUBACK, at-least-once) or 0 (fire and forget)"
    )
    lanes: list[Lane] = Field(
        default_factory=lambda: list(LANES),
        min_length=1,
        description="Lanes this sink forwards: transaction, operational, telemetry",
    )
    max_rate: float = Field(
        0,
        ge=0,
        description="Ceiling in events per second, so a backlog replay does not flood the broker (0 = unlimited)",
    )
    window: int = Field(
        500,
        ge=1,
        le=10000,
        description="Maximum number of published events waiting for their PUBACK at once",
    )
    keepalive: Duration = Field(
        30.0,
        ge=1,
        le=65535,
        description="MQTT keepalive: idle time before a PINGREQ; no answer within it drops the connection",
    )
    connect_timeout: Duration = Field(10.0, gt=0, description="Time allowed for TCP connect, TLS handshake and CONNACK")
    ack_timeout: Duration = Field(
        30.0,
        gt=0,
        description="Time without any PUBACK while publishes are pending after which the connection is "
        "considered dead: the unacknowledged events are retried on a new connection",
    )
    reconnect_max_backoff: Duration = Field(
        30.0, gt=0, description="Upper bound of the jittered exponential wait between reconnect attempts"
    )
    ca_file: Path | None = Field(
        None, description="mqtts: PEM file of the CA(s) that sign the broker's certificate (default: system CAs)"
    )
    cert_file: Path | None = Field(None, description="mqtts: client certificate (PEM) for mutual TLS; needs key_file")
    key_file: Path | None = Field(None, validate_default=True, description="mqtts: private key (PEM) of cert_file")
    username: str | None = Field(None, min_length=1, description="MQTT username")
    password_file: Path | None = Field(
        None, description="File holding the MQTT password (e.g. a systemd credential); wins over password"
    )
    password: SecretStr | None = Field(
        None, description="MQTT password, from the environment only (never write it in the file)"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f'scheme must be "mqtt" or "mqtts", not {parts.scheme or "missing"!r}')
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials do not belong in the url; use username and password_file")
        if not parts.hostname:
            raise ValueError("the url has no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        if port == 0:
            raise ValueError("port 0 is not a broker port")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError('an MQTT url is only "scheme://host:port", without path or query')
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is not None:
            if "+" in value or "#" in value or "\x00" in value:
                raise ValueError("a topic prefix cannot contain the wildcards + or # (or NUL)")
            if value.endswith("/"):
                raise ValueError('a topic prefix does not end with "/"')
        return value

    @field_validator("lanes")
    @classmethod
    def _unique_lanes(cls, value: list[Lane]) -> list[Lane]:
        if len(set(value)) != len(value):
            raise ValueError("each lane may be listed once")
        return value

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _needs_tls(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        url = info.data.get("url")  # absent when the url itself was invalid
        if value is not None and url is not None and urlsplit(url).scheme != "mqtts":
            raise ValueError("TLS files need an mqtts:// url")
        return value

    @field_validator("key_file")
    @classmethod
    def _key_with_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("cert_file") is None) and "cert_file" in info.data:
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        return value

    @field_validator("password_file", "password")
    @classmethod
    def _password_needs_username(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("username") is None:
            raise ValueError("a password needs a username (MQTT 3.1.1)")
        return value

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # validated
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or DEFAULT_PORTS[parts.scheme]

    @property
    def credentials_in_clear(self) -> bool:
        """True when a username/password would travel unencrypted (``mqtt://``); ``plantgate check`` warns."""
        has_credentials = self.username is not None or self.password_file is not None or self.password is not None
        return has_credentials and not self.tls

    def describe(self, context: BuildContext) -> list[str]:
        """Broker, QoS, lanes and rate; the password masked."""
        user = ""
        if self.username:
            user = f" user={self.username} password={mask_secret(self.password, self.password_file)}"
        return [f"{self.name} {self.url} qos={self.qos} lanes={','.join(self.lanes)} max_rate={self.max_rate:g}{user}"]

    def warnings(self) -> list[str]:
        """Credentials over plain TCP."""
        if self.credentials_in_clear:
            return [f"sinks.mqtt.{self.name}: username/password travel unencrypted over mqtt://; use mqtts://"]
        return []

    def build(self, context: BuildContext) -> MqttSink:
        """The sink this entry describes (``MqttSinkConfig`` / ``MqttSink``, as Vector pairs them)."""
        return MqttSink(
            self, agent_id=context.agent_id, site=context.site, version=context.version, data_dir=context.data_dir
        )


# --- the sink --------------------------------------------------------------------------------------


class MqttSink:
    """Publishes buffered events to one MQTT broker; see the module docstring for the contract.

    ``run()`` keeps the connection (and reconnects); ``deliver()`` publishes one batch
    over the current connection and reports per event. Neither raises for broker
    trouble: while the broker is away, ``deliver`` answers ``RETRY`` at once and
    ``status.state`` is ``reconnecting`` (or ``unauthorized``).
    """

    def __init__(self, config: MqttSinkConfig, *, agent_id: str, site: str, version: str, data_dir: Path) -> None:
        self.config = config
        self.name = config.name
        self.lanes: frozenset[Lane] = frozenset(config.lanes)
        self.status = ComponentStatus(name=config.name, kind="mqtt")
        self.batch_max = config.window * 2
        self._agent_id = agent_id
        self._site = site
        self._version = version
        self._host = config.host
        self._port = config.port
        # For logs and /status: scheme, host and port only (credentials never live in the url).
        self.url = f"{'mqtts' if config.tls else 'mqtt'}://{self._host}:{self._port}"
        self.client_id = config.client_id or f"plantgate-{agent_id}"
        self.topic_prefix = config.topic_prefix or f"plantgate/{site}"
        self.status_topic = f"{self.topic_prefix}/status/{agent_id}"
        for what, topic in (("topic prefix", self.topic_prefix), ("status topic", self.status_topic)):
            if "+" in topic or "#" in topic:
                raise ValueError(f"{config.name}: the {what} {topic!r} contains an MQTT wildcard (+ or #)")

        def resolve(path: Path | None) -> Path | None:
            return None if path is None else (path if path.is_absolute() else data_dir / path)

        self._ca_file = resolve(config.ca_file)
        self._cert_file = resolve(config.cert_file)
        self._key_file = resolve(config.key_file)
        self._password = read_secret(
            resolve(config.password_file),
            config.password.get_secret_value() if config.password is not None else None,
            key="password",
        )
        if config.tls:
            self._tls_context()  # unreadable or invalid certificate files fail at load, not at connect
        self._topics: dict[tuple[str, str], str] = {}
        self._wire_topics: dict[tuple[str, str], bytes] = {}  # (lane, type) -> encoded topic header
        # The fast QoS 1 path (``_FastPahoClient``) when the installed paho passes its self-check;
        # False forces paho's own publish path (tests of that fallback).
        self._allow_fast_path = True
        self._rate = _TokenBucket(config.max_rate) if config.max_rate > 0 else None
        self._conn: _Connection | None = None
        self._deliver_lock = asyncio.Lock()
        self._failures = 0  # consecutive connection failures, for log levels

    # --- public -----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection to the broker is up (CONNACK received, not yet lost)."""
        conn = self._conn
        return conn is not None and not conn.closing

    @property
    def in_flight(self) -> int:
        """Events published on the current connection and still waiting for their PUBACK."""
        conn = self._conn
        return len(conn.pending) if conn is not None else 0

    def topic_for(self, event: BufferedEvent) -> str:
        """``{topic_prefix}/{lane}/{type without "io.plantgate."}``."""
        key = (event.lane, event.type)
        topic = self._topics.get(key)
        if topic is None:
            name = event.type[len(TYPE_PREFIX) :] if event.type.startswith(TYPE_PREFIX) else event.type
            topic = self._topics[key] = f"{self.topic_prefix}/{event.lane}/{name}"
        return topic

    def _wire_topic(self, event: BufferedEvent) -> bytes:
        """``topic_for(event)`` as a PUBLISH carries it (cached); ValueError for a topic MQTT refuses."""
        key = (event.lane, event.type)
        head = self._wire_topics.get(key)
        if head is None:
            head = self._wire_topics[key] = _FastPahoClient.topic_header(self.topic_for(event))
        return head

    def status_payload(self, state: Literal["online", "offline"]) -> bytes:
        """The retained status message (contract): ``{"state", "agent", "site", "version", "time"}``."""
        return msgspec.json.encode(
            {"state": state, "agent": self._agent_id, "site": self._site, "version": self._version, "time": utc_now()}
        )

    async def run(self) -> None:
        """Connect, stay connected and reconnect with backoff until cancelled; then say offline and close."""
        cap = self.config.reconnect_max_backoff
        backoff = Backoff(base=min(0.2, cap), cap=cap)
        try:
            while True:
                try:
                    conn = await self._connect()
                except _ConnectFailed as exc:
                    self._connect_failed(exc)
                    await backoff.wait()
                    continue
                connected_at = time.monotonic()
                self._conn = conn
                self._failures = 0
                self.status.set_state("connected")
                log.info("Connected to MQTT broker", extra={"sink": self.name, "url": self.url})
                # asyncio.wait, not await: cancelling run() must not cancel the connection's future.
                await asyncio.wait([conn.closed])
                self._conn = None
                reason = conn.closed.result()
                self._failures = 1
                self.status.set_state("reconnecting", reason)
                log.warning(
                    "Lost connection to MQTT broker", extra={"sink": self.name, "url": self.url, "error": reason}
                )
                if time.monotonic() - connected_at >= _STABLE_AFTER:
                    backoff.reset()
                await backoff.wait()
        except asyncio.CancelledError:
            await self._close()
            raise
        finally:
            self.status.set_state("stopped")

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        """Publish ``batch``; one outcome per event, in order (see ``agent.sink.Sink.deliver``).

        ``ACKED`` after the PUBACK (QoS 1) or the socket write (QoS 0); ``RETRY`` for
        whatever is not acknowledged when the connection is down or drops, or when no
        PUBACK arrives for ``ack_timeout``; ``Rejected`` only for an event that can
        never be published (a topic MQTT refuses).
        """
        outcomes: list[Outcome] = [RETRY] * len(batch)
        if not batch:
            return outcomes
        async with self._deliver_lock:
            conn = self._conn
            if conn is None or conn.closing:
                return outcomes
            await conn.publish_batch(batch, outcomes)
        return outcomes

    # --- connection management ------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self._cert_file is not None:
                context.load_cert_chain(str(self._cert_file), str(self._key_file) if self._key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{self.name}: cannot load TLS files: {_describe(exc)}") from exc
        return context

    def _new_client(self) -> paho.Client:
        # A fresh client (and clean session) per connection: paho never re-sends an old
        # connection's in-flight messages behind our back; the buffer retries them.
        fast = self._allow_fast_path and _fast_path_problem() is None
        client = (_FastPahoClient if fast else paho.Client)(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(0)  # flow control is `window`, see the module docstring
        client.connect_timeout = self.config.connect_timeout
        client.will_set(self.status_topic, self.status_payload("offline"), qos=1, retain=True)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self._password)
        if self.config.tls:
            client.tls_set_context(self._tls_context())  # re-read per connection: rotated certs apply
        return client

    async def _connect(self) -> _Connection:
        try:
            client = self._new_client()
        except ValueError as exc:  # TLS files became unreadable since start
            raise _ConnectFailed(str(exc)) from exc
        keepalive = max(1, round(self.config.keepalive))
        try:
            await _in_thread(lambda: client.connect(self._host, self._port, keepalive), abandon=_close_socket(client))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError, CertificateError a ValueError
            raise _ConnectFailed(_describe(exc)) from exc
        try:
            conn = _Connection(self, client)
        except OSError as exc:  # the socket died between connect() and here
            _close_socket(client)()
            raise _ConnectFailed(_describe(exc)) from exc
        try:
            await conn.connack(self.config.connect_timeout)
        except BaseException:
            conn.abort("connect failed")
            raise
        conn.publish_status(self.status_payload("online"))
        return conn

    def _connect_failed(self, exc: _ConnectFailed) -> None:
        self.status.set_state("unauthorized" if exc.unauthorized else "reconnecting", exc.reason)
        extra = {"sink": self.name, "url": self.url, "error": exc.reason}
        if self._failures == 0:
            log.warning("Cannot connect to MQTT broker; retrying with backoff", extra=extra)
        else:
            log.debug("Still cannot connect to MQTT broker", extra=extra)
        self._failures += 1

    async def _close(self) -> None:
        """On cancellation: publish ``offline`` (retained), wait briefly for its PUBACK, disconnect."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.closing:
                await conn.wait_status_ack(conn.publish_status(self.status_payload("offline")), _OFFLINE_ACK_WAIT)
                conn.client.disconnect()
                await asyncio.wait([conn.closed], timeout=_CLOSE_WAIT)
        finally:
            conn.abort("stopped")
        log.info("Disconnected from MQTT broker", extra={"sink": self.name, "url": self.url})


class _ConnectFailed(Exception):
    def __init__(self, reason: str, *, unauthorized: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unauthorized = unauthorized


class _Connection:
    """One broker connection: a paho client whose socket is driven by the asyncio loop.

    Everything here runs on the loop thread. ``closed`` resolves (with the reason)
    once the socket is gone; a connection is never reused after that.
    """

    def __init__(self, sink: MqttSink, client: paho.Client) -> None:
        self.sink = sink
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self.closing = False
        self._connack: asyncio.Future[None] = self.loop.create_future()
        self._reason: str | None = None
        # The delivery under way: packet id -> index into its outcomes. On the fast path this is
        # the client's own map, which its PUBACK parser pops from.
        self._fast: _FastPahoClient | None = client if isinstance(client, _FastPahoClient) else None
        self.pending: dict[int, int] = self._fast.fast_unacked if self._fast is not None else {}
        self._read: Callable[[], MQTTErrorCode] = (
            self._fast.read_packets if self._fast is not None else client.loop_read
        )
        self._outcomes: list[Outcome] = []
        self._acks = 0  # PUBACKs matched so far, to tell progress from silence
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 0  # wake the waiter once len(pending) <= this
        self._status_acks: dict[int, asyncio.Future[None]] = {}
        self._detached = False

        sock = client.socket()
        if not isinstance(sock, socket.socket):  # ssl.SSLSocket is one too; no websockets here
            raise _ConnectFailed("paho returned no socket")
        self._sock: socket.socket = sock
        self._fd = sock.fileno()
        # paho leaves Nagle on: a refill of a few publishes would wait for the broker's TCP ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        if self._fast is not None:
            self._fast.on_fast_acks = self._on_fast_acks
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.loop.add_reader(self._fd, self._on_readable)
        if client.want_write():  # CONNECT not fully written by the connecting thread
            self.loop.add_writer(self._fd, self._on_writable)
        interval = min(1.0, max(0.1, sink.config.keepalive / 4))
        self._misc_interval = interval
        self._misc = self.loop.call_later(interval, self._on_misc)

    # --- paho callbacks (loop thread) ---------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            name = str(reason)
            self._connack.set_exception(
                _ConnectFailed(f"broker refused the connection: {name}", unauthorized=name in _AUTH_REFUSALS)
            )
        else:
            self._connack.set_result(None)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.closing = True
        # Deferred so the caller of loop_read/loop_write can record why first.
        self.loop.call_soon(self._finish)

    def _on_fast_acks(self, indexes: list[int]) -> None:
        # Hot path (from _FastPahoClient.read_packets, which already popped them from pending).
        outcomes = self._outcomes
        for index in indexes:
            outcomes[index] = ACKED
        self._acks += len(indexes)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        # paho's own publishes: the status messages, QoS 0 events, everything without the fast path.
        index = self.pending.pop(mid, None)
        if index is not None:
            self._outcomes[index] = ACKED
            self._acks += 1
        else:
            status = self._status_acks.pop(mid, None)
            if status is not None and not status.done():
                status.set_result(None)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._detach()
        self.loop.call_soon(self._finish)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_writer(self._fd, self._on_writable)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_writer(self._fd)

    # --- loop callbacks ----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            rc = self._read()
            # An SSL socket may hold decrypted bytes that no longer make the fd readable.
            while rc == _SUCCESS and isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                rc = self._read()
        except Exception as exc:
            self.abort(f"read failed: {_describe(exc)}")
            return
        if rc != _SUCCESS:
            self._set_reason(_rc_reason(rc))
            self._finish()
        elif self.pending and _QUICKACK is not None:
            # Brokers (mosquitto by default) send PUBACKs with Nagle on: each small PUBACK after
            # the first waits for our TCP ACK, which the kernel delays by up to 40 ms when we have
            # nothing to send (the end of a batch). Acknowledge at once while acks are owed.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        self._wake()

    def _on_writable(self) -> None:
        try:
            rc = self.client.loop_write()
        except Exception as exc:
            self.abort(f"write failed: {_describe(exc)}")
            return
        if rc != _SUCCESS:
            self._set_reason(_rc_reason(rc))
            self._finish()
        self._wake()  # QoS 0 publishes are acknowledged by the write

    def _on_misc(self) -> None:
        try:
            rc = self.client.loop_misc()
        except Exception as exc:
            self.abort(f"keepalive failed: {_describe(exc)}")
            return
        if rc != _SUCCESS or self.client.socket() is None:
            self._set_reason(f"no answer from the broker within keepalive ({self.sink.config.keepalive:g} s)")
            self._finish()
            return
        self._misc = self.loop.call_later(self._misc_interval, self._on_misc)

    # --- state ---------------------------------------------------------------------------------------------

    def _set_reason(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def _detach(self) -> None:
        """Stop watching the socket, once: its fd number may soon belong to the next connection."""
        self.closing = True
        if self._detached:
            return
        self._detached = True
        self._misc.cancel()
        self.loop.remove_reader(self._fd)
        self.loop.remove_writer(self._fd)
        # paho calls the socket callbacks again when the discarded client is garbage-collected.
        self.client.on_socket_close = None
        self.client.on_socket_register_write = None
        self.client.on_socket_unregister_write = None

    def _finish(self) -> None:
        """The socket is gone (or going): settle everything waiting on this connection."""
        self._detach()
        if self.closed.done():
            return
        if not self._connack.done():
            self._connack.set_exception(_ConnectFailed(self._reason or "connection closed before CONNACK"))
        for status in self._status_acks.values():
            if not status.done():
                status.set_result(None)
        self.closed.set_result(self._reason or "connection closed")
        self._wake()

    def abort(self, reason: str) -> None:
        """Drop the connection now (no DISCONNECT, so the broker publishes the will)."""
        self._set_reason(reason)
        self._detach()
        sock = self.client.socket()
        if sock is not None:
            sock.close()  # paho keeps the closed socket object; this client is never used again
        self._finish()

    async def connack(self, within: float) -> None:
        """Wait for a successful CONNACK; ``_ConnectFailed`` on refusal, loss or timeout."""
        done, _ = await asyncio.wait([self._connack], timeout=within)
        if not done:
            raise _ConnectFailed(f"no CONNACK within {within:g} s")
        self._connack.result()

    def publish_status(self, payload: bytes) -> int:
        info = self.client.publish(self.sink.status_topic, payload, qos=1, retain=True)
        if info.rc == _SUCCESS:
            self._status_acks[info.mid] = self.loop.create_future()
        return info.mid

    async def wait_status_ack(self, mid: int, within: float) -> None:
        fut = self._status_acks.get(mid)
        if fut is not None:
            await asyncio.wait([fut], timeout=within)

    # --- delivery -----------------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (self.closing or len(self.pending) <= self._wake_at):
            waiter.set_result(None)

    async def _wait(self, wake_at: int, within: float) -> None:
        """Until ``len(pending) <= wake_at``, the connection closes, or ``within`` seconds pass."""
        waiter = self._waiter = self.loop.create_future()
        self._wake_at = wake_at
        self._wake()
        timer = self.loop.call_later(max(0.0, within), _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def publish_batch(self, batch: Sequence[BufferedEvent], outcomes: list[Outcome]) -> None:
        """Publish ``batch`` within ``window`` and ``max_rate``; fill ``outcomes`` as acks arrive."""
        config = self.sink.config
        window, qos, ack_timeout = config.window, config.qos, config.ack_timeout
        low_water = window - 1
        rate = self.sink._rate
        fast = self._fast is not None and qos == 1
        pending = self.pending
        pending.clear()
        self._outcomes = outcomes
        acks_seen, last_progress = self._acks, time.monotonic()
        i, n = 0, len(batch)
        try:
            while not self.closing:
                now = time.monotonic()
                if self._acks != acks_seen or not pending:
                    acks_seen, last_progress = self._acks, now
                elif now - last_progress >= ack_timeout:
                    log.warning(
                        "No PUBACK from MQTT broker within ack_timeout; reconnecting",
                        extra={"sink": self.sink.name, "url": self.sink.url, "error": f"{len(pending)} unacknowledged"},
                    )
                    self.abort(f"no PUBACK within {ack_timeout:g} s")
                    break
                ack_deadline = last_progress + ack_timeout - now
                if i >= n:
                    if not pending:
                        break
                    await self._wait(0, ack_deadline)
                    continue
                room = min(window - len(pending), n - i)
                if room <= 0:
                    await self._wait(low_water, ack_deadline)
                    continue
                if rate is not None:
                    allowed = rate.take(room)
                    if allowed == 0:
                        await self._wait(-1, min(rate.delay(room), ack_deadline))
                        continue
                    room = allowed
                if fast:
                    self._publish_fast(batch, i, i + room, outcomes)
                elif not self._publish_paho(batch, i, i + room, outcomes, qos):
                    return
                i += room
        finally:
            # Whatever is still pending stays RETRY; late PUBACKs for it are ignored. Their packet
            # ids stay taken until those PUBACKs come (only a cancelled delivery leaves any).
            if fast and pending and not self.closing and self._fast is not None:
                self._fast.fast_abandoned.update(pending)
            pending.clear()
            self._outcomes = []

    def _publish_fast(self, batch: Sequence[BufferedEvent], start: int, stop: int, outcomes: list[Outcome]) -> None:
        """QoS 1 through ``_FastPahoClient``: encode, queue and write ``batch[start:stop]``."""
        assert self._fast is not None
        heads = self.sink._wire_topics
        items: list[tuple[bytes, bytes, int]] = []
        for j in range(start, stop):
            event = batch[j]
            body = event.body
            head = heads.get((event.lane, event.type))
            try:
                if head is None:
                    head = self.sink._wire_topic(event)
                if len(head) + len(body) > _MAX_REMAINING - 2:
                    raise ValueError("Payload too large.")
            except ValueError as exc:  # a topic or payload MQTT can never carry
                outcomes[j] = Rejected(f"MQTT cannot publish this event: {exc}")
                continue
            items.append((head, body, j))
        self._fast.publish_qos1(items)
        self._on_writable()  # write now; paho registers for writability only if the socket is full

    def _publish_paho(
        self, batch: Sequence[BufferedEvent], start: int, stop: int, outcomes: list[Outcome], qos: int
    ) -> bool:
        """Through paho's ``publish()`` (QoS 0, or paho without the fast path); False if the client is done."""
        topic_for, publish, pending = self.sink.topic_for, self.client.publish, self.pending
        for j in range(start, stop):
            event = batch[j]
            try:
                self.sink._wire_topic(event)  # the same topic checks as the fast path
                info = publish(topic_for(event), event.body, qos)
            except ValueError as exc:  # a topic or payload MQTT can never carry
                outcomes[j] = Rejected(f"MQTT cannot publish this event: {exc}")
                continue
            if info.rc != _SUCCESS:
                # NO_CONN: the socket just went; QUEUE_SIZE: a mid still taken by an
                # abandoned delivery. Either way this client is done; RETRY the rest.
                self.abort(f"publish failed: {paho.error_string(info.rc)}")
                return False
            pending[info.mid] = j
        return True


# --- the fast QoS 1 path over paho -------------------------------------------------------------------------

_PUBLISH_QOS1 = 0x32  # PUBLISH, QoS 1, no DUP, no RETAIN
_PUBACK = 0x40
_MAX_REMAINING = 268_435_455  # the largest remaining length MQTT can express (4 bytes)
_RECV_SIZE = 65536  # one recv() takes up to ~16,000 PUBACKs
_WRITE_CHUNK = 65536  # publishes are queued for paho's writer in chunks of about this many bytes
_INCOMPLETE, _MALFORMED = -1, -2
# Instance attributes of paho's Client that _FastPahoClient reads or writes (methods are exercised instead).
_PAHO_ATTRIBUTES = ("_sock", "_out_packet", "_out_messages", "_last_mid", "_last_bytes_received", "_msgtime_mutex")


class _FastPahoClient(paho.Client):
    """paho's ``Client`` with a fast path for QoS 1 PUBLISH and PUBACK (MQTT 3.1.1 only).

    paho still does everything else: connect (TCP, TLS, CONNECT/CONNACK, last will),
    keepalive (PINGREQ/PINGRESP), DISCONNECT, the writing of every byte (partial writes,
    TLS want-read/want-write) and whatever goes through ``publish()`` (the retained
    status messages, QoS 0 events). The fast path replaces only the two per-event costs
    that dominated the drain profile:

    - ``publish_qos1()`` encodes QoS 1 PUBLISH packets itself (the payload is the stored
      body; the topic header is cached by the caller) and appends them to paho's
      outgoing packet queue as a few ~64 KiB chunks, so a window refill is a few
      ``send()`` calls rather than one per event, with no ``MQTTMessage``,
      ``MQTTMessageInfo`` (a ``threading.Condition`` each) or entry in paho's message dict;
      the caller's token (a batch index) is kept per packet id in ``fast_unacked``.
    - ``read_packets()`` replaces ``loop_read()``: one ``recv()`` of up to 64 KiB, then
      every complete packet in it. A PUBACK for a fast-path id is settled right there
      (2-byte id; no ``Properties``/``ReasonCode``) and its token handed to
      ``on_fast_acks``, once per read. Any other packet (CONNACK, PINGRESP, the PUBACK of
      a ``publish()``) is given whole to paho's own parser. An incomplete packet at the
      end stays in ``_fast_rbuf``; its missing bytes make the socket readable again, so
      nothing sits in the buffer while the socket is quiet (the caller still drains
      ``SSLSocket.pending()``, as it did around ``loop_read``).

    paho internals used (as in paho-mqtt 2.2; 2.0 and 2.1 name the read timestamp
    ``_last_msg_in``, so there the self-check turns the fast path off):

    - ``_sock_recv(n)``: paho's socket read, which turns SSL want-read/want-write into
      ``BlockingIOError`` (and registers for writing on want-write). Used for the real
      read, and overridden so that paho's ``_packet_read()`` parses a complete packet
      from memory (``_fast_feed``) instead of reading the socket in 1-byte steps.
    - ``_packet_read()``: paho's parse-and-dispatch of one packet (fed as above).
    - ``_loop_rc_handle(rc)``: what ``loop_read`` does on an error (close, on_disconnect).
    - ``_out_packet``: the deque of ``{command, mid, qos, pos, to_process, packet, info}``
      that ``loop_write()``/``_packet_write()`` sends; a QoS 1 PUBLISH entry needs no
      ``info`` (only QoS 0 ones are reported on write).
    - ``_out_messages``: paho's own QoS 1 publishes awaiting their PUBACK.
    - ``_mid_generate()`` / ``_last_mid``: overridden so ``publish()`` and the fast path
      draw from one packet-id sequence (1..65535, wrapping) that skips every id still in
      flight on either path.
    - ``_last_bytes_received`` / ``_msgtime_mutex``: the keepalive bookkeeping a read does.

    ``self_check()`` exercises all of this once per process over a socketpair; if
    anything differs (a paho upgrade), plain ``paho.Client`` is used instead: slower,
    never wrong. Everything here runs on the event-loop thread.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before paho's __init__: the overrides below read them.
        self.fast_unacked: dict[int, int] = {}  # packet id -> token of a fast publish awaiting its PUBACK
        self.fast_abandoned: set[int] = set()  # ids still in flight from an abandoned delivery: not reused
        self.on_fast_acks: Callable[[list[int]], None] | None = None  # tokens of the PUBACKs of one read
        self._fast_rbuf = bytearray()  # the start of an incomplete packet
        self._fast_feed: bytes | None = None  # a complete packet being parsed by paho's _packet_read
        super().__init__(*args, **kwargs)

    # --- encoding ------------------------------------------------------------------------------------

    @staticmethod
    def topic_header(topic: str) -> bytes:
        """A PUBLISH topic as it goes on the wire (2-byte length, UTF-8); ValueError where paho would refuse it."""
        encoded = topic.encode("utf-8")  # UnicodeEncodeError is a ValueError
        if not encoded:
            raise ValueError("Invalid topic.")
        if b"+" in encoded or b"#" in encoded:
            raise ValueError("Publish topic cannot contain wildcards.")
        if b"\x00" in encoded:
            raise ValueError("Publish topic cannot contain NUL.")
        if len(encoded) > 65535:
            raise ValueError("Publish topic is too long.")
        return len(encoded).to_bytes(2, "big") + encoded

    @staticmethod
    def encode_publish(head: bytes, mid: int, payload: bytes) -> bytes:
        """One QoS 1 PUBLISH packet (MQTT 3.1.1): fixed header, topic header, packet id, payload."""
        return _publish_fixed_header(len(head) + 2 + len(payload)) + head + mid.to_bytes(2, "big") + payload

    def publish_qos1(self, items: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Queue one QoS 1 PUBLISH per ``(topic header, payload, token)``; nothing is written yet.

        The caller runs ``loop_write()`` next. Each PUBACK hands its token to ``on_fast_acks``.
        The caller has checked that each packet fits MQTT's remaining length.
        """
        unacked = self.fast_unacked
        next_mid = self._mid_generate
        parts: list[bytes] = []
        size = 0
        for head, payload, token in items:
            mid = next_mid()
            unacked[mid] = token
            length = len(head) + 2 + len(payload)
            parts += (_publish_fixed_header(length) + head + mid.to_bytes(2, "big"), payload)
            size += length
            if size >= _WRITE_CHUNK:
                self._fast_queue(b"".join(parts))
                parts.clear()
                size = 0
        if parts:
            self._fast_queue(b"".join(parts))

    def _fast_queue(self, data: bytes) -> None:
        # The same entry paho's _packet_queue makes for a QoS 1 PUBLISH, carrying many packets.
        self._out_packet.append(
            {"command": _PUBLISH_QOS1, "mid": 0, "qos": 1, "pos": 0, "to_process": len(data), "packet": data,
             "info": None}
        )  # fmt: skip

    # --- reading -------------------------------------------------------------------------------------

    def read_packets(self) -> MQTTErrorCode:
        """In place of ``loop_read()``: one ``recv()``, then every complete packet received (see the class)."""
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        try:
            received = self._sock_recv(_RECV_SIZE)
        except BlockingIOError:  # nothing there (or TLS wants to write first: paho registered for writing)
            return _SUCCESS
        except OSError:  # reset, timeout, or the socket went (ConnectionError)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not received:
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()

        rbuf = self._fast_rbuf
        data: bytes | bytearray = received
        if rbuf:
            rbuf += received
            data = rbuf
        end = len(data)
        pos = 0
        rc = _SUCCESS
        tokens: list[int] = []
        pop_unacked = self.fast_unacked.pop
        while end - pos >= 2:
            if data[pos] == _PUBACK and data[pos + 1] == 2 and end - pos >= 4:
                mid = (data[pos + 2] << 8) | data[pos + 3]
                token = pop_unacked(mid, None)
                if token is not None:
                    tokens.append(token)
                    pos += 4
                    continue
                if mid not in self._out_messages:  # from an abandoned delivery, or unknown: ignored
                    self.fast_abandoned.discard(mid)
                    pos += 4
                    continue
            stop = _packet_end(data, pos, end)
            if stop == _INCOMPLETE:
                break
            if stop == _MALFORMED:
                rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                break
            self._fast_feed = bytes(data[pos:stop])
            pos = stop
            try:
                rc = self._packet_read()
                if rc == _SUCCESS and self._fast_feed:  # paho read less than the whole packet
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
            finally:
                self._fast_feed = None
            if rc != _SUCCESS or self._sock is None:
                break
        if data is rbuf:
            del rbuf[:pos]
        elif pos < end:
            rbuf += data[pos:]
        if tokens and self.on_fast_acks is not None:
            self.on_fast_acks(tokens)  # acknowledged by the broker, even if the connection fails next
        if rc != _SUCCESS:
            # _packet_read never says "again" for a whole packet; if it did, its state is broken.
            return self._loop_rc_handle(rc if rc > 0 else MQTTErrorCode.MQTT_ERR_PROTOCOL)
        return _SUCCESS if self._sock is not None else MQTTErrorCode.MQTT_ERR_NO_CONN

    # --- paho overrides ------------------------------------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        feed = self._fast_feed
        if feed is None:
            return super()._sock_recv(bufsize)
        if not feed:
            raise BlockingIOError  # never: paho's _packet_read reads exactly the one packet fed
        self._fast_feed = feed[bufsize:]
        return feed[:bufsize]

    def _mid_generate(self) -> int:
        """Packet ids 1..65535 in turn, skipping any still in flight on the fast path or paho's own."""
        mid = self._last_mid
        for _ in range(65535):
            mid = mid % 65535 + 1
            if mid not in self.fast_unacked and mid not in self.fast_abandoned and mid not in self._out_messages:
                self._last_mid = mid
                return mid
        raise RuntimeError("all 65535 MQTT packet ids are in flight")  # unreachable: window <= 10,000

    # --- start-up check ------------------------------------------------------------------------------

    @classmethod
    def self_check(cls) -> str | None:
        """Why the fast path cannot work with the installed paho-mqtt, or None when it can.

        Runs the internals it uses over a socketpair: paho's and our encoding of the same
        PUBLISH, paho's writer sending a queued chunk, packet ids shared with ``publish()``
        and wrapping, and PUBACKs of both kinds plus a PINGRESP through ``read_packets()``.
        """
        try:
            return cls._check_internals()
        except Exception as exc:  # an internal renamed or changed shape
            return f"{type(exc).__name__}: {exc}"

    @classmethod
    def _check_internals(cls) -> str | None:
        client = cls(
            CallbackAPIVersion.VERSION2, client_id="plantgate-self-check", protocol=MQTTProtocolVersion.MQTTv311
        )
        missing = [name for name in _PAHO_ATTRIBUTES if not hasattr(client, name)]
        if missing:
            return f"paho's Client has no {', '.join(missing)}"
        ours, peer = socket.socketpair()
        try:
            ours.setblocking(False)
            peer.settimeout(1.0)
            client._sock = ours
            published: list[int] = []
            acked: list[int] = []

            def on_publish(client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
                published.append(mid)

            client.on_publish = on_publish
            client.on_fast_acks = acked.extend
            topic = "plantgate/self-check"
            head = cls.topic_header(topic)
            client.fast_unacked[1] = 0  # taken on the fast path: publish() must skip it
            info = client.publish(topic, b"by paho", qos=1)
            del client.fast_unacked[1]
            if info.mid != 2:
                return "publish() does not take its packet ids from _mid_generate"
            client.loop_write()
            if peer.recv(4096) != cls.encode_publish(head, info.mid, b"by paho"):
                return "paho encodes a QoS 1 PUBLISH differently"
            client.publish_qos1([(head, b"fast", 7)])
            fast_mid = 3
            if client.fast_unacked != {fast_mid: 7}:
                return "the fast path does not take its packet ids from _mid_generate"
            client.loop_write()
            if peer.recv(4096) != cls.encode_publish(head, fast_mid, b"fast"):
                return "paho's writer does not send a queued chunk as is"
            peer.sendall(
                bytes((_PUBACK, 2))
                + fast_mid.to_bytes(2, "big")
                + b"\xd0\x00"
                + bytes((_PUBACK, 2))
                + info.mid.to_bytes(2, "big")
            )
            rc = client.read_packets()
            if rc != _SUCCESS or acked != [7] or published != [info.mid] or client._out_messages or client._fast_rbuf:
                return "paho's parser does not handle packets fed from memory"
            client._last_mid = 65534
            client.fast_unacked[65535] = 0
            if client._mid_generate() != 1:
                return "packet ids do not wrap around"
            client.fast_unacked.clear()
        finally:
            client._sock = None
            ours.close()
            peer.close()
        return None


def _publish_fixed_header(length: int) -> bytes:
    """QoS 1 PUBLISH fixed header: the command byte and the remaining length (1-4 bytes)."""
    if 128 <= length < 16384:  # events of ~100 B to 16 KiB
        return bytes((_PUBLISH_QOS1, (length & 0x7F) | 0x80, length >> 7))
    out = bytearray((_PUBLISH_QOS1,))
    while True:
        byte, length = length & 0x7F, length >> 7
        if not length:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _packet_end(data: bytes | bytearray, pos: int, end: int) -> int:
    """Where the packet starting at ``pos`` ends: an index, ``_INCOMPLETE`` or ``_MALFORMED``."""
    length = shift = 0
    i = pos + 1
    while True:
        if i >= end:
            return _INCOMPLETE
        byte = data[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift == 28:  # more than 4 length bytes
            return _MALFORMED
    return i + length if i + length <= end else _INCOMPLETE


@functools.cache
def _fast_path_problem() -> str | None:
    """None when the fast path works with the installed paho; else why not (logged once per process)."""
    problem = _FastPahoClient.self_check()
    if problem is not None:
        log.warning(
            "MQTT fast publish path disabled: paho-mqtt internals differ; using paho's own publish (slower)",
            extra={"paho_version": _PAHO_VERSION, "error": problem},
        )
    return problem


# --- helpers ---------------------------------------------------------------------------------------


class _TokenBucket:
    """Events-per-second ceiling with a small burst (a tenth of a second's worth)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * 0.1)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, want: int) -> int:
        """Take up to ``want`` whole tokens; how many were taken."""
        self._refill()
        taken = min(want, int(self.tokens))
        self.tokens -= taken
        return taken

    def delay(self, want: int) -> float:
        """Seconds until a useful chunk of tokens is there (at most ~100 wakeups a second)."""
        chunk = min(float(want), max(1.0, self.rate * 0.01), self.capacity)
        return max(0.0, (chunk - self.tokens) / self.rate)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _close_socket(client: paho.Client) -> Callable[[], None]:
    def close() -> None:
        sock = client.socket()
        if sock is not None:
            sock.close()

    return close


async def _in_thread(work: Callable[[], object], *, abandon: Callable[[], None]) -> None:
    """Run blocking ``work`` in a daemon thread; if the caller is cancelled, ``abandon`` its result.

    A daemon thread rather than the default executor: a connect stuck in DNS must not
    hold up the agent's shutdown.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.cancelled():
            abandon()
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    def target() -> None:
        error: BaseException | None = None
        try:
            work()
        except Exception as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop is closed: nobody will use the socket
            abandon()

    threading.Thread(target=target, name="mqtt-connect", daemon=True).start()
    await done


def _rc_reason(rc: MQTTErrorCode | int) -> str:
    if rc == MQTTErrorCode.MQTT_ERR_CONN_LOST:
        return "connection lost"
    return paho.error_string(rc)


def _describe(exc: BaseException) -> str:
    """A one-line, secret-free description of a connection error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
