"""Counter quantities across agent restarts: no count lost, none counted twice.

The rules hand back their counter state (``RuleOutput.state``) to be saved in the
same commit as the batch's events; a restarted agent ``restore``s it before its
first batch. Property: whatever the counter does (counts, wraps, resets) and
wherever the agent restarts, the quantities of all transactions add up to what the
counter counted, by the rule of ``agent.counters``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.counters import raw_increment
from agent.events import Reading
from agent.rules import RuleOutput, Rules
from agent.settings import Settings, parse_settings
from buffer import Buffer

CONFIG = """
[agent]
site = "plant-01"
id = "gw"

[[sources.modbus]]
name = "filler2"
endpoint = "tcp://127.0.0.1:5020"
  [[sources.modbus.tags]]
  tag = "filler2.good_count"
  register = "holding:100"
  type = "uint16"
  kind = "counter"
  [[sources.modbus.tags]]
  tag = "filler2.cycle_done"
  register = "coil:0"
  type = "bool"
  kind = "value"

[[transactions]]
name = "filler2-output"
when = "filler2.cycle_done"
type = "production.completed"
fields = { quantity = "filler2.good_count" }
uom = "EA"

[[transactions]]
name = "filler2-every-count"
when = "filler2.good_count"
on = "increment"
type = "scrap.declared"
fields = { scrap_quantity = "filler2.good_count" }
uom = "EA"
"""
SETTINGS = parse_settings(CONFIG)
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def restarted(settings: Settings, saved: dict[str, str]) -> Rules:
    rules = Rules(settings)
    for key in rules.state_keys():
        if key in saved:
            assert rules.restore(key, saved[key])
    return rules


def quantities(output: RuleOutput, key: str) -> int:
    transactions = [event for event in output.events if event.lane == "transaction"]
    return sum(int(event.data[key].value) for event in transactions if key in event.data)


step = st.one_of(
    st.tuples(st.just("count"), st.integers(0, 9000)),  # forward by n (a wrap past 65535 included)
    st.tuples(st.just("reset"), st.integers(0, 20)),  # a reset, after which it already counted n
    st.tuples(st.just("cycle"), st.just(0)),
    st.tuples(st.just("restart"), st.integers(0, 5000)),  # the PLC counted n while the agent was down
)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 65535), st.lists(step, max_size=40))
def test_quantities_add_up_to_what_was_counted_across_restarts(start: int, steps: list[tuple[str, int]]) -> None:
    saved: dict[str, str] = {}
    rules = restarted(SETTINGS, saved)
    raw = start
    counted = 0
    reported = {"quantity": 0, "scrap_quantity": 0}
    tick = 0

    def feed(*readings: tuple[str, Any]) -> None:
        nonlocal tick
        tick += 1
        batch = [Reading(tag, value, T0 + timedelta(seconds=tick)) for tag, value in readings]
        output = rules.process("filler2", batch)
        saved.update(output.state)  # committed with the events, or neither
        for key in reported:
            reported[key] += quantities(output, key)

    feed(("filler2.cycle_done", False), ("filler2.good_count", raw))
    for kind, n in steps:
        if kind == "restart":
            rules = restarted(SETTINGS, saved)
            # A source reads every tag once at start (the PLC may have counted meanwhile).
            previous, raw = raw, (raw + n) % 65536
            counted += raw_increment(previous, raw, 16)
            feed(("filler2.good_count", raw))
            continue
        if kind == "cycle":
            feed(("filler2.cycle_done", False))
            feed(("filler2.cycle_done", True))
            continue
        new = (raw + n) % 65536 if kind == "count" else n
        counted += raw_increment(raw, new, 16)
        raw = new
        feed(("filler2.good_count", raw))
    feed(("filler2.cycle_done", False))
    feed(("filler2.cycle_done", True))
    assert reported["quantity"] == counted
    assert reported["scrap_quantity"] == counted


async def test_counter_state_goes_through_the_buffer_with_the_events(tmp_path: Path) -> None:
    """Saved in the group commit of the batch's events, read back by a restarted agent."""
    path = tmp_path / "buffer.db"
    buffer = Buffer(path, synchronous="NORMAL")
    await buffer.open()
    try:
        rules = Rules(SETTINGS)
        for second, value in ((0, 100), (1, 160)):
            output = rules.process("filler2", [Reading("filler2.good_count", value, T0 + timedelta(seconds=second))])
            buffer.append(output.events)
            for key, state in output.state.items():
                future = buffer.save_state(key, state)
            await future
        assert [quantities(output, "scrap_quantity")] == [60]
    finally:
        await buffer.close()
    buffer = Buffer(path, synchronous="NORMAL")
    await buffer.open()
    try:
        rules = Rules(SETTINGS)
        saved = {key: value for key in rules.state_keys() if (value := await buffer.load_state(key)) is not None}
        assert list(saved) == ["rules/counter/filler2.good_count"]
        rules = restarted(SETTINGS, saved)
    finally:
        await buffer.close()
    # The PLC counted 40 more while the agent was down: reported once, by the first reading after start.
    output = rules.process("filler2", [Reading("filler2.good_count", 200, T0 + timedelta(seconds=30))])
    assert quantities(output, "scrap_quantity") == 40
    # The same reading again (a reconnect replaying it): nothing more.
    output = rules.process("filler2", [Reading("filler2.good_count", 200, T0 + timedelta(seconds=30))])
    assert quantities(output, "scrap_quantity") == 0


def test_state_that_does_not_apply_is_refused() -> None:
    rules = Rules(SETTINGS)
    assert not rules.restore("rules/counter/filler2.cycle_done", '{"raw": 1, "total": 1}')
    assert not rules.restore("rules/counter/no.such.tag", '{"raw": 1, "total": 1}')
    assert not rules.restore("rules/counter/filler2.good_count", "not json")
    assert rules.restore("rules/counter/filler2.good_count", '{"raw": 5, "total": 7}')
