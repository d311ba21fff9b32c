"""Classification and transaction rules, data-driven: ``tests/cases/rules/*.toml``.

Each case file holds:

- ``description``: what the case shows;
- ``config``: the site config (the TOML that ``agent.settings`` reads);
- ``source``: the source the batches come from (default: the first OPC UA source);
- ``xfail`` (optional): the reason the case shows a known bug (strict xfail);
- ``[[batches]]``, processed in order by one ``Rules`` instance. A batch has either
  ``readings`` (inline tables ``{tag, value, time, quality}``, ``time`` RFC 3339)
  for ``Rules.process``, or ``flush`` (an RFC 3339 time, optional ``grace``) for
  ``Rules.flush_due``, or ``restart = true``: the agent restarts, a fresh ``Rules``
  takes back the state the earlier batches handed out to be saved (``RuleOutput.state``).
  What the batch must produce, exactly (a missing key means "nothing"):
  - ``[[batches.events]]``: ``type`` (without ``io.plantgate.``), and any of
    ``subject``, ``partitionkey``, ``time``, ``data`` (compared in full);
  - ``[[batches.dead_letters]]``: ``type``, ``reason`` (a substring), optional
    ``subject`` and ``data`` (of the event held in the dead letter);
  - ``acks``: the ack tags to write, in order; ``suppressed``: optional count;
    ``unmet``: optional count of trigger edges whose rule condition did not hold.

TOML has no null: the string ``"@null"`` stands for JSON ``null``. Times are
compared as instants, so ``"10:00:00Z"`` and ``"10:00:00.000000Z"`` are equal.

Across a case, every event and dead letter id must be unique (different facts,
different ids), every event's lane must follow its type and its source must be
``plantgate/{site}/{agent}/{source}``.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.events import LANE_OF_TYPE, TYPE_PREFIX, CloudEvent, Reading, decode_event, encode_event
from agent.rules import RuleOutput, Rules
from agent.settings import Settings, parse_settings
from buffer import NO_SINK

CASES = Path(__file__).parent / "cases" / "rules"
NULL = "@null"


def _case_params() -> list[Any]:
    params = []
    for path in sorted(CASES.glob("*.toml")):
        case = tomllib.loads(path.read_text(encoding="utf-8"))
        marks = [pytest.mark.xfail(reason=case["xfail"], strict=True)] if "xfail" in case else []
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


def _time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.tzinfo is not None, f"case times must carry a zone: {text}"
    return value.astimezone(UTC)


def _looks_like_time(value: str) -> bool:
    return len(value) >= 20 and value[4] == "-" and value[7] == "-" and value[10] == "T"


def normalise(value: Any) -> Any:
    """JSON-ish values with times as aware datetimes and ``"@null"`` as None, for comparison."""
    if isinstance(value, dict):
        return {key: normalise(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalise(item) for item in value]
    if value == NULL:
        return None
    if isinstance(value, str) and _looks_like_time(value):
        return _time(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return value


def readings_of(batch: dict[str, Any]) -> list[Reading]:
    return [
        Reading(
            tag=item["tag"],
            value=normalise(item["value"]),
            time=_time(item["time"]) if isinstance(item["time"], str) else item["time"],
            quality=item.get("quality", "good"),
        )
        for item in batch["readings"]
    ]


def as_json(event: CloudEvent) -> dict[str, Any]:
    """The event exactly as a sink would send it."""
    return decode_event(encode_event(event))


def check_events(where: str, actual: list[CloudEvent], expected: list[dict[str, Any]]) -> None:
    got = [as_json(event) for event in actual]
    summary = [(event["type"], event.get("subject")) for event in got]
    assert len(got) == len(expected), f"{where}: expected {len(expected)} events, got {summary}"
    for index, (event, want) in enumerate(zip(got, expected, strict=True)):
        at = f"{where} event {index}"
        assert event["type"] == TYPE_PREFIX + want["type"], f"{at}: {summary}"
        for key in ("subject", "partitionkey", "time", "data"):
            if key in want:
                assert normalise(event.get(key)) == normalise(want[key]), f"{at}: {key}"


def check_dead_letters(where: str, output: RuleOutput, expected: list[dict[str, Any]]) -> None:
    got = output.dead_letters
    assert len(got) == len(expected), f"{where}: expected {len(expected)} dead letters, got {[d.reason for d in got]}"
    for index, (letter, want) in enumerate(zip(got, expected, strict=True)):
        at = f"{where} dead letter {index}"
        assert letter.sink == NO_SINK, at
        assert letter.type == TYPE_PREFIX + want["type"], at
        assert want["reason"] in letter.reason, f"{at}: reason {letter.reason!r}"
        held = decode_event(letter.body)
        assert held["id"] == letter.id, at
        assert held["type"] == letter.type, at
        assert letter.lane == LANE_OF_TYPE[want["type"]], at
        assert letter.subject == held.get("subject"), at
        if "subject" in want:
            assert letter.subject == want["subject"], at
        if "data" in want:
            assert normalise(held["data"]) == normalise(want["data"]), f"{at}: data"


def load_case(path: Path) -> tuple[dict[str, Any], Settings, str]:
    case = tomllib.loads(path.read_text(encoding="utf-8"))
    settings = parse_settings(case["config"], path=path)
    source = case["source"] if "source" in case else settings.sources.opcua[0].name
    return case, settings, source


@pytest.mark.parametrize("path", _case_params())
def test_rule_case(path: Path) -> None:
    case, settings, source = load_case(path)
    assert case["batches"], "a case needs batches"
    rules = Rules(settings)
    uri = f"plantgate/{settings.agent.site}/{settings.agent.id}/{source}"
    seen_ids: dict[str, str] = {}
    saved: dict[str, str] = {}
    for number, batch in enumerate(case["batches"], start=1):
        where = f"{path.name} batch {number}"
        if batch.get("restart"):
            rules = Rules(settings)
            for key in rules.state_keys():
                if key in saved:
                    assert rules.restore(key, saved[key]), f"{where}: state {key} refused"
            continue
        if "flush" in batch:
            output = rules.flush_due(_time(batch["flush"]), grace=batch.get("grace", 1.0))
        else:
            output = rules.process(source, readings_of(batch))
        saved.update(output.state)
        check_events(where, output.events, batch.get("events", []))
        check_dead_letters(where, output, batch.get("dead_letters", []))
        assert [ack.tag for ack in output.acks] == batch.get("acks", []), f"{where}: acks"
        made = {event.id for event in output.events} | {dead.id for dead in output.dead_letters}
        # An ack without an event is a cycle a rule's condition turned down (the line must go on).
        assert all(ack.event_id in made or (ack.event_id is None and output.unmet) for ack in output.acks), (
            f"{where}: an ack names its cycle's event"
        )
        if "unmet" in batch:
            assert output.unmet == batch["unmet"], f"{where}: unmet conditions"
        if "suppressed" in batch:
            assert output.suppressed == batch["suppressed"], f"{where}: suppressed"
        for event in output.events:
            name = event.type.removeprefix(TYPE_PREFIX)
            assert event.lane == LANE_OF_TYPE[name], where
            assert event.source == uri, where
            assert event.site == settings.agent.site, where
        for event_id in [event.id for event in output.events] + [letter.id for letter in output.dead_letters]:
            assert event_id not in seen_ids, f"{where}: id {event_id} also made in {seen_ids[event_id]}"
            seen_ids[event_id] = where


def test_the_case_folder_covers_the_rules() -> None:
    """A guard against a case folder that silently shrinks."""
    assert len(list(CASES.glob("*.toml"))) >= 12


# --- what a case file cannot say ----------------------------------------------------------------


def _all_outputs(path: Path) -> list[RuleOutput]:
    case, settings, source = load_case(path)
    rules = Rules(settings)
    outputs = []
    for batch in case["batches"]:
        if "flush" in batch:
            outputs.append(rules.flush_due(_time(batch["flush"]), grace=batch.get("grace", 1.0)))
        else:
            outputs.append(rules.process(source, readings_of(batch)))
    return outputs


@pytest.mark.parametrize(
    "name", ["transaction_rising_edge", "state_changes", "telemetry_samples_share_an_event", "item_mapping"]
)
def test_ids_are_stable_across_fresh_rules_instances(name: str) -> None:
    """An agent restarted with the same readings (an OPC UA reconnect replaying values) makes the same ids."""
    first = _all_outputs(CASES / f"{name}.toml")
    second = _all_outputs(CASES / f"{name}.toml")
    ids_first = [[e.id for e in o.events] + [d.id for d in o.dead_letters] for o in first]
    ids_second = [[e.id for e in o.events] + [d.id for d in o.dead_letters] for o in second]
    assert any(ids_first), "the case made no events"
    assert ids_first == ids_second
    bodies_first = [[as_json(e) for e in o.events] for o in first]
    bodies_second = [[as_json(e) for e in o.events] for o in second]
    assert bodies_first == bodies_second


RULE_CONFIG = """
[agent]
site = "plant-01"
id = "gw"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:4840"
  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=CycleDone"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.work_order"
  node = "ns=2;s=WorkOrder"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.batch_qty"
  node = "ns=2;s=BatchQty"
  kind = "value"

[[transactions]]
name = "press7-completion"
when = "press7.cycle_done"
type = "production.completed"
fields = { work_order = "press7.work_order", quantity = "press7.batch_qty" }
uom = "KGM"
"""


def _at(seconds: float) -> datetime:
    return datetime(2024, 5, 1, 10, 0, tzinfo=UTC) + timedelta(seconds=seconds)


def test_a_trigger_replayed_with_the_same_source_time_is_the_same_fact() -> None:
    """The same trigger source timestamp gives the same id in a fresh instance; a new cycle a new one."""
    settings = parse_settings(RULE_CONFIG)
    batch = [
        Reading("press7.work_order", 4711.0, _at(1)),
        Reading("press7.batch_qty", 12.5, _at(1)),
        Reading("press7.cycle_done", True, _at(2)),
    ]
    first = Rules(settings).process("press7", batch).events
    again = Rules(settings).process("press7", batch).events
    assert [e.type for e in first] == ["io.plantgate.production.completed"]
    assert [e.id for e in first] == [e.id for e in again]
    rules = Rules(settings)
    rules.process("press7", batch[:2])
    ids = []
    for cycle in range(3):
        start = 10 + cycle * 10
        rules.process("press7", [Reading("press7.cycle_done", False, _at(start))])
        [event] = rules.process("press7", [Reading("press7.cycle_done", True, _at(start + 1))]).events
        ids.append(event.id)
    assert len(set(ids)) == 3
    assert first[0].id not in ids


def test_two_cycles_a_second_apart_in_one_reading_time_differ() -> None:
    settings = parse_settings(RULE_CONFIG)
    rules = Rules(settings)
    base = [Reading("press7.work_order", "A", _at(0)), Reading("press7.batch_qty", 1, _at(0))]
    one = rules.process("press7", [*base, Reading("press7.cycle_done", True, _at(1.25))]).events
    rules.process("press7", [Reading("press7.cycle_done", False, _at(1.5))])
    two = rules.process("press7", [Reading("press7.cycle_done", True, _at(1.75))]).events
    assert len(one) == len(two) == 1
    assert one[0].id != two[0].id


def test_an_absurd_quantity_is_a_dead_letter_not_a_crash() -> None:
    """A PLC float register holding garbage (3.4e38) must give a dead letter or an event, never an exception."""
    settings = parse_settings(RULE_CONFIG)
    rules = Rules(settings)
    output = rules.process(
        "press7",
        [
            Reading("press7.work_order", "4711", _at(0)),
            Reading("press7.batch_qty", 3.4e38, _at(0)),
            Reading("press7.cycle_done", True, _at(1)),
        ],
    )
    assert len(output.events) + len(output.dead_letters) == 1


def test_a_null_in_a_template_is_a_dead_letter_not_the_text_none() -> None:
    settings = parse_settings(
        RULE_CONFIG.replace(
            'fields = { work_order = "press7.work_order", quantity = "press7.batch_qty" }',
            'fields = { batch = { template = "B-{press7.work_order}" }, quantity = "press7.batch_qty" }',
        )
    )
    rules = Rules(settings)
    output = rules.process(
        "press7",
        [
            Reading("press7.work_order", None, _at(0)),
            Reading("press7.batch_qty", 1, _at(0)),
            Reading("press7.cycle_done", True, _at(1)),
        ],
    )
    assert output.events == []
    [letter] = output.dead_letters
    assert letter.reason == "field batch: tag press7.work_order is null"
