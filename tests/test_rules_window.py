"""Window rules (``every``): counter deltas per wall-clock window, fired from ``flush_due``.

The clock is injected: ``flush_due(now)`` is called with chosen datetimes.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.events import CloudEvent, Reading, stable_id
from agent.pipeline import Agent
from agent.rules import RuleOutput, Rules
from agent.settings import ConfigError, Settings, parse_settings
from protocols.modbus.simulator import FillerSimulator
from tests.peers.waiting import wait_for

HEAD = """
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
  tag = "filler2.reject_count"
  register = "holding:101"
  type = "uint16"
  kind = "counter"
  [[sources.modbus.tags]]
  tag = "filler2.running"
  register = "coil:0"
  type = "bool"
  kind = "value"

[[sources.modbus]]
name = "filler3"
endpoint = "tcp://127.0.0.1:5021"
  [[sources.modbus.tags]]
  tag = "filler3.good_count"
  register = "holding:100"
  type = "uint16"
  kind = "counter"
"""
RULE = """
[[transactions]]
name = "filler2-quarter-hour"
every = "15m"
type = "production.completed"
fields = {{ quantity = "filler2.good_count", scrap_quantity = "filler2.reject_count", line = {{ literal = "L2" }} }}
uom = "EA"
{extra}
"""
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)  # a quarter-hour boundary
URI = "plantgate/plant-01/gw/filler2"


def settings_with(extra: str = "") -> Settings:
    return parse_settings(HEAD + RULE.format(extra=extra))


def feed(rules: Rules, at: datetime, good: int, reject: int = 0) -> RuleOutput:
    return rules.process(
        "filler2", [Reading("filler2.good_count", good, at), Reading("filler2.reject_count", reject, at)]
    )


def windows(out: RuleOutput) -> list[CloudEvent]:
    return [event for event in out.events if event.type.endswith("production.completed")]


def restarted(settings: Settings, saved: dict[str, str]) -> Rules:
    rules = Rules(settings)
    for key in rules.state_keys():
        if key in saved:
            assert rules.restore(key, saved[key])
    return rules


def test_a_window_gets_what_was_counted_in_it_with_a_wrap_and_a_reset() -> None:
    rules = Rules(settings_with())
    saved: dict[str, Any] = {}
    saved.update(rules.flush_due(T0 + timedelta(seconds=2)).state)  # first start: counting begins here
    feed(rules, T0 + timedelta(minutes=1), 65530, 7)
    feed(rules, T0 + timedelta(minutes=2), 4, 9)  # good wraps (+10), reject +2
    feed(rules, T0 + timedelta(minutes=3), 0, 9)  # good reset: +0
    feed(rules, T0 + timedelta(minutes=4), 5, 10)  # +5, +1
    assert windows(rules.flush_due(T0 + timedelta(minutes=14))) == [], "the window is not over"
    out = rules.flush_due(T0 + timedelta(minutes=15, seconds=2))
    [event] = windows(out)
    assert quantities(event) == (15, 3)
    assert event.time == T0 + timedelta(minutes=15)
    assert event.source == URI
    assert event.id == stable_id(URI, "filler2-quarter-hour", (T0 + timedelta(minutes=15)).isoformat())
    assert out.state["rules/window/filler2-quarter-hour"] == (T0 + timedelta(minutes=15)).isoformat()
    assert "rules/counter/filler2.good_count" in out.state
    assert windows(rules.flush_due(T0 + timedelta(minutes=16))) == [], "a window fires once"


def quantities(event: CloudEvent) -> tuple[int, int]:
    return int(event.data["quantity"].value), int(event.data["scrap_quantity"].value)


def test_window_quantities_and_units() -> None:
    rules = Rules(settings_with())
    rules.flush_due(T0)
    feed(rules, T0 + timedelta(minutes=1), 100, 3)
    feed(rules, T0 + timedelta(minutes=5), 140, 5)
    [event] = windows(rules.flush_due(T0 + timedelta(minutes=15, seconds=1)))
    assert quantities(event) == (40, 2)
    assert event.data["quantity"].uom == "EA"
    assert event.data["line"] == "L2"


def test_skip_zero_leaves_out_an_idle_window_and_can_be_turned_off() -> None:
    rules = Rules(settings_with())
    rules.flush_due(T0)
    feed(rules, T0 + timedelta(minutes=1), 100, 3)
    assert windows(rules.flush_due(T0 + timedelta(minutes=15, seconds=1))) == []
    feed(rules, T0 + timedelta(minutes=16), 101, 3)
    [event] = windows(rules.flush_due(T0 + timedelta(minutes=30, seconds=1)))
    assert quantities(event) == (1, 0)

    rules = Rules(settings_with("skip_zero = false"))
    rules.flush_due(T0)
    feed(rules, T0 + timedelta(minutes=1), 100, 3)
    [event] = windows(rules.flush_due(T0 + timedelta(minutes=15, seconds=1)))
    assert quantities(event) == (0, 0)


def test_a_restart_inside_a_window_neither_doubles_nor_loses_it() -> None:
    settings = settings_with()
    rules = Rules(settings)
    saved: dict[str, str] = {}
    saved.update(rules.flush_due(T0).state)
    saved.update(feed(rules, T0 + timedelta(minutes=1), 10).state)
    saved.update(feed(rules, T0 + timedelta(minutes=2), 30).state)
    first = rules.flush_due(T0 + timedelta(minutes=15, seconds=1))
    [event] = windows(first)
    assert quantities(event)[0] == 20
    # Crash after the window's event but before its state was saved: the restart fires it
    # again under the same id (the buffer drops the duplicate) with the same quantity.
    again = restarted(settings, saved)
    [replayed] = windows(again.flush_due(T0 + timedelta(minutes=15, seconds=1)))
    assert (replayed.id, quantities(replayed)) == (event.id, quantities(event))
    # With the state saved, a restart inside the next window does not fire the last one again.
    saved.update(first.state)
    rules = restarted(settings, saved)
    assert windows(rules.flush_due(T0 + timedelta(minutes=20))) == []
    saved.update(feed(rules, T0 + timedelta(minutes=21), 35).state)
    rules = restarted(settings, saved)
    saved.update(feed(rules, T0 + timedelta(minutes=22), 36).state)
    [event] = windows(rules.flush_due(T0 + timedelta(minutes=30, seconds=1)))
    assert quantities(event)[0] == 6


def test_a_boundary_passed_while_down_fires_once_with_everything_since() -> None:
    settings = settings_with()
    rules = Rules(settings)
    saved: dict[str, str] = {}
    saved.update(rules.flush_due(T0).state)
    saved.update(feed(rules, T0 + timedelta(minutes=1), 10).state)
    saved.update(feed(rules, T0 + timedelta(minutes=2), 12).state)
    rules = restarted(settings, saved)  # down from 10:02 to 10:50
    saved.update(feed(rules, T0 + timedelta(minutes=50), 40).state)
    out = rules.flush_due(T0 + timedelta(minutes=50, seconds=1))
    [event] = windows(out)
    assert event.time == T0 + timedelta(minutes=45)
    assert quantities(event)[0] == 30
    assert windows(rules.flush_due(T0 + timedelta(minutes=55))) == []


def test_condition_is_taken_at_the_window_end_and_counts_carry_over() -> None:
    rules = Rules(settings_with('condition = { tag = "filler2.running", equals = true }'))
    rules.flush_due(T0)
    rules.process("filler2", [Reading("filler2.running", False, T0 + timedelta(minutes=1))])
    feed(rules, T0 + timedelta(minutes=1), 10)
    feed(rules, T0 + timedelta(minutes=2), 15)
    assert windows(rules.flush_due(T0 + timedelta(minutes=15, seconds=1))) == []
    rules.process("filler2", [Reading("filler2.running", True, T0 + timedelta(minutes=16))])
    feed(rules, T0 + timedelta(minutes=17), 18)
    [event] = windows(rules.flush_due(T0 + timedelta(minutes=30, seconds=1)))
    assert quantities(event)[0] == 8


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ('every = "15m"\nwhen = "filler2.running"', "exactly one trigger"),
        ('every = "15m"\nwhen_event = "goods.received"', "exactly one trigger"),
        ('every = "15m"\non = "rising"', "fires on the clock"),
        ('every = "15m"\nack = "filler2.running"', "fires on the clock"),
        ('every = "0s"', "positive"),
        ('when = "filler2.running"\nskip_zero = false', "skip_zero"),
        ('every = "15m"\nfields = { line = { literal = "L2" } }', "needs a field naming a counter tag"),
        (
            'every = "15m"\nfields = { quantity = "filler2.good_count", scrap_quantity = "filler3.good_count" }',
            "from one source",
        ),
    ],
)
def test_window_rule_validation(rule: str, message: str) -> None:
    text = (
        HEAD
        + f"""
[[transactions]]
name = "bad"
type = "production.completed"
uom = "EA"
{rule}
"""
    )
    if "fields" not in rule:
        text += 'fields = { quantity = "filler2.good_count" }\n'
    with pytest.raises(ConfigError, match=message):
        parse_settings(text)


def test_the_shipped_window_example_reports_a_quarter_hour() -> None:
    example = Path(__file__).parent.parent / "config" / "rules" / "windows" / "production.completed.toml"
    rules = Rules(parse_settings('[agent]\nsite = "plant-01"\nid = "gw"\n\n' + example.read_text(encoding="utf-8")))
    rules.flush_due(T0)
    rules.process(
        "filler2",
        [
            Reading("filler2.work_order", 4711, T0 + timedelta(minutes=1)),
            Reading("filler2.good_count", 65000, T0 + timedelta(minutes=1)),
            Reading("filler2.reject_count", 3, T0 + timedelta(minutes=1)),
        ],
    )
    feed(rules, T0 + timedelta(minutes=9), 100, 5)  # the good counter wrapped
    [event] = windows(rules.flush_due(T0 + timedelta(minutes=15, seconds=1)))
    assert quantities(event) == (636, 2)
    assert event.subject == "4711"
    assert event.time == T0 + timedelta(minutes=15)


FILLER_CONFIG = """
[agent]
site = "plant-01"
id = "gw"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sources.modbus]]
name = "filler1"
endpoint = "{endpoint}"
unit = 1
poll_interval = "50ms"
timeout = "500ms"

  [[sources.modbus.tags]]
  tag = "filler1.good_count"
  register = "holding:0"
  type = "uint32"
  kind = "counter"

[[transactions]]
name = "filler1-per-second"
every = "1s"
type = "production.completed"
fields = {{ quantity = "filler1.good_count" }}
uom = "EA"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def window_events(path: Path) -> list[dict[str, Any]]:
    """Every production.completed event in the JSON Lines sink's file."""
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [event for event in events if event["type"].endswith("production.completed")]


def read(agent: Agent) -> Any:
    """The agent's current value of the filler's counter."""
    return getattr(agent.rules.current.get("filler1.good_count"), "value", None)


def counted(path: Path) -> int:
    return sum(int(event["data"]["quantity"]["value"]) for event in window_events(path))


async def test_a_running_agent_reports_per_window_exactly_what_the_filler_counted_across_a_restart(
    tmp_path: Path,
) -> None:
    """Real Modbus filler, real agent, stopped and started again: the windows add up to the bottles filled."""
    out = tmp_path / "events.jsonl"
    async with FillerSimulator() as filler:
        site = parse_settings(FILLER_CONFIG.format(data_dir=tmp_path, endpoint=filler.endpoint))
        filled = 0
        for run in range(2):
            agent = Agent(site)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            try:
                await asyncio.wait_for(agent.wait_started(), 10)
                # The first reading is where counting starts (of a counter never read before).
                await wait_for(lambda a=agent: read(a) == filler.good_count, timeout=10, message="the first reading")
                for bottles in (3, 5, 7, 11):
                    filler.add_good(bottles)
                    filled += bottles
                    await wait_for(lambda a=agent: read(a) == filler.good_count, timeout=10, message="a reading")
                await wait_for(lambda f=filled: counted(out) == f, timeout=10, message=f"run {run}: windows sum up")
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
            filler.add_good(13)  # filled while the agent is down: reported after the restart
            filled += 13
    events = window_events(out)
    assert counted(out) == filled - 13
    assert len({event["id"] for event in events}) == len(events), "no window twice"
    for event in events:
        end = datetime.fromisoformat(event["time"])
        assert end.microsecond == 0, "a window ends on a whole second"
        assert event["source"] == "plantgate/plant-01/gw/filler1"
