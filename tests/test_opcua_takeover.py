"""Nothing the server still holds is lost: acknowledgements after the commit, subscriptions taken over.

Against node-opcua (TransferSubscriptions and Republish supported) with the source in a child
process killed with SIGKILL, and against asyncua's own server for the fallback to a new
subscription. Both servers run on loopback.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from asyncua import Client

from agent.events import Reading
from agent.simulator import PressSimulator
from agent.source import BufferUnavailable
from protocols.opcua import OpcUaSourceConfig
from protocols.opcua.source import _Subscription
from tests.build import context
from tests.peers.opcua_server import NodeOpcUaServer, committed_values
from tests.peers.waiting import wait_for
from tests.test_opcua_source import TAGS, Recorder, config, running

ROOT = Path(__file__).resolve().parent.parent


def _child(config: OpcUaSourceConfig, db: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.peers.opcua_server", "run-source", config.model_dump_json(), str(db)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )


async def _at_least(read: Callable[[], Awaitable[int]], value: int) -> bool:
    return await read() >= value


async def test_kill_9_loses_no_value_the_server_still_holds(node_server: NodeOpcUaServer, tmp_path: Path) -> None:
    """A counter +1 every 250 ms: across a SIGKILL and a restart, every value is committed, none skipped.

    The server samples every 50 ms, so a value is never missed by sampling (that would
    take a 200 ms stall of node's event loop), only by a loss in the protocol.
    """
    db = tmp_path / "buffer.db"
    (tmp_path / "password").write_text("s3cret\n")
    settings = OpcUaSourceConfig.model_validate(
        {
            "name": "press",
            "endpoint": node_server.endpoint,
            "publishing_interval": "50ms",
            "sampling_interval": "50ms",
            # node-opcua hands a subscription over to a session of the same user only
            "username": "operator",
            "password_file": str(tmp_path / "password"),
            "tags": [
                {"tag": "counter", "node": NodeOpcUaServer.counter_node, "kind": "counter"},
                {"tag": "running", "node": NodeOpcUaServer.running_node, "kind": "state"},
            ],
        }
    )

    def values() -> list[int]:
        return [value for _, value in committed_values(db, "counter")]

    log = tmp_path / "source.log"
    async with Client(node_server.endpoint, timeout=4) as watcher:  # one session: little load on the server
        counter = watcher.get_node(NodeOpcUaServer.counter_node)

        async def now() -> int:
            value: int = await counter.read_value()
            return value

        first = _child(settings, db, log)
        try:
            await wait_for(lambda: len(values()) >= 6, timeout=20, message=lambda: f"committed {values()}")
        finally:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
        killed_at = max(values())
        # the server goes on counting while no agent runs: 8 values (2 s) it must keep
        await wait_for(lambda: _at_least(now, killed_at + 8), timeout=10, interval=0.1)

        second = _child(settings, db, log)
        try:
            restarted_at = await now()
            await wait_for(lambda: max(values()) >= restarted_at + 4, timeout=20, message=lambda: f"{values()[-30:]}")
        finally:
            second.send_signal(signal.SIGTERM)
            out, _ = second.communicate(timeout=10)
    info = json.loads(out.decode().strip().splitlines()[-1])
    print(log.read_text())  # shown when the test fails

    seen = values()
    assert seen == sorted(seen), "values committed out of order"
    missing = sorted(set(range(seen[0], seen[-1] + 1)) - set(seen))
    assert missing == [], f"lost {missing} (killed at {killed_at}, restarted at {restarted_at})"
    assert seen[-1] > restarted_at >= killed_at + 8
    assert info["subscription"].startswith("taken over"), info
    # a batch committed but not yet acknowledged when killed may come again, never more
    assert len(seen) - len(set(seen)) <= 10


class FlakyBuffer(Recorder):
    """Refuses the first ``failures`` batches that contain ``value``, as a full or failing buffer does."""

    def __init__(self, value: Any, failures: int) -> None:
        super().__init__()
        self.value = value
        self.failures = failures
        self.refused = 0

    async def readings(self, batch: Sequence[Reading]) -> None:
        if self.refused < self.failures and any(r.value == self.value for r in batch):
            self.refused += 1
            raise BufferUnavailable("disk full")
        await super().readings(batch)


async def test_a_batch_that_is_not_committed_is_retried_not_lost(press_server: PressSimulator, tmp_path: Path) -> None:
    source = config(press_server.endpoint).build(context(tmp_path))
    out = FlakyBuffer(41.0, failures=3)
    async with running(source, output=out):
        await wait_for(lambda: out.of("press7.temperature"))
        await press_server.set_temperature(41.0)
        await wait_for(lambda: out.refused == 3)
        await press_server.set_temperature(42.0)  # waits in the server while 41.0 is retried
        await wait_for(lambda: 42.0 in out.values("press7.temperature"), message=lambda: str(out.batches))
    assert out.values("press7.temperature")[-2:] == [41.0, 42.0]
    assert source.uncommitted == 3
    assert source.status.info["uncommitted"] == "3"
    state = _Subscription.from_json(out.state["subscription"])
    assert state.committed >= 2  # initial values, 41.0, 42.0: sequence numbers of committed batches


async def test_take_over_falls_back_to_a_new_subscription_on_asyncua(
    press_server: PressSimulator, tmp_path: Path
) -> None:
    """asyncua's server forgets subscriptions on restart: BadSubscriptionIdInvalid, then a new one."""
    source = config(press_server.endpoint).build(context(tmp_path))
    async with running(source) as out:
        await wait_for(lambda: out.of("press7.temperature"))
        first = _Subscription.from_json(out.state["subscription"])
        assert source.status.info["subscription"] == "new"

        await press_server.stop()
        await wait_for(lambda: source.status.state == "reconnecting", timeout=5)
        await press_server.start()  # a fresh server: the subscription is gone
        await wait_for(lambda: source.status.state == "connected", timeout=10, message=lambda: str(source.status))
        await press_server.set_temperature(33.0)
        await wait_for(lambda: 33.0 in out.values("press7.temperature"))

    assert source.transfer_fallbacks == 1 and source.transfers == 0
    assert source.status.info["subscription"] == "new (BadSubscriptionIdInvalid on transfer)"
    assert _Subscription.from_json(out.state["subscription"]).fingerprint == first.fingerprint


async def test_a_restart_takes_over_on_asyncua_while_its_session_lives(
    press_server: PressSimulator, tmp_path: Path
) -> None:
    """A clean stop keeps the subscription; the next start transfers it and gets what changed meanwhile.

    asyncua's server answers the transfer Good but goes on serving the subscription to the
    closed connection: no Publish response comes for it, so after its keep-alive period the
    source replaces it by a new one, and what changes after the take-over arrives too.
    """
    settings = config(press_server.endpoint, timeout="1s")
    out = Recorder()
    async with running(settings.build(context(tmp_path)), output=out):
        await press_server.set_temperature(50.0)
        await wait_for(lambda: 50.0 in out.values("press7.temperature"))
    await press_server.set_temperature(51.0)  # while no agent runs
    await press_server.set_temperature(52.0)

    source = settings.build(context(tmp_path))
    async with running(source, output=out):
        await wait_for(lambda: 52.0 in out.values("press7.temperature"), message=lambda: str(source.status))
        await press_server.set_temperature(53.0)  # after the take-over
        await wait_for(lambda: 53.0 in out.values("press7.temperature"), timeout=15, message=lambda: str(source.status))
    temperatures = out.values("press7.temperature")
    start = temperatures.index(50.0)
    # the new subscription's initial value may repeat 52.0; nothing is lost or reordered
    assert [t for i, t in enumerate(temperatures[start:]) if i == 0 or t != temperatures[start + i - 1]] == [
        50.0,
        51.0,
        52.0,
        53.0,
    ], temperatures
    # Either the keep-alive deadline passed, or the server sent the old connection's pending
    # Publish response down the new one (asyncua's client drops the connection for it) and
    # the next session, seeing the take-over unproven, replaced it at once: one new subscription.
    assert source.transfers >= 1 and source.silent_takeovers == 1 and source.transfer_fallbacks == 1
    assert source.status.info["subscription"] == "new (no notification after take-over)", source.status.info
    assert _Subscription.from_json(out.state["subscription"]).proven  # the new one, kept for the next start


async def test_a_second_start_after_a_silent_take_over_replaces_it_at_once(
    press_server: PressSimulator, tmp_path: Path
) -> None:
    """Stopped before the take-over could be proven: the next start republishes, then subscribes anew."""
    settings = config(press_server.endpoint, timeout="1s")
    out = Recorder()
    async with running(settings.build(context(tmp_path)), output=out):
        await press_server.set_temperature(60.0)
        await wait_for(lambda: 60.0 in out.values("press7.temperature"))
    second = settings.build(context(tmp_path))
    async with running(second, output=out):
        assert second.transfers == 1
    assert _Subscription.from_json(out.state["subscription"]).proven is False  # stopped within the keep-alive period
    await press_server.set_temperature(61.0)  # while no agent runs

    third = settings.build(context(tmp_path))
    async with running(third, output=out):
        await wait_for(lambda: 61.0 in out.values("press7.temperature"), message=lambda: str(third.status))
        await press_server.set_temperature(62.0)
        await wait_for(lambda: 62.0 in out.values("press7.temperature"), timeout=5)
    assert third.transfers >= 1 and third.silent_takeovers == 1
    assert third.status.info["subscription"] == "new (no notification after take-over)"


async def test_a_changed_config_is_not_taken_over(press_server: PressSimulator, tmp_path: Path) -> None:
    out = Recorder()
    async with running(config(press_server.endpoint).build(context(tmp_path)), output=out):
        await wait_for(lambda: out.of("press7.temperature"))
    source = config(press_server.endpoint, tags=TAGS[:2]).build(context(tmp_path))
    async with running(source, output=out):
        await wait_for(lambda: source.status.info.get("subscription") == "new")
    assert source.transfers == 0 and source.transfer_fallbacks == 0


def test_reading_the_config_does_not_import_asyncua(tmp_path: Path) -> None:
    code = (
        "import sys; from agent.settings import parse_settings; "
        's = parse_settings(\'[agent]\\nsite = "p"\\ndata_dir = "/tmp"\\n\'); '
        "from protocols.opcua import OpcUaSourceConfig; "
        "c = OpcUaSourceConfig.model_validate({'name': 'p', 'endpoint': 'opc.tcp://h:4840', "
        "'tags': [{'tag': 't', 'node': 'ns=2;s=T'}]}); "
        "print(sorted(m for m in ('asyncua', 'cryptography') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_defaults_reconnect_promptly_and_keep_the_subscription() -> None:
    parsed = OpcUaSourceConfig.model_validate({"name": "p", "endpoint": "opc.tcp://plc:4840", "tags": TAGS[:1]})
    assert parsed.reconnect_max_backoff == 3.0
    assert parsed.subscription_lifetime == 300.0
    assert parsed.fast_decoder is True


async def test_fast_decoder_can_be_turned_off(press_server: PressSimulator, tmp_path: Path) -> None:
    source = config(press_server.endpoint, fast_decoder=False).build(context(tmp_path))
    async with running(source) as out:
        await press_server.set_temperature(61.5)
        await wait_for(lambda: 61.5 in out.values("press7.temperature"))
    assert source.status.info["decoder"] == "asyncua"
    assert source.fast_notifications == 0


async def test_a_refused_node_stays_quarantined_across_a_take_over(
    node_server: NodeOpcUaServer, tmp_path: Path
) -> None:
    """A stop and start: the subscription is taken over, the missing node is still degraded and retried."""
    (tmp_path / "password").write_text("s3cret\n")
    missing = "ns=1;s=Missing"
    settings = OpcUaSourceConfig.model_validate(
        {
            "name": "press",
            "endpoint": node_server.endpoint,
            "publishing_interval": "50ms",
            "username": "operator",
            "password_file": str(tmp_path / "password"),
            "bad_node_retry": "200ms",
            "tags": [
                {"tag": "counter", "node": NodeOpcUaServer.counter_node, "kind": "counter"},
                {"tag": "missing", "node": missing},
            ],
        }
    )
    out = Recorder()
    async with running(settings.build(context(tmp_path)), output=out):
        await wait_for(lambda: len(out.of("counter")) >= 2)
    stopped_at = out.values("counter")[-1]

    source = settings.build(context(tmp_path))
    async with running(source, output=out):
        assert source.status.info["subscription"].startswith("taken over"), source.status.info
        assert source.status.degraded == {missing: "BadNodeIdUnknown"}
        await wait_for(lambda: out.values("counter")[-1] >= stopped_at + 4)
        await wait_for(lambda: source.status.degraded.get(missing) == "BadNodeIdUnknown")
    counter = out.values("counter")
    # nothing lost across the stop; the take-over's initial value may repeat the last one
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(counter)), counter
    assert len(counter) - len(set(counter)) <= 1, counter
    assert _Subscription.from_json(out.state["subscription"]).monitored == [0]
