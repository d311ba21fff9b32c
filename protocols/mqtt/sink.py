"""The MQTT sink (``MqttSink``), built by ``protocols.mqtt.MqttSinkConfig``; the wire mapping is there.

How paho is driven: paho-mqtt's public API only, no network thread. paho's
documented external-loop integration (``on_socket_close``,
``on_socket_register_write`` and ``on_socket_unregister_write`` with ``loop_read()``,
``loop_write()`` and a periodic ``loop_misc()``) is wired to the asyncio loop: the
socket is watched with ``add_reader``, and with ``add_writer`` only while paho has
bytes queued. So PUBACKs are handled on the loop thread: one readable event runs
``loop_read()``, which reads every packet the socket holds and calls ``on_publish``
for each PUBACK; the waiting ``deliver`` is woken once per read, not once per ack.
``loop_misc()`` (keepalive) runs about once a second. Only the blocking
``connect()`` (TCP, TLS handshake, DNS) runs in a short-lived daemon thread per
attempt, before the socket is handed to the loop.

Flow control is ours, not paho's: paho's own in-flight limit re-scans its whole
message dict on every ack, so it is switched off (``max_inflight_messages_set(0)``)
and ``window`` bounds the unacknowledged publishes instead (``max_queued_messages_set``
is a backstop just above it). Each window refill is a run of ``publish()`` calls
followed by one ``loop_write()``; the window is refilled as soon as any ack arrives,
which keeps data flowing so our TCP ACKs ride on it. Brokers send PUBACKs with Nagle
on (mosquitto's default), so each PUBACK after the first waits for our TCP ACK: the
socket has TCP_NODELAY, and TCP_QUICKACK is re-armed after each read while acks are
owed, or every batch end would stall ~40 ms on the kernel's delayed ACK. A refill is
written with TCP_CORK set (Linux), so its publishes leave in full segments instead of
one segment per ``send()``; uncorking pushes them at once.

Cost: paho's ``publish()`` and its PUBACK handling (three ``recv()`` calls, a
``Properties`` and a ``ReasonCode`` per 4-byte packet) take 30-40 us of CPU per event,
so the sink alone on a free core acknowledges 21-28k events/s (the backlog drain
bench shares two cores with mosquitto, the subscriber and SQLite; see bench/README.md).

Duplicates: every connection uses a fresh paho ``Client`` with a clean session.
What was in flight when a connection dropped is reported for retry and published
again by the next ``deliver`` (same CloudEvent id), never re-sent by paho on its
own; nothing is handed to paho while disconnected.

Reconnecting: the first attempt is immediate; after a failure or a loss the wait is
jittered exponential backoff capped at ``reconnect_max_backoff`` (default 4 s), so a
broker that comes back is found within a few seconds while a fleet of agents does
not reconnect in step. While disconnected, ``deliver`` answers at once with
``RetryLater(after=...)``: the time until the next connection attempt (plus a short
grace for the connect itself), so the agent retries right after the sink is back
instead of on its own growing backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.backoff import Backoff
from agent.config_types import read_secret
from agent.events import TYPE_PREFIX, Lane, utc_now
from agent.health import ComponentStatus
from agent.sink import ACKED, RETRY, BufferedEvent, Outcome, Rejected, RetryLater
from protocols.mqtt import MqttSinkConfig

log = logging.getLogger(__name__)

_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS
# CONNACK reasons that mean "fix the credentials", reported as state "unauthorized".
_AUTH_REFUSALS = {"Bad user name or password", "Not authorized"}
# A connection must last this long before the reconnect backoff starts from scratch again,
# so two agents fighting over one client id do not reconnect in a tight loop.
_STABLE_AFTER = 10.0
# On shutdown: how long to wait for the PUBACK of the retained "offline", then for the close.
_OFFLINE_ACK_WAIT = 2.0
_CLOSE_WAIT = 1.0
# The retry hint while disconnected: time until the next attempt plus this (the connect itself).
_CONNECT_GRACE = 0.25
# After the broker refused our credentials: the next attempt within 15-30 s, not the usual cap.
_REFUSED_WAIT = 30.0
# While an attempt is under way (TCP, TLS, CONNACK), the agent asks again after this long.
_CONNECTING_RETRY = 0.5
_NOT_ACKNOWLEDGED = RetryLater(reason="not acknowledged")
# paho's queue of unacknowledged QoS 1 messages may hold this many beyond the window
# (the retained status messages): a backstop, the window is the limit.
_QUEUE_SLACK = 16
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux only


class MqttSink:
    """Publishes buffered events to one MQTT broker; see the module docstrings for the contract.

    ``run()`` keeps the connection (and reconnects); ``deliver()`` publishes one batch
    over the current connection and reports per event. Neither raises for broker
    trouble: while the broker is away, ``deliver`` answers ``RetryLater`` at once and
    ``status.state`` is ``reconnecting`` (or ``unauthorized``).
    """

    def __init__(self, config: MqttSinkConfig, *, agent_id: str, site: str, version: str, data_dir: Path) -> None:
        self.config = config
        self.name = config.name
        self.lanes: frozenset[Lane] = frozenset(config.lanes)
        self.status = ComponentStatus(name=config.name, kind="mqtt")
        # Two windows per deliver: the second half is published while the first is acknowledged.
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
        self._topics: dict[tuple[str, str], str] = {}  # (lane, type) -> checked topic
        self._conn: _Connection | None = None
        self._figures: dict[str, Any] | None = None
        self._status_published = time.monotonic()  # the heartbeat's last refresh (the connect publishes too)
        self._deliver_lock = asyncio.Lock()
        self._failures = 0  # consecutive connection failures, for log levels
        self._next_attempt = 0.0  # monotonic time of the next connection attempt (past: under way)
        self.failed_attempts = 0
        """Connection attempts that failed since the last successful connect (the backoff's progress)."""

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
        name = event.type[len(TYPE_PREFIX) :] if event.type.startswith(TYPE_PREFIX) else event.type
        return f"{self.topic_prefix}/{event.lane}/{name}"

    def _checked_topic(self, event: BufferedEvent) -> str:
        """``topic_for(event)``, cached once checked; ValueError for a topic MQTT refuses."""
        key = (event.lane, event.type)
        topic = self._topics.get(key)
        if topic is None:
            topic = self.topic_for(event)
            if "+" in topic or "#" in topic:
                raise ValueError("Publish topic cannot contain wildcards.")
            if "\x00" in topic:
                raise ValueError("Publish topic cannot contain NUL.")
            if len(topic.encode("utf-8")) > 65535:  # UnicodeEncodeError is a ValueError
                raise ValueError("Publish topic is too long.")
            self._topics[key] = topic
        return topic

    def status_payload(self, state: Literal["online", "offline"]) -> bytes:
        """The retained status message (contract): ``{"state", "agent", "site", "version", "time"}``.

        While online it also carries ``figures``, the agent's key figures (an extension):
        monitoring that only reads the broker sees backlog, ages and dead letters too.
        """
        payload: dict[str, Any] = {
            "state": state, "agent": self._agent_id, "site": self._site, "version": self._version, "time": utc_now()
        }
        if state == "online" and self._figures is not None:
            payload["figures"] = self._figures
        return msgspec.json.encode(payload)

    def publish_status(self, figures: Mapping[str, Any]) -> None:
        """Keep the agent's latest key figures; refresh the retained status with them every ``status_interval``."""
        self._figures = dict(figures)
        interval = self.config.status_interval
        conn = self._conn
        now = time.monotonic()
        if interval <= 0 or conn is None or now - self._status_published < interval:
            return
        self._status_published = now
        conn.publish_status(self.status_payload("online"))

    async def run(self) -> None:
        """Connect (at once), stay connected and reconnect with capped jittered backoff until cancelled.

        On cancellation: say offline and close.
        """
        cap = self.config.reconnect_max_backoff
        backoff = Backoff(base=min(0.2, cap), cap=cap)
        try:
            while True:
                self._next_attempt = 0.0
                try:
                    conn = await self._connect()
                except _ConnectFailed as exc:
                    self.failed_attempts += 1
                    self._connect_failed(exc)
                    await self._pause(backoff, refused=exc.unauthorized)
                    continue
                self.failed_attempts = 0
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
                log.warning(  # one per outage: never held back by the repeat limiter
                    "Lost connection to MQTT broker",
                    extra={"sink": self.name, "url": self.url, "error": reason, "ratelimit": False},
                )
                if time.monotonic() - connected_at >= _STABLE_AFTER:
                    backoff.reset()
                await self._pause(backoff)
        except asyncio.CancelledError:
            await self._close()
            raise
        finally:
            self.status.set_state("stopped")

    async def _pause(self, backoff: Backoff, *, refused: bool = False) -> None:
        """The jittered wait before the next attempt; its end is the retry hint ``deliver`` gives.

        After a refusal of the credentials the wait is far longer (15-30 s): they will not fix
        themselves within seconds, and a broker may lock out a client that keeps failing.
        """
        delay = random.uniform(0.5, 1.0) * _REFUSED_WAIT if refused else backoff.next_delay()
        self._next_attempt = time.monotonic() + delay
        await asyncio.sleep(delay)

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        """Publish ``batch``; one outcome per event, in order (see ``agent.sink.Sink.deliver``).

        ``ACKED`` after the PUBACK (QoS 1) or the socket write (QoS 0); ``RetryLater`` for
        whatever is not acknowledged when the connection is down or drops, or when no
        PUBACK arrives for ``ack_timeout`` (with the time of the next connection attempt
        as its hint); ``Rejected`` only for an event that can never be published (a topic
        or size MQTT refuses).
        """
        outcomes: list[Outcome] = [RETRY] * len(batch)
        if not batch:
            return outcomes
        async with self._deliver_lock:
            conn = self._conn
            if conn is not None and not conn.closing:
                await conn.publish_batch(batch, outcomes)
        # The reason is the journal's attempt status: the broker was away, or it did not PUBACK in time.
        later = (
            RetryLater(after=self.retry_after(), reason="disconnected")
            if not self.connected
            else _NOT_ACKNOWLEDGED
        )
        return [later if outcome is RETRY else outcome for outcome in outcomes]

    def retry_after(self) -> float:
        """Seconds until a retry can succeed: the next connection attempt, plus a grace for the connect."""
        wait = self._next_attempt - time.monotonic()
        if wait <= 0:  # an attempt is under way (or about to start)
            return _CONNECTING_RETRY
        return round(wait + _CONNECT_GRACE, 3)

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
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(0)  # flow control is `window`, see the module docstring
        client.max_queued_messages_set(self.config.window + _QUEUE_SLACK)
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
        self._status_published = time.monotonic()
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
        self.pending: dict[int, int] = {}  # the delivery under way: packet id -> index into its outcomes
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

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        # Hot path: one call per PUBACK (QoS 1) or per written publish (QoS 0).
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
            rc = self.client.loop_read()
            # An SSL socket may hold decrypted bytes that no longer make the fd readable.
            while rc == _SUCCESS and isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                rc = self.client.loop_read()
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
        """Publish ``batch`` within ``window``; fill ``outcomes`` as acks arrive."""
        config = self.sink.config
        window, qos, ack_timeout = config.window, config.qos, config.ack_timeout
        low_water = window - 1
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
                if not self._publish(batch, i, i + room, outcomes, qos):
                    return
                i += room
        finally:
            # Whatever is still pending stays RETRY; late PUBACKs for it are ignored.
            pending.clear()
            self._outcomes = []

    def _publish(
        self, batch: Sequence[BufferedEvent], start: int, stop: int, outcomes: list[Outcome], qos: int
    ) -> bool:
        """``publish()`` each of ``batch[start:stop]``, then write them at once; False if the client is done."""
        topics, checked_topic, publish, pending = (
            self.sink._topics,
            self.sink._checked_topic,
            self.client.publish,
            self.pending,
        )
        for j in range(start, stop):
            event = batch[j]
            body = event.body
            try:
                topic = topics.get((event.lane, event.type)) or checked_topic(event)
                info = publish(topic, body, qos)  # ValueError for a payload beyond MQTT's size limit
            except ValueError as exc:  # a topic or payload MQTT can never carry
                outcomes[j] = Rejected(f"MQTT cannot publish this event: {exc}")
                continue
            if info.rc != _SUCCESS:
                # NO_CONN: the socket just went; QUEUE_SIZE: ids still taken by an abandoned
                # delivery. Either way this client is done; RETRY the rest.
                self.abort(f"publish failed: {paho.error_string(info.rc)}")
                return False
            pending[info.mid] = j
        # paho registered for writability on the first publish; write the whole refill now, corked
        # so its packets leave in full segments rather than one segment per publish.
        if _CORK is None or stop - start < 2:
            self._on_writable()
            return True
        sock = self._sock
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
        try:
            self._on_writable()
        finally:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)
        return True


# --- helpers ---------------------------------------------------------------------------------------


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
