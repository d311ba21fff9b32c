"""Telemetry options: percent deadband and ``min_interval``, their arithmetic as properties.

The data-driven cases (``tests/cases/rules/telemetry_*.toml``) show the behaviour
on chosen readings; these properties check it on any sequence.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.events import Aggregate, Reading, Sample
from agent.pipeline import Agent
from agent.rules import Rules
from agent.settings import ConfigError, parse_settings
from tests.peers.modbus_server import ModbusPeer
from tests.peers.waiting import wait_for

START = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
TAG = "oven1.temperature"


def config(options: str, kind: str = "telemetry") -> str:
    return f"""
[agent]
site = "plant-01"
id = "gw"

[[sources.opcua]]
name = "oven1"
endpoint = "opc.tcp://127.0.0.1:4840"
  [[sources.opcua.tags]]
  tag = "{TAG}"
  node = "ns=2;s=T"
  kind = "{kind}"
  {options}
"""


def sent(rules: Rules, readings: list[Reading]) -> list[Sample]:
    """The samples the rules forward for ``readings``, one reading per batch."""
    out: list[Sample] = []
    for reading in readings:
        for event in rules.process("oven1", [reading]).events:
            out.extend(event.data.samples)
    return out


values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
bands = st.floats(min_value=0.0, max_value=1e3, allow_nan=False)
percents = st.floats(min_value=0.0, max_value=200.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(values, max_size=60), bands, percents)
def test_no_forwarded_pair_is_closer_than_either_deadband(readings: list[float], band: float, percent: float) -> None:
    rules = Rules(parse_settings(config(f"deadband = {band!r}\n  deadband_percent = {percent!r}")))
    forwarded = sent(rules, [Reading(TAG, v, START + timedelta(seconds=i)) for i, v in enumerate(readings)])
    if readings:
        assert forwarded[0].value == readings[0], "the first value is always forwarded"
    for before, after in itertools.pairwise(forwarded):
        assert isinstance(before.value, float) and isinstance(after.value, float)
        change = abs(after.value - before.value)
        assert change >= band
        assert change >= abs(before.value) * percent / 100
    # Nothing forwarded is invented, and the order is the readings' order.
    times = [sample.time for sample in forwarded]
    assert times == sorted(times)
    assert all(sample.value == readings[int((sample.time - START).total_seconds())] for sample in forwarded)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30_000), values), min_size=1, max_size=60),
    st.integers(1, 20),
    st.sampled_from([None, 0.5, 10.0]),
)
def test_min_interval_sends_one_sample_per_interval_and_never_loses_the_last(
    steps: list[tuple[int, float]], interval: int, band: float | None
) -> None:
    """At most one sample per interval (sample k+1 not sent before k's interval ended); a burst's end is sent."""
    options = f'min_interval = "{interval}s"' + (f"\n  deadband = {band}" if band is not None else "")
    rules = Rules(parse_settings(config(options)))
    at = START
    readings = []
    for gap_ms, value in steps:
        at += timedelta(milliseconds=gap_ms)
        readings.append(Reading(TAG, value, at))
    # (sample, when it was sent): a reading's own time, or the flush time for a held sample
    emitted: list[tuple[Sample, datetime]] = []
    for reading in readings:
        # The agent's maintenance tick: every second of source time between readings.
        tick = emitted[-1][1] if emitted else START
        while (tick := tick + timedelta(seconds=1)) < reading.time and len(emitted) < 10_000:
            for event in rules.flush_due(tick).events:
                emitted.extend((sample, tick) for sample in event.data.samples)
        for event in rules.process("oven1", [reading]).events:
            emitted.extend((sample, reading.time) for sample in event.data.samples)
    last = readings[-1]
    end = last.time + timedelta(seconds=interval)
    for event in rules.flush_due(end).events:
        emitted.extend((sample, end) for sample in event.data.samples)
    assert emitted, "the first reading is always forwarded"
    assert emitted[0][0].value == readings[0].value
    sent_at = [when for _, when in emitted]
    # One sample per interval: consecutive sends are at least an interval apart (a held one at its interval's end).
    for earlier, later in itertools.pairwise(sent_at):
        assert later - earlier >= timedelta(seconds=interval) - timedelta(microseconds=1)
    final = emitted[-1][0]
    assert isinstance(final.value, float) and isinstance(last.value, float)
    # The last value of the burst is sent, unless it is within the deadband of what was sent.
    if band is None:
        assert final.value == last.value
    else:
        assert final.value == last.value or abs(final.value - last.value) < band
    assert rules.flush_due(end + timedelta(hours=1)).events == [], "nothing is held after the burst's end"


def test_a_held_sample_is_flushed_when_no_new_value_comes() -> None:
    rules = Rules(parse_settings(config('min_interval = "2s"')))
    assert rules.aggregating, "the agent must tick flush_due for a min_interval tag"
    sent(rules, [Reading(TAG, 1.0, START), Reading(TAG, 2.0, START + timedelta(seconds=1))])
    assert rules.flush_due(START + timedelta(seconds=1.9)).events == []
    [event] = rules.flush_due(START + timedelta(seconds=2)).events
    assert [sample.value for sample in event.data.samples] == [2.0]


@pytest.mark.parametrize(
    ("options", "kind", "message"),
    [
        ("deadband_percent = 5", "counter", 'deadband_percent applies only to kind = "telemetry"'),
        ('min_interval = "1s"', "state", 'min_interval applies only to kind = "telemetry"'),
        ('min_interval = "1s"', "value", 'min_interval applies only to kind = "telemetry"'),
        ("deadband_percent = -1", "telemetry", "deadband_percent"),
        ('min_interval = "0s"', "telemetry", "min_interval must be a positive duration"),
        ('min_interval = "1s"\n  aggregate = "10s"', "telemetry", "min_interval does not apply with aggregate"),
    ],
)
def test_telemetry_options_are_config_errors_elsewhere(options: str, kind: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(config(options, kind))


MODBUS_CONFIG = """
[agent]
site = "plant-01"
id = "gw"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sources.modbus]]
name = "oven1"
endpoint = "{endpoint}"
unit = 1
poll_interval = "50ms"
timeout = "500ms"

  [[sources.modbus.tags]]
  tag = "oven1.level"
  register = "holding:0"
  min_interval = "2s"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def level_samples(path: Path) -> list[Any]:
    """The values of every ``oven1.level`` sample in the JSON Lines sink's file."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["type"].endswith("telemetry.samples"):
            found.extend(s["value"] for s in event["data"]["samples"] if s["tag"] == "oven1.level")
    return found


async def test_a_running_agent_sends_the_held_value_at_the_interval_end_without_a_new_value(tmp_path: Path) -> None:
    """Real Modbus server, real agent: a burst's last value arrives within a second of its interval's end."""
    async with ModbusPeer((1,)).tcp() as peer:
        site = parse_settings(MODBUS_CONFIG.format(data_dir=tmp_path, endpoint=peer.endpoint))
        agent = Agent(site)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        out = tmp_path / "events.jsonl"
        try:
            await asyncio.wait_for(agent.wait_started(), 10)
            await wait_for(lambda: level_samples(out) == [0], timeout=10, message="the first value goes at once")
            first_seen = time.monotonic()
            for value in (5, 6, 7):  # a burst inside the first interval: held, only the last one counts
                peer.set("holding", 0, [value])
                await wait_for(lambda v=value: getattr(agent.rules.current.get("oven1.level"), "value", None) == v)
            assert level_samples(out) == [0], "nothing more before the interval's end"
            # The register stays at 7: no new value comes, the maintenance tick sends the held one.
            await wait_for(lambda: level_samples(out) == [0, 7], timeout=6, message="the burst's last value")
            assert time.monotonic() - first_seen >= 2.0 - 0.1, "not before the interval's end"
            assert time.monotonic() - first_seen <= 2.0 + 2.5, "within about a second of the interval's end"
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


# Steps between readings in milliseconds: many inside one window, some across several.
steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=25_000),
        values,
        st.sampled_from(["good", "good", "good", "bad"]),
        st.booleans(),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(steps, st.sampled_from(["1s", "2500ms", "10s", "1m"]))
def test_every_aggregate_equals_its_window_of_readings(rows: list[tuple[int, float, str, bool]], width: str) -> None:
    rules = Rules(parse_settings(config(f'aggregate = "{width}"')))
    seconds = {"1s": 1.0, "2500ms": 2.5, "10s": 10.0, "1m": 60.0}[width]
    readings: list[Reading] = []
    at = START
    for step, value, quality, _ in rows:
        at += timedelta(milliseconds=step)
        readings.append(Reading(TAG, value, at, quality))  # type: ignore[arg-type]
    aggregates: list[Aggregate] = []
    batch: list[Reading] = []
    for reading, (_, _, _, cut) in zip(readings, rows, strict=True):
        batch.append(reading)
        if cut:
            # The maintenance tick runs on the agent's clock, about the readings' time.
            for event in [*rules.process("oven1", batch).events, *rules.flush_due(reading.time).events]:
                aggregates.extend(event.data.aggregates)
            batch = []
    for event in [*rules.process("oven1", batch).events, *rules.flush_due(at + timedelta(hours=1)).events]:
        aggregates.extend(event.data.aggregates)

    expected: dict[datetime, list[float]] = {}
    for reading in readings:
        if reading.quality != "bad":
            start = datetime.fromtimestamp(math.floor(reading.time.timestamp() / seconds) * seconds, UTC)
            expected.setdefault(start, []).append(reading.value)
    starts = [aggregate.start for aggregate in aggregates]
    # No reading in two windows or in none: one aggregate per window that had good readings.
    assert sorted(starts) == sorted(expected), "each window is emitted exactly once"
    assert sum(aggregate.count for aggregate in aggregates) == sum(len(v) for v in expected.values())
    for aggregate in aggregates:
        window = expected[aggregate.start]
        assert aggregate.tag == TAG
        assert aggregate.end - aggregate.start == timedelta(seconds=seconds)
        assert aggregate.count == len(window)
        assert aggregate.min == min(window)
        assert aggregate.max == max(window)
        assert aggregate.last == window[-1]
        assert math.isclose(aggregate.mean, sum(window) / len(window), rel_tol=1e-9, abs_tol=1e-6)
