"""The MQTT sink against a real mosquitto on loopback: wire mapping, status, outages, TLS, limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.events import encode_event, make_event, stable_id
from agent.sink import ACKED, BufferedEvent, Outcome, Rejected, RetryLater
from protocols.mqtt import MqttSinkConfig
from protocols.mqtt.sink import MqttSink
from tests.peers.mosquitto import MosquittoBroker, MqttCollector, Received
from tests.peers.waiting import wait_for

SITE = "plant-01"
AGENT = "line3-gw"
PREFIX = f"plantgate/{SITE}"
STATUS_TOPIC = f"{PREFIX}/status/{AGENT}"
REPO = Path(__file__).resolve().parents[1]
_T0 = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)


def make_batch(n: int, name: str = "production.completed", *, start: int = 0, pad: int = 300) -> list[BufferedEvent]:
    """``n`` canonical events of type ``io.plantgate.{name}``, encoded the way the buffer stores them."""
    batch = []
    for i in range(start, start + n):
        event = make_event(
            name,
            id=stable_id("test", name, i),
            source=f"plantgate/{SITE}/{AGENT}/test",
            time=_T0 + timedelta(seconds=i),
            site=SITE,
            subject=f"WO-{i}",
            data={"work_order": f"WO-{i}", "note": "x" * pad},
        )
        batch.append(BufferedEvent(seq=i, lane=event.lane, type=event.type, id=event.id, body=encode_event(event)))
    return batch


def ids_of(messages: Sequence[Received]) -> Counter[str]:
    """How many times each event id arrived (status messages are not events)."""
    return Counter(json.loads(m.payload)["id"] for m in messages if "/status/" not in m.topic)


class SinkRunner:
    """Starts sinks with ``run()`` as a task and stops them (cancel and await) at teardown."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.tasks: dict[int, asyncio.Task[None]] = {}

    async def start(self, url: str, *, connected: bool = True, **options: Any) -> MqttSink:
        options.setdefault("client_id", f"plantgate-test-{len(self.tasks)}")
        config = MqttSinkConfig(name="cloud", url=url, **options)
        sink = MqttSink(config, agent_id=AGENT, site=SITE, version="9.9.9", data_dir=self.data_dir)
        self.tasks[id(sink)] = asyncio.create_task(sink.run(), name=f"sink-{len(self.tasks)}")
        if connected:
            await wait_for(lambda: sink.connected, timeout=10)
        return sink

    async def stop(self, sink: MqttSink) -> None:
        task = self.tasks.pop(id(sink))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[SinkRunner]:
    sinks = SinkRunner(tmp_path)
    try:
        yield sinks
    finally:
        await sinks.close()


def all_acked(outcomes: Sequence[Outcome]) -> bool:
    return all(o is ACKED for o in outcomes)


def all_retry(outcomes: Sequence[Outcome], n: int) -> bool:
    """``n`` outcomes, each a retry whose hint (the sink's next connection attempt) is a few seconds at most."""
    return len(outcomes) == n and all(isinstance(o, RetryLater) and (o.after or 0) <= 5 for o in outcomes)


# --- wire mapping -------------------------------------------------------------------------------------


async def test_deliver_publishes_each_body_unchanged_on_its_topic(
    mosquitto: MosquittoBroker, mqtt_collector: MqttCollector, runner: SinkRunner
) -> None:
    sink = await runner.start(mosquitto.url)
    batch = (
        make_batch(40, "production.completed")
        + make_batch(30, "machine.state.changed", start=40)
        + make_batch(30, "telemetry.samples", start=70)
    )

    outcomes = await sink.deliver(batch)

    assert len(outcomes) == len(batch)
    assert all_acked(outcomes)
    await wait_for(lambda: sum(ids_of(mqtt_collector.snapshot()).values()) >= len(batch))
    got = [m for m in mqtt_collector.snapshot() if "/status/" not in m.topic]
    assert len(got) == len(batch)
    for topic, name in [
        (f"{PREFIX}/transaction/production.completed", "production.completed"),
        (f"{PREFIX}/operational/machine.state.changed", "machine.state.changed"),
        (f"{PREFIX}/telemetry/telemetry.samples", "telemetry.samples"),
    ]:
        expected = [e.body for e in batch if e.type == f"io.plantgate.{name}"]
        assert [m.payload for m in got if m.topic == topic] == expected, topic  # unchanged and in order
    assert not any(m.retain for m in got)
    assert sink.in_flight == 0


async def test_empty_batch_and_qos0(
    mosquitto: MosquittoBroker, mqtt_collector: MqttCollector, runner: SinkRunner
) -> None:
    sink = await runner.start(mosquitto.url, qos=0, lanes=["telemetry"])
    assert sink.lanes == frozenset({"telemetry"})
    assert await sink.deliver([]) == []

    batch = make_batch(50, "telemetry.samples")
    assert all_acked(await sink.deliver(batch))
    await wait_for(lambda: sum(ids_of(mqtt_collector.snapshot()).values()) >= 50)
    assert ids_of(mqtt_collector.snapshot()) == Counter({e.id: 1 for e in batch})


async def test_event_mqtt_cannot_carry_is_rejected_not_retried(mosquitto: MosquittoBroker, runner: SinkRunner) -> None:
    sink = await runner.start(mosquitto.url)
    good = make_batch(2)
    bad = BufferedEvent(seq=99, lane="transaction", type="io.plantgate.bad+type", id="bad", body=b"{}")

    outcomes = await sink.deliver([good[0], bad, good[1]])

    assert outcomes[0] is ACKED and outcomes[2] is ACKED
    assert isinstance(outcomes[1], Rejected) and "wildcard" in outcomes[1].reason


# --- status topic -------------------------------------------------------------------------------------


async def test_status_online_retained_on_connect_offline_on_clean_stop(
    mosquitto_factory: Callable[..., MosquittoBroker], runner: SinkRunner
) -> None:
    broker = mosquitto_factory(log_debug=True)
    sink = await runner.start(broker.url, client_id="plantgate-status")
    assert sink.status.state == "connected" and sink.status.kind == "mqtt" and sink.status.name == "cloud"

    with MqttCollector(broker.host, broker.port, STATUS_TOPIC) as late:  # subscribes after the publish
        online = await late.wait_for_message(lambda m: True)
    assert online.retain
    status = json.loads(online.payload)
    assert status["state"] == "online"
    assert (status["agent"], status["site"], status["version"]) == (AGENT, SITE, "9.9.9")
    assert datetime.fromisoformat(status["time"]).tzinfo is not None

    await runner.stop(sink)

    assert sink.status.state == "stopped"
    with MqttCollector(broker.host, broker.port, STATUS_TOPIC) as late:
        offline = await late.wait_for_message(lambda m: True)
    assert offline.retain
    assert json.loads(offline.payload)["state"] == "offline"
    # Said by the sink itself, then a clean DISCONNECT (the will is for unclean ends).
    status_publishes = [p for p in broker.publishes_received("plantgate-status") if p.topic == STATUS_TOPIC]
    assert [p.retain for p in status_publishes] == [True, True]
    assert "Received DISCONNECT from plantgate-status" in broker.log()


_CHILD = """
import asyncio, sys
from pathlib import Path
from protocols.mqtt import MqttSinkConfig
from protocols.mqtt.sink import MqttSink
config = MqttSinkConfig(name="child", url=sys.argv[1], client_id="plantgate-child")
asyncio.run(MqttSink(config, agent_id=sys.argv[2], site="plant-01", version="1.0", data_dir=Path(".")).run())
"""


async def test_last_will_offline_when_the_agent_dies_uncleanly(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    agent = "dying-gw"
    topic = f"{PREFIX}/status/{agent}"
    with MqttCollector(mosquitto.host, mosquitto.port, topic) as watcher, (tmp_path / "child.log").open("wb") as out:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, mosquitto.url, agent, cwd=REPO, stdout=out, stderr=out
        )
        try:
            await watcher.wait_for_message(lambda m: json.loads(m.payload)["state"] == "online", timeout=20)
            child.kill()  # SIGKILL to its PID: no offline publish, no DISCONNECT; the kernel closes the socket
            await child.wait()
            will = await watcher.wait_for_message(lambda m: json.loads(m.payload)["state"] == "offline")
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
    assert json.loads(will.payload)["agent"] == agent
    with MqttCollector(mosquitto.host, mosquitto.port, topic) as late:
        retained = await late.wait_for_message(lambda m: True)
    assert retained.retain and json.loads(retained.payload)["state"] == "offline"


# --- outages ------------------------------------------------------------------------------------------


async def test_broker_down_retry_promptly_then_reconnect_and_ack(
    mosquitto: MosquittoBroker, runner: SinkRunner
) -> None:
    sink = await runner.start(mosquitto.url, reconnect_max_backoff="500ms")
    mosquitto.stop()
    await wait_for(lambda: sink.status.state == "reconnecting")
    assert sink.status.last_error

    batch = make_batch(20)
    started = time.monotonic()
    outcomes = await sink.deliver(batch)
    assert time.monotonic() - started < 1.0  # not ack_timeout (30 s): nothing can be acknowledged
    assert all_retry(outcomes, len(batch))

    mosquitto.start()  # same port
    await wait_for(lambda: sink.status.state == "connected", timeout=10)
    with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        assert all_acked(await sink.deliver(batch))
        await wait_for(lambda: sum(ids_of(collector.snapshot()).values()) >= len(batch))
        assert ids_of(collector.snapshot()) == Counter({e.id: 1 for e in batch})


async def deliver_like_the_agent(sink: MqttSink, batch: list[BufferedEvent], within: float) -> float:
    """Deliver ``batch`` as the agent's delivery loop does, honouring each ``RetryLater.after``; seconds taken."""
    started = time.monotonic()
    while True:
        outcomes = await sink.deliver(batch)
        if all_acked(outcomes):
            return time.monotonic() - started
        hints = [o.after for o in outcomes if isinstance(o, RetryLater) and o.after is not None]
        assert hints, outcomes  # while disconnected the sink always says when to come back
        assert time.monotonic() - started < within, f"not delivered within {within} s"
        await asyncio.sleep(max(hints))  # the agent's wait, as the sink asked (not synchronisation)


async def test_a_broker_back_after_a_long_outage_is_found_within_seconds(
    mosquitto: MosquittoBroker, runner: SinkRunner
) -> None:
    started = time.monotonic()
    sink = await runner.start(mosquitto.url)  # default reconnect_max_backoff
    assert time.monotonic() - started < 2.0  # a fresh start connects at once, no backoff first
    assert sink.config.reconnect_max_backoff <= 5.0
    assert all_acked(await sink.deliver(make_batch(5)))

    mosquitto.stop()
    # Long enough for the backoff to reach its cap: 0.2, 0.4, 0.8, 1.6, then capped.
    await wait_for(lambda: sink.failed_attempts >= 6, timeout=30)
    batch = make_batch(20, start=100)
    assert all_retry(await sink.deliver(batch), 20)

    mosquitto.start()  # same port
    restarted = time.monotonic()
    with MqttCollector(mosquitto.host, mosquitto.port) as collector:
        await deliver_like_the_agent(sink, batch, within=6.0)
        assert time.monotonic() - restarted < 6.0
        await wait_for(lambda: ids_of(collector.snapshot()) == Counter({e.id: 1 for e in batch}), timeout=10)


async def test_outage_mid_delivery_retries_each_event_once_and_paho_resends_nothing(
    mosquitto_factory: Callable[..., MosquittoBroker], runner: SinkRunner
) -> None:
    # The collectors must see every retried event: no cap on what the broker queues for them.
    broker = mosquitto_factory(log_debug=True, extra_config=["max_queued_messages 0"])
    window = 50
    sink = await runner.start(broker.url, client_id="plantgate-outage", window=window, reconnect_max_backoff="500ms")
    batch = make_batch(10_000)  # far more than is delivered before the pause below
    with MqttCollector(broker.host, broker.port) as before:
        delivery = asyncio.create_task(sink.deliver(batch))
        await wait_for(lambda: sum(ids_of(before.snapshot()).values()) >= 100)
        broker.pause()  # a hung broker: the window fills with unacknowledged publishes
        await wait_for(lambda: sink.in_flight >= window)
        broker.kill()
        outcomes = await asyncio.wait_for(delivery, 5)
    retry = [e for e, o in zip(batch, outcomes, strict=True) if isinstance(o, RetryLater)]
    assert len(retry) >= window
    assert any(o is ACKED for o in outcomes)

    # While disconnected nothing is handed to paho (it would send it on its own later).
    not_now = make_batch(10, start=5000)
    assert all_retry(await sink.deliver(not_now), 10)

    broker.start()  # same port, fresh broker state
    with MqttCollector(broker.host, broker.port) as after:
        await wait_for(lambda: sink.status.state == "connected", timeout=10)
        assert all_acked(await sink.deliver(retry))
        marker = make_batch(1, "alarm.raised", start=9000)
        assert all_acked(await sink.deliver(marker))
        await after.wait_for_message(lambda m: m.topic.endswith("/alarm.raised"))
        counts = ids_of(after.snapshot())
    assert counts == Counter({e.id: 1 for e in [*retry, *marker]})
    # What the restarted broker received from the sink: one online, each retried event once, the marker.
    received = broker.publishes_received("plantgate-outage")
    assert len(received) == 1 + len(retry) + 1
    assert not any(p.dup for p in received)


async def test_no_puback_within_ack_timeout_gives_retry_and_a_new_connection(
    mosquitto: MosquittoBroker, runner: SinkRunner
) -> None:
    sink = await runner.start(mosquitto.url, ack_timeout="500ms", connect_timeout="1s", reconnect_max_backoff="500ms")
    mosquitto.pause()
    try:
        started = time.monotonic()
        outcomes = await asyncio.wait_for(sink.deliver(make_batch(10)), 5)
        assert 0.4 < time.monotonic() - started < 3.0
        assert all_retry(outcomes, 10)
        assert sink.status.state != "connected"
    finally:
        mosquitto.resume()
    await wait_for(lambda: sink.status.state == "connected", timeout=10)
    assert all_acked(await sink.deliver(make_batch(5)))


# --- TLS and credentials --------------------------------------------------------------------------------


async def test_tls_with_ca_verification(mosquitto_factory: Callable[..., MosquittoBroker], runner: SinkRunner) -> None:
    broker = mosquitto_factory(tls=True)
    sink = await runner.start(broker.tls_url, ca_file=broker.ca_file)
    assert sink.url == broker.tls_url
    with MqttCollector(broker.host, broker.port) as collector:
        batch = make_batch(20)
        assert all_acked(await sink.deliver(batch))
        await wait_for(lambda: sum(ids_of(collector.snapshot()).values()) >= 20)
        assert {m.payload for m in collector.snapshot() if "/status/" not in m.topic} == {e.body for e in batch}

    # Without the CA (system trust store) the broker's certificate is refused.
    untrusting = await runner.start(broker.tls_url, connected=False, client_id="plantgate-untrusting")
    await wait_for(lambda: untrusting.status.last_error is not None)
    assert "certificate" in (untrusting.status.last_error or "")
    assert not untrusting.connected
    assert all_retry(await untrusting.deliver(make_batch(1)), 1)


async def test_mutual_tls_client_certificate(
    mosquitto_factory: Callable[..., MosquittoBroker], runner: SinkRunner, tmp_path: Path
) -> None:
    broker = mosquitto_factory(tls=True, require_certificate=True)
    cert_file, key_file = broker.issue_client_cert("line3-gw")
    sink = await runner.start(broker.tls_url, ca_file=broker.ca_file, cert_file=cert_file, key_file=key_file)
    assert all_acked(await sink.deliver(make_batch(5)))

    anonymous = await runner.start(
        broker.tls_url, connected=False, ca_file=broker.ca_file, client_id="plantgate-no-cert"
    )
    await wait_for(lambda: anonymous.status.last_error is not None)
    assert not anonymous.connected


async def test_username_and_password_file(
    mosquitto_factory: Callable[..., MosquittoBroker],
    runner: SinkRunner,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="protocols.mqtt")
    broker = mosquitto_factory(users={"plant": "s3cret-pw", "watcher": "w"})
    (tmp_path / "mqtt-password").write_text("s3cret-pw\n")  # relative: resolved against data_dir
    sink = await runner.start(broker.url, username="plant", password_file=Path("mqtt-password"))
    with MqttCollector(broker.host, broker.port, username="watcher", password="w") as collector:
        assert all_acked(await sink.deliver(make_batch(3)))
        await wait_for(lambda: sum(ids_of(collector.snapshot()).values()) >= 3)

    (tmp_path / "wrong").write_text("nope-wrong")
    refused = await runner.start(
        broker.url, connected=False, username="plant", password_file=Path("wrong"), client_id="plantgate-wrong"
    )
    await wait_for(lambda: refused.status.state == "unauthorized")
    # Refused credentials do not fix themselves: the next attempt (and the retry hint) is 15-30 s away.
    (outcome,) = await refused.deliver(make_batch(1))
    assert isinstance(outcome, RetryLater) and outcome.after is not None and 14 < outcome.after <= 31
    assert "Bad user name or password" in (refused.status.last_error or "") or "Not authorized" in (
        refused.status.last_error or ""
    )
    assert "s3cret-pw" not in caplog.text and "nope-wrong" not in caplog.text
    assert any(r.levelname == "WARNING" and r.getMessage().startswith("Cannot connect") for r in caplog.records)


# --- limits -----------------------------------------------------------------------------------------------


async def test_window_bounds_unacknowledged_publishes(mosquitto: MosquittoBroker, runner: SinkRunner) -> None:
    sink = await runner.start(mosquitto.url, window=7, ack_timeout="10s")
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sink.in_flight)
            await asyncio.sleep(0)

    mosquitto.pause()  # nothing is acknowledged: the window is the only limit
    watcher = asyncio.create_task(watch())
    delivery = asyncio.create_task(sink.deliver(make_batch(100)))
    try:
        await wait_for(lambda: sink.in_flight == 7)
    finally:
        mosquitto.resume()
    outcomes = await asyncio.wait_for(delivery, 10)
    watcher.cancel()
    assert all_acked(outcomes)
    assert peak == 7


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"url": "http://broker:1883"}, "url"),
        ({"url": "mqtt://user:pw@broker"}, "url"),
        ({"url": "mqtt://"}, "url"),
        ({"url": "mqtt://broker/some/path"}, "url"),
        ({"qos": 2}, "qos"),
        ({"lanes": []}, "lanes"),
        ({"lanes": ["transaction", "transaction"]}, "lanes"),
        ({"lanes": ["alarms"]}, "lanes"),
        ({"window": 0}, "window"),
        ({"max_rate": -1}, "max_rate"),
        ({"keepalive": "soon"}, "keepalive"),
        ({"ca_file": "ca.pem"}, "ca_file"),
        ({"url": "mqtts://broker", "cert_file": "c.pem"}, "key_file"),
        ({"password_file": "pw"}, "password_file"),
        ({"topic_prefix": "plant/#"}, "topic_prefix"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_config_errors_name_the_field(options: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {"name": "cloud", "url": "mqtt://broker"} | options
    with pytest.raises(ValidationError) as info:
        MqttSinkConfig(**values)
    assert info.value.errors()[0]["loc"][0] == field


def test_config_defaults_and_derived_values(tmp_path: Path) -> None:
    config = MqttSinkConfig(name="cloud", url="mqtts://broker.example.com", keepalive="1m", max_rate=2000)
    assert (config.host, config.port, config.tls) == ("broker.example.com", 8883, True)
    assert (config.qos, config.window, config.keepalive) == (1, 500, 60.0)
    assert config.lanes == ["transaction", "operational", "telemetry"]
    assert MqttSinkConfig(name="c", url="mqtt://10.0.0.5").port == 1883

    sink = MqttSink(config, agent_id=AGENT, site=SITE, version="1", data_dir=tmp_path)
    assert sink.client_id == f"plantgate-{AGENT}"
    assert sink.status_topic == STATUS_TOPIC
    assert sink.status.state == "starting"
    assert sink.topic_for(make_batch(1, "goods.received")[0]) == f"{PREFIX}/transaction/goods.received"

    assert not config.credentials_in_clear
    assert MqttSinkConfig(name="c", url="mqtt://b", username="u", password="p").credentials_in_clear
    assert not MqttSinkConfig(name="c", url="mqtts://b", username="u", password="p").credentials_in_clear
    schema = MqttSinkConfig.model_json_schema()
    assert all(prop.get("description") for prop in schema["properties"].values())


def test_unreadable_secret_or_tls_file_fails_at_construction(tmp_path: Path) -> None:
    config = MqttSinkConfig(name="cloud", url="mqtt://b", username="u", password_file=Path("missing"))
    with pytest.raises(ValueError, match="password_file"):
        MqttSink(config, agent_id=AGENT, site=SITE, version="1", data_dir=tmp_path)
    config = MqttSinkConfig(name="cloud", url="mqtts://b", ca_file=Path("missing-ca.pem"))
    with pytest.raises(ValueError, match="TLS"):
        MqttSink(config, agent_id=AGENT, site=SITE, version="1", data_dir=tmp_path)
