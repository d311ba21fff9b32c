"""The contract every sink passes (``agent.sink.Sink``), run against each sink and its real peer.

One harness per sink: MQTT against a real mosquitto on loopback (with a subscriber
that records what arrives), JSON Lines on a temporary directory. Adding a sink
(HTTPS) is one more harness class and one more entry in ``HARNESSES``.

The contract: ``batch_max`` declared; one outcome per event, in order; ``ACKED``
only once the peer has the event; peer down -> every event retried (never an
exception), the same id delivered once the peer is back; ``status.state`` moves to
``connected`` and back; a cancelled ``run()`` closes cleanly; ``describe()`` masks
secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent.config_types import BuildContext
from agent.events import encode_event, make_event, stable_id
from agent.sink import ACKED, BufferedEvent, Outcome, RetryLater, Sink, SinkConfig
from protocols.https import HttpsSinkConfig
from protocols.jsonl import JsonlSinkConfig
from protocols.mqtt import MqttSinkConfig
from tests.peers.https_server import Certificates, HttpsReceiver
from tests.peers.mosquitto import MosquittoBroker, MqttCollector
from tests.peers.waiting import wait_for

SITE = "plant-01"
AGENT = "line3-gw"
REPO = Path(__file__).resolve().parents[1]
_T0 = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)


def make_batch(n: int, *, start: int = 0, name: str = "production.completed") -> list[BufferedEvent]:
    """``n`` canonical events, encoded the way the buffer stores them."""
    batch = []
    for i in range(start, start + n):
        event = make_event(
            name,
            id=stable_id("contract", name, i),
            source=f"plantgate/{SITE}/{AGENT}/contract",
            time=_T0 + timedelta(seconds=i),
            site=SITE,
            subject=f"WO-{i}",
            data={"work_order": f"WO-{i}", "note": "x" * 100},
        )
        batch.append(BufferedEvent(seq=i, lane=event.lane, type=event.type, id=event.id, body=encode_event(event)))
    return batch


def context(data_dir: Path) -> BuildContext:
    return BuildContext(agent_id=AGENT, site=SITE, version="9.9.9", data_dir=data_dir)


class Harness:
    """A sink, its peer, and what the contract tests need to see of that peer."""

    kind: ClassVar[str]
    secret_key: ClassVar[str] = "password="
    """How ``describe`` names the masked secret of ``secret_configs``."""
    ack_visible_within: ClassVar[float]
    """How long after ``ACKED`` the test's view of the peer may lag (a subscriber's delivery)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "agent"
        self.data_dir.mkdir()

    def config(self) -> SinkConfig:
        raise NotImplementedError

    def secret_configs(self) -> list[tuple[SinkConfig, str]]:
        """Configs carrying a secret, with the secret ``describe()`` must not show."""
        return []

    def peer_ids(self) -> list[str]:
        """Every event id the peer holds, in arrival order (repeats included)."""
        raise NotImplementedError

    def take_down(self) -> None:
        raise NotImplementedError

    async def bring_up(self) -> None:
        raise NotImplementedError

    async def closed_cleanly(self) -> None:
        """What the peer shows of a clean close (beyond ``status.state == "stopped"``)."""

    def close(self) -> None:
        """Teardown."""


class MqttHarness(Harness):
    kind = "mqtt"
    ack_visible_within = 10.0

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.broker = MosquittoBroker(tmp_path / "mosquitto").start()
        self.collectors = [MqttCollector(self.broker.host, self.broker.port).start()]

    def config(self) -> SinkConfig:
        return MqttSinkConfig(name="contract", url=self.broker.url, reconnect_max_backoff="500ms", window=50)

    def secret_configs(self) -> list[tuple[SinkConfig, str]]:
        (self.data_dir / "mqtt-password").write_text("from-a-file-pw\n")
        url = "mqtts://broker.example.com"
        return [
            (MqttSinkConfig(name="c", url=url, username="u", password="env-s3cret-pw"), "env-s3cret-pw"),
            (MqttSinkConfig(name="c", url=url, username="u", password_file=Path("mqtt-password")), "from-a-file-pw"),
        ]

    def _events(self) -> list[dict[str, Any]]:
        return [
            json.loads(m.payload)
            for collector in self.collectors
            for m in collector.snapshot()
            if "/status/" not in m.topic
        ]

    def peer_ids(self) -> list[str]:
        return [event["id"] for event in self._events()]

    def take_down(self) -> None:
        for collector in self.collectors:
            collector.stop()
        self.broker.stop()

    async def bring_up(self) -> None:
        self.broker.start()  # same port
        self.collectors.append(MqttCollector(self.broker.host, self.broker.port).start())

    async def closed_cleanly(self) -> None:
        topic = f"plantgate/{SITE}/status/{AGENT}"
        with MqttCollector(self.broker.host, self.broker.port, topic) as late:
            status = await late.wait_for_message(lambda m: True)
        assert status.retain and json.loads(status.payload)["state"] == "offline"

    def close(self) -> None:
        for collector in self.collectors:
            collector.stop()
        self.broker.close()


class JsonlHarness(Harness):
    kind = "jsonl"
    ack_visible_within = 0.0  # the line is in the file when deliver returns

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.out = self.data_dir / "out"
        self.moved: list[Path] = []

    def config(self) -> SinkConfig:
        return JsonlSinkConfig(name="contract", path=Path("out/events.jsonl"))

    def peer_ids(self) -> list[str]:
        files = [d / "events.jsonl" for d in [*self.moved, self.out]]
        files = [f for path in files for f in (path.with_name(path.name + ".1"), path) if f.is_file()]
        return [json.loads(line)["id"] for f in files for line in f.read_bytes().splitlines()]

    def take_down(self) -> None:
        # The directory goes away and a file takes its name: nothing can be written to the path.
        gone = self.tmp_path / f"gone-{len(self.moved)}"
        self.out.rename(gone)
        self.moved.append(gone)
        self.out.write_bytes(b"")

    async def bring_up(self) -> None:
        self.out.unlink()


class HttpsHarness(Harness):
    kind = "https"
    ack_visible_within = 0.0  # the receiver stored the batch before it answered 200

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.certs = Certificates(tmp_path / "certs")
        self.receiver = HttpsReceiver(self.certs).start()

    def config(self) -> SinkConfig:
        return HttpsSinkConfig(name="contract", url=self.receiver.url, ca_file=self.certs.ca_file, timeout="2s")

    secret_key = "bearer_token="

    def secret_configs(self) -> list[tuple[SinkConfig, str]]:
        url = self.receiver.url
        (self.data_dir / "erp-token").write_text("from-a-file-token\n", encoding="utf-8")
        return [
            (HttpsSinkConfig(name="c", url=url, bearer_token="env-s3cret-token"), "env-s3cret-token"),
            (HttpsSinkConfig(name="c", url=url, bearer_token_file=Path("erp-token")), "from-a-file-token"),
        ]

    def peer_ids(self) -> list[str]:
        return self.receiver.ids()

    def take_down(self) -> None:
        self.receiver.stop()

    async def bring_up(self) -> None:
        self.receiver.start()  # same port

    def close(self) -> None:
        self.receiver.stop()


HARNESSES: dict[str, type[Harness]] = {"mqtt": MqttHarness, "jsonl": JsonlHarness, "https": HttpsHarness}


class Running:
    """A built sink whose ``run()`` is a task."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.task: asyncio.Task[None] = asyncio.create_task(sink.run(), name=f"run-{sink.name}")

    async def connected(self) -> None:
        await wait_for(lambda: self.sink.status.state == "connected", timeout=10)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    made = HARNESSES[request.param](tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
async def running(harness: Harness) -> AsyncIterator[Running]:
    run = Running(harness.config().build(context(harness.data_dir)))
    try:
        await run.connected()
        yield run
    finally:
        await run.stop()


def acked(outcomes: list[Outcome] | Any) -> bool:
    return all(o is ACKED for o in outcomes)


async def peer_has(harness: Harness, ids: list[str]) -> None:
    await wait_for(
        lambda: Counter(harness.peer_ids()) >= Counter(ids),
        timeout=harness.ack_visible_within,
        message=lambda: f"{len(set(ids) - set(harness.peer_ids()))} of {len(ids)} acknowledged events not at the peer",
    )


# --- the contract --------------------------------------------------------------------------------------


def test_batch_max_is_declared(harness: Harness) -> None:
    sink = harness.config().build(context(harness.data_dir))
    assert isinstance(sink.batch_max, int) and sink.batch_max > 0
    assert sink.status.kind == harness.kind and sink.status.name == "contract"


async def test_one_outcome_per_event_in_order_acked_once_the_peer_has_it(harness: Harness, running: Running) -> None:
    sink = running.sink
    assert list(await sink.deliver([])) == []
    batch = make_batch(sink.batch_max)

    outcomes = await sink.deliver(batch)

    assert len(outcomes) == len(batch) and acked(outcomes)
    await peer_has(harness, [e.id for e in batch])
    assert harness.peer_ids() == [e.id for e in batch]  # each once, in order


async def test_peer_down_retries_everything_then_the_same_ids_are_delivered(harness: Harness, running: Running) -> None:
    sink = running.sink
    first = make_batch(10)
    assert acked(await sink.deliver(first))
    await peer_has(harness, [e.id for e in first])

    harness.take_down()
    batch = make_batch(30, start=10)
    outcomes = await asyncio.wait_for(sink.deliver(batch), 10)  # never raises, returns promptly
    assert len(outcomes) == len(batch)
    assert all(isinstance(o, RetryLater) for o in outcomes), outcomes
    await wait_for(lambda: sink.status.state != "connected", timeout=5)
    assert sink.status.last_error

    await harness.bring_up()

    async def delivered() -> bool:
        return acked(await sink.deliver(batch))

    await wait_for(delivered, timeout=10, message="the retried batch was not delivered once the peer was back")
    await peer_has(harness, [e.id for e in first + batch])
    counts = Counter(harness.peer_ids())
    assert counts == Counter({e.id: 1 for e in first + batch})  # same ids, each once


async def test_status_moves_to_connected_and_back_and_run_closes_cleanly_when_cancelled(
    harness: Harness,
) -> None:
    sink = harness.config().build(context(harness.data_dir))
    assert sink.status.state != "connected"
    run = Running(sink)
    await run.connected()
    assert acked(await sink.deliver(make_batch(5)))

    run.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run.task  # cancellation is the only thing run() raises

    assert sink.status.state == "stopped"
    await harness.closed_cleanly()
    await peer_has(harness, [e.id for e in make_batch(5)])


def test_describe_masks_secrets(harness: Harness) -> None:
    ctx = context(harness.data_dir)
    lines = harness.config().describe(ctx)
    assert lines and lines[0].startswith("contract")
    for config, secret in harness.secret_configs():
        text = "\n".join(config.describe(ctx))
        assert secret not in text
        assert harness.secret_key in text  # masked, not left out


# --- sink specifics that the contract does not cover -----------------------------------------------------


async def test_jsonl_rotates_at_max_size_keeping_one_old_file(tmp_path: Path) -> None:
    config = JsonlSinkConfig(name="rotating", path=Path("events.jsonl"), max_size_mb=0.01)  # ~10 KiB
    sink = config.build(context(tmp_path))
    run = Running(sink)
    try:
        await run.connected()
        batches = [make_batch(20, start=20 * k) for k in range(10)]  # ~7 KiB each
        for batch in batches:
            assert acked(await sink.deliver(batch))
    finally:
        await run.stop()
    check_rotation(tmp_path, [e.id for batch in batches for e in batch])


def check_rotation(directory: Path, everything: list[str]) -> None:
    current, old = directory / "events.jsonl", directory / "events.jsonl.1"
    assert old.is_file() and current.is_file()
    assert sorted(p.name for p in directory.iterdir()) == ["events.jsonl", "events.jsonl.1"]
    assert old.stat().st_size > 10 * 1024  # rotated once past the limit, not before
    ids = [json.loads(line)["id"] for f in (old, current) for line in f.read_bytes().splitlines()]
    assert ids == everything[len(everything) - len(ids) :]  # the newest lines, in order, none twice
    assert current.stat().st_size <= 10 * 1024 + 7 * 1024


_NO_PAHO = """
import sys
from agent.settings import parse_settings
settings = parse_settings('''
[agent]
site = "plant-01"
id = "gw"
data_dir = "/tmp"

[[sinks.jsonl]]
name = "file"
''')
assert [type(s).__name__ for s in settings.sink_configs()] == ["JsonlSinkConfig"]
print(sorted(m for m in sys.modules if m == "paho" or m.startswith("paho.")))
"""


def test_a_config_without_mqtt_never_imports_paho() -> None:
    done = subprocess.run([sys.executable, "-c", _NO_PAHO], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_mqtt_config_model_is_importable_without_paho_and_build_imports_it(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from agent.config_types import BuildContext; "
        "from protocols.mqtt import MqttSinkConfig; "
        "c = MqttSinkConfig(name='c', url='mqtt://127.0.0.1'); assert 'paho' not in sys.modules; "
        f"s = c.build(BuildContext(agent_id='a', site='s', version='1', data_dir=Path({str(tmp_path)!r}))); "
        "print(type(s).__module__, 'paho' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["protocols.mqtt.sink", "True"]
