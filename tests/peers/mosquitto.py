"""A real mosquitto broker on a free loopback port, and a subscriber that records what arrives.

``MosquittoBroker`` writes its own config into a temporary directory and runs the
system's ``mosquitto`` on 127.0.0.1. It can be stopped, killed, frozen and started
again on the same port, so a test can stage an outage and the recovery. Options:
a TLS listener with trustme certificates (optionally requiring client
certificates), a password file, persistence (sessions and queued messages survive
a ``stop()``/``start()``), and debug logging of every packet (so a test can count
what the broker really received from one client).

``MqttCollector`` is a paho subscriber on its own thread (``loop_start``), which is
fine in a test: it records ``(topic, payload, retain)`` for every message.

Fixtures (this module is a pytest plugin, see ``tests/conftest.py``):

- ``mosquitto``: a started plain broker, stopped at teardown;
- ``mosquitto_factory``: ``make(**options)`` for TLS / password brokers, all stopped at teardown;
- ``mqtt_collector``: a collector subscribed to ``#`` on ``mosquitto``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.peers.waiting import wait_for

HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_PUBLISH_LINE = re.compile(
    r"Received PUBLISH from (?P<client>\S+) \(d(?P<dup>\d), q(?P<qos>\d), r(?P<retain>\d), m(?P<mid>\d+), "
    r"'(?P<topic>[^']*)'"
)


def mosquitto_binary() -> str:
    """The broker binary, or ``pytest.skip`` with a clear message when there is none."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    pytest.skip("mosquitto is not installed (apt-get install mosquitto): MQTT tests need a real broker")


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class BrokerPublish(NamedTuple):
    """One PUBLISH as the broker logged receiving it (needs ``log_debug=True``)."""

    client_id: str
    topic: str
    qos: int
    retain: bool
    dup: bool
    mid: int


class MosquittoBroker:
    """A mosquitto process on 127.0.0.1 with its config, certificates and log in ``workdir``.

    ``port`` is the plain listener (always present, anonymous unless ``users`` is
    given); ``tls_port`` is the TLS listener when ``tls=True``. Both ports are
    chosen once, so ``start()`` after ``stop()``/``kill()`` listens on the same ports.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = False,
        require_certificate: bool = False,
        users: dict[str, str] | None = None,
        log_debug: bool = False,
        persistence: bool = False,
        extra_config: Sequence[str] = (),
    ) -> None:
        self.binary = mosquitto_binary()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.tls_port: int | None = None
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self.ca: Any = None  # trustme.CA when tls
        self.ca_file: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._log_offset = 0

        lines = [
            # As root, mosquitto would drop to the "mosquitto" user, which cannot read our tmp dir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            # Saved on SIGTERM (stop), loaded on start: a persistent subscriber's session and its
            # queued QoS 1 messages survive a restart. kill() loses what was not saved, like a crash.
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {workdir}/",
            f"log_dest file {self.log_path}",
            "log_type all" if log_debug else "log_type error\nlog_type warning\nlog_type notice\nlog_type information",
            "connection_messages true",
            f"listener {self.port} {self.host}",
        ]
        if users:
            lines += ["allow_anonymous false", f"password_file {self._write_passwords(users)}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            lines += self._tls_listener(require_certificate)
        lines += extra_config  # mosquitto.conf lines of the caller's own (limits, options)
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # --- config pieces --------------------------------------------------------------------------

    def _write_passwords(self, users: dict[str, str]) -> Path:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            pytest.skip("mosquitto_passwd is not installed: password tests need it to hash the password file")
        path = self.workdir / "passwords"
        path.touch(mode=0o600)
        for user, password in users.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
        return path

    def _tls_listener(self, require_certificate: bool) -> list[str]:
        trustme = pytest.importorskip("trustme")
        self.ca = trustme.CA()
        self.ca_file = self.workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        cert_file, key_file = self.workdir / "server.pem", self.workdir / "server.key"
        server.cert_chain_pems[0].write_to_path(str(cert_file))
        for extra in server.cert_chain_pems[1:]:
            extra.write_to_path(str(cert_file), append=True)
        server.private_key_pem.write_to_path(str(key_file))
        self.tls_port = free_port()
        return [
            f"listener {self.tls_port} {self.host}",
            f"cafile {self.ca_file}",
            f"certfile {cert_file}",
            f"keyfile {key_file}",
            f"require_certificate {'true' if require_certificate else 'false'}",
        ]

    def issue_client_cert(self, common_name: str = "plantgate-test") -> tuple[Path, Path]:
        """A client certificate and key signed by this broker's CA (for mTLS)."""
        if self.ca is None:
            raise RuntimeError("issue_client_cert needs a broker started with tls=True")
        cert = self.ca.issue_cert(common_name)
        cert_file = self.workdir / f"{common_name}.pem"
        key_file = self.workdir / f"{common_name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        return cert_file, key_file

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this broker has no TLS listener")
        return f"mqtts://{self.host}:{self.tls_port}"

    def start(self) -> MosquittoBroker:
        """Start mosquitto (again, on the same ports) and wait until every listener accepts."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._paused = False
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        deadline = time.monotonic() + _START_TIMEOUT
        while not all(_accepts(self.host, port) for port in ports):
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not listen on {ports} within {_START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.01)  # pacing the poll of a condition that has a deadline
        return self

    def stop(self) -> None:
        """SIGTERM (mosquitto closes its connections cleanly), then wait for the exit."""
        if self._process is None or self._process.poll() is not None:
            return
        if self._paused:
            self.resume()
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything itself (the kernel resets the sockets)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.kill()
        self._process.wait(timeout=10)
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets open but answers nothing (a hung peer)."""
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the broker if it runs (teardown)."""
        self.stop()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what the broker saw ------------------------------------------------------------------------

    def log(self, *, since_start: bool = False) -> str:
        """The broker's log (of every run, or only of the current run)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            if since_start:
                f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def publishes_received(self, client_id: str | None = None, *, since_start: bool = True) -> list[BrokerPublish]:
        """Every PUBLISH the broker logged receiving (from ``client_id``); needs ``log_debug=True``."""
        found = []
        for match in _PUBLISH_LINE.finditer(self.log(since_start=since_start)):
            if client_id is not None and match["client"] != client_id:
                continue
            found.append(
                BrokerPublish(
                    client_id=match["client"],
                    topic=match["topic"],
                    qos=int(match["qos"]),
                    retain=match["retain"] == "1",
                    dup=match["dup"] == "1",
                    mid=int(match["mid"]),
                )
            )
        return found


class Received(NamedTuple):
    """One message as the subscriber got it."""

    topic: str
    payload: bytes
    retain: bool


class MqttCollector:
    """A paho subscriber (own network thread) recording every message on ``topic``.

    ``start()`` returns once the broker confirmed the subscription, so whatever is
    published afterwards is recorded. Use as a context manager or call ``stop()``.
    With ``clean_session=False`` (and a ``client_id``) on a broker with persistence,
    messages published while the subscriber or the broker was away arrive later.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str = "#",
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str = "",
        clean_session: bool = True,
        qos: int = 1,
    ) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.qos = qos
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)  # back soon after a broker restart
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            # Subscribing here means a reconnect (clean session) subscribes again.
            client.subscribe(self.topic, qos=self.qos)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def start(self, timeout: float = 10.0) -> MqttCollector:
        """Connect, start the network thread and wait for the SUBACK."""
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise RuntimeError(f"no SUBACK for {self.topic!r} from {self.host}:{self.port} within {timeout} s")
        return self

    def stop(self) -> None:
        """Disconnect and join the network thread."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- queries --------------------------------------------------------------------------------------

    def snapshot(self) -> list[Received]:
        """A copy of everything received so far."""
        with self._lock:
            return list(self.messages)

    def on_topic(self, topic: str) -> list[Received]:
        return [m for m in self.snapshot() if m.topic == topic]

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    async def wait_for_count(self, n: int, timeout: float = 10.0) -> list[Received]:  # noqa: ASYNC109
        """Wait until at least ``n`` messages arrived; returns them all."""
        await wait_for(lambda: self.count >= n, timeout=timeout)
        return self.snapshot()

    async def wait_for_message(
        self,
        match: Callable[[Received], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 (same shape as wait_for)
    ) -> Received:
        """Wait for the first message that ``match`` accepts."""
        found: list[Received] = []

        def seen() -> bool:
            found[:] = [m for m in self.snapshot() if match(m)]
            return bool(found)

        await wait_for(seen, timeout=timeout)
        return found[0]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A started plain mosquitto on a free loopback port; stopped at teardown."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """``make(tls=, require_certificate=, users=, log_debug=, persistence=)``: started brokers, stopped at teardown."""
    brokers: list[MosquittoBroker] = []

    def make(**options: Any) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(brokers)}", **options)
        brokers.append(broker)
        return broker.start()

    try:
        yield make
    finally:
        for broker in brokers:
            broker.close()


@pytest.fixture
def mqtt_collector(mosquitto: MosquittoBroker) -> Iterator[MqttCollector]:
    """A subscriber to ``#`` on the ``mosquitto`` broker, subscribed before the test runs."""
    with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        yield collector
