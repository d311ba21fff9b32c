"""The OPC UA source against a real asyncua server (the press simulator) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from pydantic import ValidationError

from agent.events import Reading
from agent.simulator import APPLICATION_URI, PressSimulator
from agent.source import SourceError
from protocols.opcua import OpcUaSourceConfig
from protocols.opcua.source import OpcUaSource
from tests.build import context
from tests.peers.opcua_server import make_certificate
from tests.peers.waiting import wait_for

NODE = PressSimulator.node_id

TAGS = [
    {"tag": "press7.temperature", "node": NODE("Temperature"), "kind": "telemetry"},
    {"tag": "press7.state", "node": NODE("State"), "kind": "state"},
    {"tag": "press7.cycle_done", "node": NODE("CycleDone"), "kind": "value"},
    {"tag": "press7.cycle_ack", "node": NODE("CycleAck"), "kind": "value"},
    {"tag": "press7.work_order", "node": NODE("WorkOrder"), "kind": "value"},
    {"tag": "press7.item", "node": NODE("Item"), "kind": "value"},
    {"tag": "press7.batch_qty", "node": NODE("BatchQty"), "kind": "value"},
]


class Recorder:
    """The agent side of ``output.readings``: keeps every batch as it came."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []
        self.state: dict[str, str] = {}

    async def readings(self, batch: Sequence[Reading]) -> None:
        self.batches.append(list(batch))

    async def events(self, batch: Sequence[Any]) -> None:
        raise NotImplementedError

    async def load_state(self, key: str) -> str | None:
        return self.state.get(key)

    async def save_state(self, key: str, value: str | None) -> None:
        if value is None:
            self.state.pop(key, None)
        else:
            self.state[key] = value

    def of(self, tag: str) -> list[Reading]:
        return [r for batch in self.batches for r in batch if r.tag == tag]

    def values(self, tag: str) -> list[Any]:
        return [r.value for r in self.of(tag)]


def config(endpoint: str, **overrides: Any) -> OpcUaSourceConfig:
    settings: dict[str, Any] = {
        "name": "press7",
        "endpoint": endpoint,
        "publishing_interval": "50ms",
        "reconnect_max_backoff": "500ms",
        "tags": TAGS,
    }
    settings.update(overrides)
    return OpcUaSourceConfig.model_validate(settings)


@contextlib.asynccontextmanager
async def running(
    source: OpcUaSource, *, connect: bool = True, output: Recorder | None = None
) -> AsyncIterator[Recorder]:
    """Run ``source`` in a task (connected, unless ``connect=False``) into ``output``; cancel it on exit."""
    recorder = output if output is not None else Recorder()
    task = asyncio.create_task(source.run(recorder))
    try:
        if connect:
            await wait_for(
                lambda: source.status.state == "connected",
                message=lambda: f"source connected, status {source.status}",
            )
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert source.status.state == "stopped"


async def test_readings_flow_with_source_time_and_quality(press_server: PressSimulator, tmp_path: Path) -> None:
    source = config(press_server.endpoint).build(context(tmp_path))
    assert list(source.tags()) == [t["tag"] for t in TAGS]
    async with running(source) as out:
        # the initial values of every tag arrive after subscribing
        await wait_for(lambda: all(out.of(t["tag"]) for t in TAGS), message=lambda: str(out.batches))
        assert out.values("press7.temperature")[0] == 20.0
        assert out.values("press7.work_order")[0] == ""

        stamp = datetime(2026, 3, 1, 6, 30, 15, 250000, tzinfo=UTC)
        await press_server.write("Temperature", 181.25, source_time=stamp)
        await press_server.set_state(1)
        await wait_for(lambda: 181.25 in out.values("press7.temperature"))
        await wait_for(lambda: 1 in out.values("press7.state"))

    temperature = out.of("press7.temperature")[-1]
    assert temperature == Reading("press7.temperature", 181.25, stamp, "good")
    assert temperature.time.utcoffset() == timedelta(0)
    state = out.of("press7.state")[-1]
    assert type(state.value) is int and state.quality == "good"
    assert state.time.tzinfo is not None and state.time.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - state.time) < timedelta(seconds=30)
    assert source.status.degraded == {}


async def test_changes_of_one_publish_arrive_as_one_batch(press_server: PressSimulator, tmp_path: Path) -> None:
    source = config(press_server.endpoint, publishing_interval="200ms").build(context(tmp_path))
    async with running(source) as out:
        await wait_for(lambda: out.of("press7.cycle_done"))
        await press_server.complete_cycle("WO-4711", "FILL-500", 12)
        await wait_for(lambda: "WO-4711" in out.values("press7.work_order"))
        await wait_for(lambda: False in out.values("press7.cycle_done")[1:])

    # the four writes of the cycle land in one publish (two, if a publishing interval ends
    # between them): either way one output.readings() call carries several of them
    cycle_values = {("press7.work_order", "WO-4711"), ("press7.item", "FILL-500"), ("press7.batch_qty", 12.0)}
    cycle_values.add(("press7.cycle_done", True))
    cycle = [[r for r in b if (r.tag, r.value) in cycle_values] for b in out.batches]
    assert sum(len(b) for b in cycle) == 4
    assert max(len(b) for b in cycle) >= 2, out.batches
    # values of one node keep their order: the rising and the falling edge both arrive
    assert out.values("press7.cycle_done")[-2:] == [True, False]
    assert out.values("press7.item")[-1] == "FILL-500"
    assert out.values("press7.batch_qty")[-1] == 12.0


async def test_bad_value_is_delivered_as_bad_and_marks_the_node(press_server: PressSimulator, tmp_path: Path) -> None:
    source = config(press_server.endpoint).build(context(tmp_path))
    node = NODE("Temperature")
    async with running(source) as out:
        await wait_for(lambda: out.of("press7.temperature"))
        await press_server.write("Temperature", None, status=ua.StatusCodes.BadSensorFailure)
        await wait_for(
            lambda: source.status.degraded.get(node) == "BadSensorFailure", message=lambda: str(source.status)
        )
        bad = out.of("press7.temperature")[-1]
        assert (bad.value, bad.quality) == (None, "bad")

        await press_server.write("Temperature", 99.5, status=ua.StatusCodes.UncertainLastUsableValue)
        await wait_for(lambda: 99.5 in out.values("press7.temperature"))
        assert out.of("press7.temperature")[-1].quality == "uncertain"
        assert node not in source.status.degraded


async def test_unknown_node_is_degraded_while_others_flow(press_server: PressSimulator, tmp_path: Path) -> None:
    pressure = NODE("Pressure")
    by_uri = "nsu=urn:plantgate:simulator:press7;s=Press7.State"  # namespace resolved at connect
    tags = [TAGS[0], {"tag": "press7.state", "node": by_uri}, {"tag": "press7.pressure", "node": pressure}]
    source = config(press_server.endpoint, tags=tags, bad_node_retry="200ms").build(context(tmp_path))
    async with running(source) as out:
        assert source.status.degraded == {pressure: "BadNodeIdUnknown"}
        assert source.status.state == "connected"
        await press_server.set_temperature(55.5)
        await press_server.set_state(2)
        await wait_for(lambda: 55.5 in out.values("press7.temperature"))
        await wait_for(lambda: 2 in out.values("press7.state"))

        # the PLC program is downloaded with the new variable: the retry picks it up
        await press_server.add_variable("Pressure", 2.5, ua.VariantType.Double)
        await wait_for(lambda: 2.5 in out.values("press7.pressure"), message=lambda: str(source.status))
        assert source.status.degraded == {}


async def test_server_restart_reconnects_and_readings_resume(
    press_server: PressSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncua")
    source = config(press_server.endpoint).build(context(tmp_path))
    async with running(source) as out:
        await press_server.set_temperature(30.0)
        await wait_for(lambda: 30.0 in out.values("press7.temperature"))

        await press_server.stop()
        await wait_for(lambda: source.status.state == "reconnecting", timeout=5)
        assert source.status.last_error
        with pytest.raises(SourceError, match="not connected"):
            await source.write("press7.cycle_ack", True)

        # A reconnect refused while the server is away.
        await wait_for(lambda: "refused" in (source.status.last_error or "").lower(), timeout=10)
        await press_server.start()  # same port, fresh server
        await wait_for(lambda: source.status.state == "connected", timeout=10, message=lambda: str(source.status))
        await press_server.set_temperature(31.0)
        await wait_for(lambda: 31.0 in out.values("press7.temperature"), timeout=5)
    # A lost connection and refused reconnects are normal: no library error with a traceback in the log.
    noise = [r for r in caplog.records if r.name.startswith("asyncua") and r.levelno >= logging.ERROR]
    assert not noise, [r.getMessage() for r in noise]


async def test_a_server_that_stops_answering_is_detected(press_server: PressSimulator, tmp_path: Path) -> None:
    # No FIN, no RST: only the watchdog's probe notices (within about two intervals).
    source = config(press_server.endpoint, watchdog_interval="300ms", timeout="1s").build(context(tmp_path))
    async with running(source) as out:
        press_server.freeze()
        await wait_for(lambda: source.status.state == "reconnecting", timeout=3, message=lambda: str(source.status))
        assert "answering" in (source.status.last_error or "")
        # the server still accepts new connections, so the source comes back on its own
        await wait_for(lambda: source.status.state == "connected", timeout=10)
        await press_server.set_temperature(66.0)
        await wait_for(lambda: 66.0 in out.values("press7.temperature"))


async def test_write_acknowledges_the_cycle(press_server: PressSimulator, tmp_path: Path) -> None:
    source = config(press_server.endpoint).build(context(tmp_path))
    async with running(source) as out:
        cycle = asyncio.create_task(press_server.complete_cycle("WO-4712", "FILL-500", 6, wait_ack=10))
        await wait_for(lambda: True in out.values("press7.cycle_done"))
        await source.write("press7.cycle_ack", True)
        assert await cycle is True
        await wait_for(lambda: True in out.values("press7.cycle_ack"))

        await source.write("press7.cycle_ack", 1)  # ints 0/1 are accepted for a Boolean node
        assert press_server.value("CycleAck") is True
        with pytest.raises(SourceError, match="Boolean"):
            await source.write("press7.cycle_ack", "yes")
        with pytest.raises(SourceError, match=r"BadUserAccessDenied|BadNotWritable"):
            await source.write("press7.temperature", 1.0)  # read-only on the PLC
        with pytest.raises(SourceError, match="no tag"):
            await source.write("press7.nope", True)


async def test_secure_channel_with_username_and_password(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    server_cert, server_key = make_certificate(pki, "server", APPLICATION_URI, server=True, pem=True)
    client_cert, client_key = make_certificate(pki, "agent", "urn:plantgate:test:agent", server=False)
    (tmp_path / "password").write_text("s3cret\n")
    simulator = PressSimulator(
        certificate=server_cert,
        private_key=server_key,
        security_policies=["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign"],
        users={"operator": "s3cret"},
    )
    async with simulator:
        secure = {
            "security_policy": "Basic256Sha256",
            "security_mode": "SignAndEncrypt",
            "certificate": str(client_cert.relative_to(tmp_path)),  # relative: resolved against data_dir
            "private_key": str(client_key.relative_to(tmp_path)),
            "username": "operator",
            "password_file": "password",
        }
        source = config(simulator.endpoint, **secure).build(context(tmp_path))
        async with running(source) as out:
            await simulator.set_temperature(42.0)
            await wait_for(lambda: 42.0 in out.values("press7.temperature"))
            await source.write("press7.cycle_ack", True)
            assert simulator.value("CycleAck") is True

        # Sign only, the server certificate pinned, the password from the environment form
        signed = {**secure, "security_mode": "Sign", "server_certificate": str(server_cert), "password_file": None}
        source = config(simulator.endpoint, **signed, password="s3cret").build(context(tmp_path))
        async with running(source) as out:
            await wait_for(lambda: out.of("press7.temperature"))

        wrong = config(simulator.endpoint, **{**secure, "password_file": None}, password="wrong")
        source = wrong.build(context(tmp_path))
        async with running(source, connect=False):
            await wait_for(lambda: source.status.state == "reconnecting", message=lambda: str(source.status))
            assert "BadUserAccessDenied" in (source.status.last_error or "")

        # no security at all is refused by this server
        plain = config(simulator.endpoint, username="operator", password="s3cret").build(context(tmp_path))
        async with running(plain, connect=False):
            await wait_for(lambda: plain.status.state == "reconnecting", message=lambda: str(plain.status))


def test_missing_certificate_file_is_a_config_error(tmp_path: Path) -> None:
    settings = {
        "security_policy": "Basic256Sha256",
        "security_mode": "Sign",
        "certificate": "pki/missing.der",
        "private_key": "pki/missing.key",
    }
    with pytest.raises(ValueError, match="certificate: cannot read"):
        config("opc.tcp://127.0.0.1:4840", **settings).build(context(tmp_path))


def _error(exc: pytest.ExceptionInfo[ValidationError]) -> tuple[tuple[Any, ...], str]:
    [error] = exc.value.errors()
    return tuple(error["loc"]), error["msg"]


def test_config_rejects_a_bad_node_id() -> None:
    tags = [{"tag": "t", "node": "ns=two;s=Press7.Temperature"}]
    with pytest.raises(ValidationError) as exc:
        config("opc.tcp://127.0.0.1:4840", tags=tags)
    loc, msg = _error(exc)
    assert loc == ("tags", 0, "node")
    assert "not an OPC UA node id" in msg


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"security_policy": "Basic256Sha256"}, ["security_policy", "security_mode"]),
        ({"security_mode": "Sign"}, ["security_policy", "security_mode"]),
        (
            {"security_policy": "Basic256Sha256", "security_mode": "Sign", "certificate": "agent.der"},
            ["certificate", "private_key"],
        ),
        ({"password_file": "pw"}, ["username"]),
        ({"server_certificate": "server.der"}, ["server_certificate", "security_policy"]),
    ],
)
def test_config_rejects_inconsistent_security(settings: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValidationError) as exc:
        config("opc.tcp://127.0.0.1:4840", **settings)
    _, msg = _error(exc)
    for word in words:
        assert word in msg


def test_config_rejects_duplicate_tags_and_nodes() -> None:
    with pytest.raises(ValidationError) as exc:
        config("opc.tcp://127.0.0.1:4840", tags=[TAGS[0], {**TAGS[1], "tag": TAGS[0]["tag"]}])
    loc, msg = _error(exc)
    assert loc == ("tags",) and "press7.temperature" in msg and "twice" in msg

    with pytest.raises(ValidationError) as exc:
        config("opc.tcp://127.0.0.1:4840", tags=[TAGS[0], {**TAGS[0], "tag": "other"}])
    loc, msg = _error(exc)
    assert loc == ("tags",) and "Press7.Temperature" in msg


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:4840", "opc.tcp://127.0.0.1", "opc.tcp://user:pw@127.0.0.1:4840", "opc.tcp://:4840"]
)
def test_config_rejects_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValidationError) as exc:
        config(endpoint)
    loc, _ = _error(exc)
    assert loc == ("endpoint",)


def test_config_defaults_and_durations() -> None:
    parsed = OpcUaSourceConfig.model_validate(
        {"name": "p", "endpoint": "opc.tcp://plc:4840/path", "tags": TAGS[:1], "sampling_interval": "250ms"}
    )
    assert (parsed.publishing_interval, parsed.sampling_interval, parsed.queue_size) == (0.1, 0.25, 100)
    assert parsed.model_dump(mode="json")["publishing_interval"] == "100ms"
    schema = OpcUaSourceConfig.model_json_schema()
    assert all(prop.get("description") for prop in schema["properties"].values())
    with pytest.raises(ValidationError):
        OpcUaSourceConfig.model_validate({"name": "p", "endpoint": "opc.tcp://plc:4840", "tags": []})
