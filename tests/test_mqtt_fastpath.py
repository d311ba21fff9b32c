"""The MQTT sink's fast QoS 1 path (``_FastPahoClient``): in use, correct, and replaceable by plain paho.

Against a real mosquitto on loopback where a broker is involved; the PUBACK parser's
edge cases (packets split across reads, unknown ids, malformed lengths) against a
socketpair standing in for the broker's end of the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from agent.sink import BufferedEvent, Rejected
from protocols.mqtt import MqttSink, _fast_path_problem, _FastPahoClient
from tests.peers.mosquitto import MosquittoBroker, MqttCollector
from tests.peers.waiting import wait_for
from tests.test_mqtt_sink import SinkRunner, all_acked, ids_of, make_batch

EVENT_TYPE = "io.plantgate.production.completed"


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[SinkRunner]:
    sinks = SinkRunner(tmp_path)
    try:
        yield sinks
    finally:
        await sinks.close()


def small_events(n: int, *, start: int = 0) -> list[BufferedEvent]:
    """``n`` tiny events whose body is just their id (the sink never looks inside a body)."""
    return [
        BufferedEvent(seq=i, lane="transaction", type=EVENT_TYPE, id=f"w{i}", body=b'{"id":"w%d"}' % i)
        for i in range(start, start + n)
    ]


def fast_client(sink: MqttSink) -> _FastPahoClient:
    conn = sink._conn
    assert conn is not None
    assert isinstance(conn.client, _FastPahoClient), type(conn.client)
    return conn.client


# --- in use -------------------------------------------------------------------------------------------


async def test_the_fast_path_is_the_one_in_use(mosquitto: MosquittoBroker, runner: SinkRunner) -> None:
    assert _fast_path_problem() is None  # the installed paho passes the start-up self-check
    window = 40
    sink = await runner.start(mosquitto.url, window=window, ack_timeout="10s")
    client = fast_client(sink)
    await wait_for(lambda: client._out_messages == {})  # the "online" status (a paho publish) is acknowledged

    mosquitto.pause()  # nothing is acknowledged: the window fills with fast-path publishes
    delivery = asyncio.create_task(sink.deliver(make_batch(100)))
    try:
        await wait_for(lambda: sink.in_flight == window)
        # In flight in the fast path's own map, not as paho MQTTMessages.
        assert len(client.fast_unacked) == window
        assert client._out_messages == {}
    finally:
        mosquitto.resume()
    assert all_acked(await asyncio.wait_for(delivery, 10))
    assert client.fast_unacked == {} and client._out_messages == {}
    assert sink._conn is not None and sink._conn.client is client


async def test_paho_publish_path_still_works_when_the_fast_path_is_off(
    mosquitto: MosquittoBroker, mqtt_collector: MqttCollector, runner: SinkRunner
) -> None:
    """What a paho upgrade that fails the self-check falls back to: plain ``paho.Client``."""
    sink = await runner.start(mosquitto.url, connected=False, client_id="plantgate-plain")
    sink._allow_fast_path = False  # before the first connect attempt runs
    await wait_for(lambda: sink.connected, timeout=10)
    assert sink._conn is not None and type(sink._conn.client) is paho.Client

    good = make_batch(300)
    bad = BufferedEvent(seq=99, lane="transaction", type="io.plantgate.bad#type", id="bad", body=b"{}")
    outcomes = await sink.deliver([*good[:150], bad, *good[150:]])

    assert isinstance(outcomes[150], Rejected) and "wildcard" in outcomes[150].reason
    assert all_acked([*outcomes[:150], *outcomes[151:]])
    await wait_for(lambda: sum(ids_of(mqtt_collector.snapshot()).values()) >= len(good))
    assert ids_of(mqtt_collector.snapshot()) == Counter({e.id: 1 for e in good})


def test_self_check_refuses_a_paho_whose_internals_differ() -> None:
    class QueueEntriesChanged(_FastPahoClient):
        def _packet_write(self) -> MQTTErrorCode:  # a paho whose queue entries carry another key
            for entry in self._out_packet:
                entry["sent"]  # type: ignore[typeddict-item]
            return super()._packet_write()

    class OwnPacketIds(_FastPahoClient):
        _mid_generate = paho.Client._mid_generate  # ids no longer skip those in flight

    class OlderPaho(_FastPahoClient):  # paho 2.1 kept the time of the last read as _last_msg_in
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._last_msg_in = self.__dict__.pop("_last_bytes_received")

    assert _FastPahoClient.self_check() is None
    assert "KeyError" in (QueueEntriesChanged.self_check() or "")
    assert "packet ids" in (OwnPacketIds.self_check() or "")
    assert "_last_bytes_received" in (OlderPaho.self_check() or "")


# --- packet ids ------------------------------------------------------------------------------------------


@pytest.fixture
def roomy_broker(mosquitto_factory: Callable[..., MosquittoBroker]) -> Callable[..., MosquittoBroker]:
    """``make(**options)``: started brokers that queue any number of QoS 1 messages for a subscriber
    that is behind, as the bench's broker does (mosquitto's default drops beyond 1000)."""
    return functools.partial(mosquitto_factory, extra_config=["max_queued_messages 0", "max_inflight_messages 0"])


async def test_packet_ids_wrap_around_on_one_connection(
    roomy_broker: Callable[..., MosquittoBroker], runner: SinkRunner
) -> None:
    total, per_batch = 70_000, 5_000  # more publishes than there are packet ids (65,535)
    broker = roomy_broker()
    sink = await runner.start(broker.url, window=2000)
    conn = sink._conn
    client = fast_client(sink)
    with MqttCollector(broker.host, broker.port, "plantgate/+/transaction/#") as collector:
        for start in range(0, total, per_batch):
            outcomes = await sink.deliver(small_events(per_batch, start=start))
            assert all_acked(outcomes), f"batch at {start}: {Counter(type(o).__name__ for o in outcomes)}"
        assert sink._conn is conn  # one connection throughout
        # The status message took id 1, the events 2..65535 and then 1.. again.
        assert client._last_mid == (1 + total) - 65535
        await collector.wait_for_count(total, timeout=60)
        counts = Counter(json.loads(m.payload)["id"] for m in collector.snapshot())
    assert counts == Counter({f"w{i}": 1 for i in range(total)})


async def test_cancelled_delivery_keeps_its_packet_ids_until_acknowledged(
    mosquitto: MosquittoBroker, runner: SinkRunner
) -> None:
    sink = await runner.start(mosquitto.url, window=50, ack_timeout="10s")
    client = fast_client(sink)
    mosquitto.pause()
    delivery = asyncio.create_task(sink.deliver(make_batch(80)))
    try:
        await wait_for(lambda: sink.in_flight == 50)
        in_flight = set(client.fast_unacked)
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        assert sink.in_flight == 0
        assert client.fast_abandoned == in_flight  # their PUBACKs may still come: ids not reused
        assert client._mid_generate() not in in_flight
    finally:
        mosquitto.resume()
    await wait_for(lambda: not client.fast_abandoned)  # acknowledged after all, and ignored
    assert all_acked(await sink.deliver(make_batch(20, start=100)))
    assert sink._conn is not None and sink._conn.client is client


# --- the connection around the fast path ---------------------------------------------------------------------


async def test_keepalive_pings_are_answered_while_on_the_fast_path(
    mosquitto_factory: Callable[..., MosquittoBroker], runner: SinkRunner
) -> None:
    broker = mosquitto_factory(log_debug=True)
    sink = await runner.start(broker.url, client_id="plantgate-ka", keepalive="1s")
    conn = sink._conn
    assert all_acked(await sink.deliver(make_batch(10)))
    # Each PINGRESP goes through paho's own parser; a misread one would drop the connection.
    await wait_for(lambda: broker.log().count("Sending PINGRESP to plantgate-ka") >= 3, timeout=15)
    assert sink._conn is conn and sink.connected
    assert all_acked(await sink.deliver(make_batch(10, start=10)))


async def test_tls_bulk_delivery_on_the_fast_path(
    roomy_broker: Callable[..., MosquittoBroker], runner: SinkRunner
) -> None:
    """Many TLS records each way: ~1 KB events, a window of 1000, writes of 64 KiB chunks."""
    broker = roomy_broker(tls=True)
    sink = await runner.start(broker.tls_url, ca_file=broker.ca_file, window=1000)
    fast_client(sink)
    batch = make_batch(3000, pad=1000)
    with MqttCollector(broker.host, broker.port, "plantgate/+/transaction/#") as collector:
        assert all_acked(await sink.deliver(batch))
        await collector.wait_for_count(len(batch), timeout=30)
        assert ids_of(collector.snapshot()) == Counter({e.id: 1 for e in batch})


# --- the PUBACK parser, byte by byte ------------------------------------------------------------------------


class BrokerEnd:
    """A ``_FastPahoClient`` whose socket is one end of a socketpair; the test writes the broker's bytes."""

    def __init__(self) -> None:
        self.client = _FastPahoClient(
            CallbackAPIVersion.VERSION2, client_id="parser-test", protocol=MQTTProtocolVersion.MQTTv311
        )
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.peer.settimeout(5.0)
        self.client._sock = self.ours
        self.acked: list[int] = []
        self.client.on_fast_acks = self.acked.extend
        self.disconnects: list[Any] = []
        self.client.on_disconnect = lambda *args: self.disconnects.append(args[3])

    def publish(self, tokens: list[int]) -> list[int]:
        """Fast-publish one event per token; the packet ids used."""
        head = _FastPahoClient.topic_header("t/x")
        before = set(self.client.fast_unacked)
        self.client.publish_qos1([(head, b"{}", token) for token in tokens])
        assert self.client.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
        sent = b""
        while len(sent) < len(tokens) * 11:  # 2 fixed header + 5 topic + 2 id + 2 payload
            sent += self.peer.recv(65536)
        return [mid for mid in self.client.fast_unacked if mid not in before]

    def feed(self, data: bytes) -> MQTTErrorCode:
        """The broker sends ``data``; the client reads once."""
        self.peer.sendall(data)
        return self.client.read_packets()

    def close(self) -> None:
        self.client._sock = None
        self.ours.close()
        self.peer.close()


@pytest.fixture
def broker_end() -> Iterator[BrokerEnd]:
    end = BrokerEnd()
    try:
        yield end
    finally:
        end.close()


def puback(mid: int) -> bytes:
    return b"\x40\x02" + mid.to_bytes(2, "big")


def test_pubacks_split_across_reads_are_all_settled(broker_end: BrokerEnd) -> None:
    mids = broker_end.publish(list(range(50)))
    assert len(set(mids)) == 50 and 0 not in mids
    stream = b"".join(puback(mid) for mid in mids[:25]) + b"\xd0\x00" + b"".join(puback(mid) for mid in mids[25:])
    for i in range(len(stream)):  # one byte at a time: every packet is split at every point
        assert broker_end.feed(stream[i : i + 1]) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert broker_end.acked == list(range(50))
    assert broker_end.client.fast_unacked == {}
    assert not broker_end.client._fast_rbuf  # nothing left behind once every packet is complete


def test_puback_for_an_unknown_id_is_ignored_and_frees_an_abandoned_one(broker_end: BrokerEnd) -> None:
    (mid,) = broker_end.publish([0])
    broker_end.client.fast_abandoned.add(4321)
    assert broker_end.feed(puback(4321) + puback(999) + puback(mid) + puback(mid)) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert broker_end.acked == [0]  # the repeated PUBACK is ignored too
    assert broker_end.client.fast_abandoned == set()
    assert broker_end.disconnects == []


def test_malformed_remaining_length_drops_the_connection(broker_end: BrokerEnd) -> None:
    broker_end.publish([0])
    rc = broker_end.feed(b"\x30\xff\xff\xff\xff\x01")  # five remaining-length bytes
    assert rc == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert broker_end.client.socket() is None and len(broker_end.disconnects) == 1


def test_connection_closed_by_the_broker_is_reported(broker_end: BrokerEnd) -> None:
    broker_end.publish([0])
    broker_end.peer.shutdown(socket.SHUT_WR)
    assert broker_end.client.read_packets() == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert broker_end.acked == []
