"""Dead letters keep their context: the source, the rule and the raw values it read.

From the rules (a transaction rule's obsolete item, an MES event's), through the
buffer file (also one from before the context was kept) to what operators see:
``plantgate buffer dead-letters`` (table and ``--json``) and the admin endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.events import Reading, make_event
from agent.rules import Rules
from agent.settings import parse_settings
from buffer import NO_SINK, Buffer, BufferAdmin, DeadLetter, ReplayRequest, inspect_dead_letters

T0 = "2024-05-01T10:00:00+00:00"
T1 = "2024-05-01T10:00:10+00:00"

RULES = """
[agent]
site = "plant-01"
id = "gw"

[[sources.opcua]]
name = "filler2"
endpoint = "opc.tcp://127.0.0.1:4840"
  [[sources.opcua.tags]]
  tag = "filler2.done"
  node = "ns=2;s=Filler2.Done"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "filler2.item"
  node = "ns=2;s=Filler2.Item"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "filler2.qty"
  node = "ns=2;s=Filler2.Qty"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "filler2.order"
  node = "ns=2;s=Filler2.Order"
  kind = "value"

[[transactions]]
name = "filler2-consumption"
when = "filler2.done"
type = "io.plantgate.material.consumed"
fields = { item = "filler2.item", quantity = "filler2.qty", work_order = { template = "WO-{filler2.order}" } }
uom = "EA"

[mappings.items]
"P-100-OLD" = { obsolete = true }
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_a_rules_obsolete_item_keeps_source_rule_and_raw_values() -> None:
    rules = Rules(parse_settings(RULES))
    first = rules.process(
        "filler2",
        [
            Reading("filler2.done", False, at(T0)),
            Reading("filler2.item", "P-100-OLD", at(T0)),
            Reading("filler2.qty", 24, at(T0), "uncertain"),
            Reading("filler2.order", 4711, at(T0)),
        ],
    )
    assert first.dead_letters == []
    out = rules.process("filler2", [Reading("filler2.done", True, at(T1))])
    assert out.events == []
    [letter] = out.dead_letters
    assert letter.sink == NO_SINK and "obsolete" in letter.reason
    assert letter.context == {
        "source": "filler2",
        "rule": "filler2-consumption",
        "values": {
            "filler2.done": {"value": True, "time": T1, "quality": "good"},
            "filler2.item": {"value": "P-100-OLD", "time": T0, "quality": "good"},
            "filler2.qty": {"value": 24, "time": T0, "quality": "uncertain"},
            "filler2.order": {"value": 4711, "time": T0, "quality": "good"},
        },
    }


def test_a_field_without_a_value_shows_as_none_in_the_context() -> None:
    rules = Rules(parse_settings(RULES))
    rules.process("filler2", [Reading("filler2.done", False, at(T0)), Reading("filler2.item", "X", at(T0))])
    [letter] = rules.process("filler2", [Reading("filler2.done", True, at(T1))]).dead_letters
    assert "tag filler2.qty has no good value yet" in letter.reason
    assert letter.context is not None
    values = letter.context["values"]
    assert values["filler2.qty"] is None and values["filler2.order"] is None
    assert values["filler2.item"] == {"value": "X", "time": T0, "quality": "good"}


MES = """
[agent]
site = "plant-01"
id = "gw"

[mappings.items]
"OLD-1" = { obsolete = true }

[[transactions]]
name = "consume-on-start"
when_event = "workorder.started"
type = "material.consumed"
fields = { work_order = { event = "work_order" }, item = { event = "item" }, quantity = { event = "quantity" } }
"""


def test_an_mes_events_dead_letter_keeps_its_source_and_the_rules_its_trigger() -> None:
    rules = Rules(parse_settings(MES))
    started = make_event(
        "workorder.started",
        id="mes-1",
        source="https://mes.example/orders",
        time=at(T0),
        site="plant-01",
        subject="WO-1",
        data={"work_order": "WO-1", "item": "OLD-1", "quantity": {"value": "3", "uom": "EA"}},
    )
    out = rules.accept_events("mes", [started])
    assert out.events == []
    by_type = {letter.type: letter for letter in out.dead_letters}
    assert by_type["io.plantgate.workorder.started"].context == {"source": "mes"}
    assert by_type["io.plantgate.material.consumed"].context == {
        "source": "mes",
        "rule": "consume-on-start",
        "trigger": "mes-1",
        "values": {},
    }


def letter(n: int, context: dict[str, Any] | None) -> DeadLetter:
    body = json.dumps({"specversion": "1.0", "id": f"d-{n}", "type": "io.plantgate.material.consumed"}).encode()
    return DeadLetter(f"d-{n}", NO_SINK, "item: item code 'P' is obsolete", "io.plantgate.material.consumed",
                      f"WO-{n}", "transaction", 1.0, body, context)  # fmt: skip


CONTEXT = {"source": "filler2", "rule": "filler2-consumption", "values": {"filler2.item": {"value": "P"}}}


async def test_context_is_stored_listed_and_kept_when_a_replay_fails_again(tmp_path: Path) -> None:
    buffer = Buffer(tmp_path / "buffer.db")
    await buffer.open()
    try:
        await buffer.append([], [letter(1, CONTEXT), letter(2, None)])
        assert [d.context for d in await buffer.dead_letters()] == [CONTEXT, None]
        admin = BufferAdmin(buffer)
        status, listed = await admin.handle("GET", "/v1/buffer/dead-letters", {}, b"")
        assert status == 200 and listed[0]["context"] == CONTEXT and "context" not in listed[1]
        result = await admin.replay(ReplayRequest(all=True), remap=lambda event: "item: still obsolete")
        assert (result.replayed, result.failed) == (0, 2)
        again = await buffer.dead_letters()
        assert [d.reason for d in again] == ["item: still obsolete"] * 2
        assert [d.context for d in again] == [CONTEXT, None]
    finally:
        await buffer.close()


async def test_a_buffer_file_from_before_the_context_opens_with_empty_context(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path)
    await buffer.open()
    await buffer.append([], [letter(1, CONTEXT)])
    await buffer.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("ALTER TABLE dead_letters DROP COLUMN context")  # as the table was made before
        db.commit()
        assert "context" not in {row[1] for row in db.execute("PRAGMA table_info(dead_letters)")}

    # Read-only (the CLI on a file it must not change): listed, with no context.
    [old] = await inspect_dead_letters(path)
    assert old.id == "d-1" and old.context is None

    buffer = Buffer(path)
    await buffer.open()  # read-write: the column is added, the old row stays without context
    try:
        await buffer.append([], [letter(2, CONTEXT)])
        assert [(d.id, d.context) for d in await buffer.dead_letters()] == [("d-1", None), ("d-2", CONTEXT)]
    finally:
        await buffer.close()


CONFIG = """\
[agent]
site = "plant-01"
id = "gw"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{port}"

[[sinks.jsonl]]
name = "cloud"
lanes = ["transaction", "operational", "telemetry"]
"""


def unused_port() -> int:
    """A loopback port nothing listens on: the CLI finds no running agent and opens the file."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_cli_lists_the_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buffer = Buffer(tmp_path / "buffer.db")
    await buffer.open()
    await buffer.append([], [letter(1, CONTEXT), letter(2, None)])
    await buffer.close()
    config = tmp_path / "plantgate.toml"
    config.write_text(CONFIG.format(data_dir=tmp_path, port=unused_port()), encoding="utf-8")

    def run(*args: str) -> tuple[int, str]:
        code = main(["buffer", "dead-letters", *args, "-c", str(config)])
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(run, "--json")
    listed = json.loads(out)
    assert code == 0 and [d["id"] for d in listed] == ["d-1", "d-2"]
    assert listed[0]["context"] == CONTEXT and "context" not in listed[1]
    assert {"id", "type", "subject", "sink", "reason", "time"} <= set(listed[1])

    code, out = await asyncio.to_thread(run)
    table = out.splitlines()
    assert code == 0 and table[0].split() == ["ID", "TYPE", "SUBJECT", "SINK", "SOURCE", "RULE", "AGE", "REASON"]
    assert table[1].split()[:6] == ["d-1", "material.consumed", "WO-1", "-", "filler2", "filler2-consumption"]
    assert table[2].split()[:6] == ["d-2", "material.consumed", "WO-2", "-", "-", "-"]
    assert table[-1] == "2 dead letter(s)"
