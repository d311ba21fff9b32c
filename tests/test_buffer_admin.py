"""Operator actions on the buffer: stats, dead letters, replay, purge.

Through ``BufferAdmin`` on an open buffer (what the running agent serves over
HTTP), and through ``plantgate buffer ...`` on a stopped agent's file (opened
under its lock) and on a running one's (asked over real HTTP on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent.cli import main
from agent.events import LANES, CloudEvent, decode_event, encode_event, make_event
from agent.http_server import HttpServer, json_response
from agent.rules import map_event
from agent.settings import ItemMapping, MappingsSection
from agent.sink import ACKED, Rejected
from buffer import NO_SINK, Buffer, BufferAdmin, DeadLetter, PurgeRequest, ReplayRequest
from tests.buffered import take_all

_counter = 0


def event(lane: str = "transaction", *, item: str = "FILL-500", id: str | None = None) -> CloudEvent:
    global _counter
    _counter += 1
    name = "production.completed" if lane == "transaction" else "machine.state.changed"
    return make_event(
        name,
        id=id or f"fact-{_counter}",
        source="plantgate/plant-01/gw/press7",
        time=datetime(2024, 5, 1, tzinfo=UTC),
        site="plant-01",
        subject=f"WO-{_counter}",
        data={"work_order": f"WO-{_counter}", "item": item, "quantity": {"value": "2", "uom": "pcs"}},
    )


def early_dead_letter(made: CloudEvent, reason: str) -> DeadLetter:
    """A dead letter made before any sink (mapping): the event as made, never sequenced."""
    return DeadLetter(
        id=made.id, sink=NO_SINK, reason=reason, type=made.type, subject=made.subject, lane=made.lane,
        time=1.0, body=encode_event(made),
    )  # fmt: skip


def stored(path: Path) -> int:
    """Events still stored in the transaction lane, as another connection sees them."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT coalesce(sum(count), 0) FROM lane_transaction").fetchone()[0])


SINKS = {"cloud": list(LANES), "erp": ["transaction"]}


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    buffer = Buffer(tmp_path / "buffer.db", sinks=SINKS)
    await buffer.open()
    yield buffer
    await buffer.close()


async def test_replay_sends_a_dead_letter_again_under_its_id_to_every_sink_of_its_lane(buffer: Buffer) -> None:
    cloud, erp = buffer.cursor("cloud", LANES), buffer.cursor("erp", ["transaction"])
    made = [event(), event()]
    await buffer.append(made)
    assert len(await take_all(buffer, cloud)) == 2
    batch = await erp.next_batch(10, wait=False)
    erp.settle(batch, [Rejected("422: unknown work order"), ACKED])
    await buffer.commit_now()
    admin = BufferAdmin(buffer, sinks=SINKS)
    assert [(d.id, d.sink, d.reason) for d in await admin.dead_letters()] == [
        (made[0].id, "erp", "422: unknown work order")
    ]
    assert (await admin.stats()).dead_letters == 1

    result = await admin.replay(ReplayRequest(sink="erp"))
    assert (result.replayed, result.failed) == (1, 0)
    assert await admin.dead_letters() == []
    assert buffer.dead_letter_count == 0
    # Both sinks of the lane get it (cloud a second time: same id, the cloud dedupes), with a fresh sequence.
    again_erp, again_cloud = await take_all(buffer, erp), await take_all(buffer, cloud)
    assert [item.id for item in again_erp] == [item.id for item in again_cloud] == [made[0].id]
    replayed = decode_event(again_erp[0].body)
    assert replayed["id"] == made[0].id
    assert int(replayed["sequence"]) == again_erp[0].seq > max(int(e.sequence or 0) for e in made)
    original = decode_event(encode_event(made[0]))
    assert {k: v for k, v in replayed.items() if k != "sequence"} == {
        k: v for k, v in original.items() if k != "sequence"
    }
    # The recent-ids dedupe still works for the sources afterwards.
    await buffer.append([event(id=made[0].id)])
    assert buffer.duplicates_suppressed == 1


async def test_a_replay_that_fails_again_stays_a_dead_letter_with_the_new_reason(tmp_path: Path) -> None:
    buffer = Buffer(tmp_path / "buffer.db", sinks=SINKS)
    await buffer.open()
    try:
        cloud = buffer.cursor("cloud", LANES)
        obsolete, unknown = event(item="P-100-OLD"), event(item="FILL-500")
        await buffer.append(
            [], [early_dead_letter(obsolete, "item: obsolete"), early_dead_letter(unknown, "item: unknown")]
        )
        mappings = MappingsSection(
            items={"P-100-OLD": ItemMapping(obsolete=True), "FILL-500": "40012345000017"}, uom={"pcs": "EA"}
        )
        admin = BufferAdmin(buffer, sinks=SINKS, remap=lambda e: map_event(mappings, e))
        result = await admin.replay(ReplayRequest(all=True))
        assert (result.replayed, result.failed) == (1, 1)
        [left] = await admin.dead_letters()
        assert (left.id, left.sink, left.reason) == (obsolete.id, NO_SINK, "item: item code 'P-100-OLD' is obsolete")
        [sent] = await take_all(buffer, cloud)
        body = decode_event(sent.body)
        assert (sent.id, body["data"]["item"], body["data"]["quantity"]) == (
            unknown.id,
            "40012345000017",
            {"value": "2", "uom": "EA"},
        )
        # A remap may also say why, and a body that is no valid event fails with the field named.
        assert await admin.replay(ReplayRequest(ids=[obsolete.id]), remap=lambda e: "still obsolete") == type(result)(
            replayed=0, failed=1
        )
        assert (await admin.dead_letters())[0].reason == "still obsolete"
        await admin.replay(ReplayRequest(reason="still"), remap=lambda e: {k: v for k, v in e.items() if k != "source"})
        assert "source" in (await admin.dead_letters())[0].reason
    finally:
        await buffer.close()


def test_mapping_twice_is_harmless() -> None:
    mappings = MappingsSection(items={"FILL-500": "400"}, uom={"pcs": "EA"}, unknown_items="dead-letter")
    once = map_event(mappings, decode_event(encode_event(event())))
    assert map_event(mappings, once) == once
    with pytest.raises(ValueError, match="not in"):
        map_event(mappings, decode_event(encode_event(event(item="X"))))


async def test_purge_drops_an_orphaned_backlog_and_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path)
    await buffer.open()
    buffer.cursor("old", ["transaction"])
    await buffer.append([event() for _ in range(4)], [early_dead_letter(event(), "r")])
    await buffer.close()
    buffer = Buffer(path, sinks={"cloud": LANES})
    await buffer.open()
    try:
        admin = BufferAdmin(buffer, sinks={"cloud": LANES})
        assert (await admin.stats()).orphaned == {"old": 4}
        removed = await admin.purge(PurgeRequest(sink="old"))
        assert (removed.sink, removed.events, removed.lanes) == ("old", 4, {"transaction": 4})
        assert (await admin.stats()).orphaned == {}
        assert stored(path) == 0  # nobody else took the lane: the rows went with the backlog
        assert (await admin.purge(PurgeRequest(dead_letters=True))).dead_letters == 1
        assert (await admin.stats()).dead_letters == 0
        with pytest.raises(ValueError):
            await admin.purge(PurgeRequest())
    finally:
        await buffer.close()


async def test_handle_answers_the_four_endpoints(buffer: Buffer) -> None:
    buffer.cursor("cloud", LANES)
    await buffer.append([], [early_dead_letter(event(), "r")])
    admin = BufferAdmin(buffer, sinks=SINKS)
    status, stats = await admin.handle("GET", "/v1/buffer/stats", {}, b"")
    assert status == 200 and set(stats) == {"sinks", "dead_letters", "orphaned", "size_bytes"}
    status, letters = await admin.handle("GET", "/v1/buffer/dead-letters", {"sink": "-"}, b"")
    assert status == 200 and [set(d) for d in letters] == [{"id", "type", "subject", "sink", "reason", "time"}]
    assert await admin.handle("POST", "/v1/buffer/replay", {}, b'{"sink": "-"}') == (
        200,
        {"replayed": 1, "failed": 0},
    )
    assert (await admin.handle("POST", "/v1/buffer/replay", {}, b"{}"))[0] == 400
    assert (await admin.handle("POST", "/v1/buffer/replay", {}, b'{"everything": true}'))[0] == 400
    assert await admin.handle("POST", "/v1/buffer/purge", {}, b'{"dead_letters": true}') == (
        200,
        {"sink": None, "events": 0, "lanes": {}, "dead_letters": 0},
    )
    assert (await admin.handle("GET", "/v1/buffer/replay", {}, b""))[0] == 405
    assert (await admin.handle("GET", "/v1/buffer/nothing", {}, b""))[0] == 404


# --- the command line ------------------------------------------------------------------------------

CONFIG = """\
[agent]
site = "plant-01"
id = "gw"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{port}"
ingest_token_file = "{token_file}"

[mappings.items]
"FILL-500" = "40012345000017"

[[sinks.jsonl]]
name = "cloud"
lanes = ["transaction", "operational", "telemetry"]
"""


def write_config(directory: Path, port: int = 9) -> Path:
    token = directory / "token"
    token.write_text("t0ken\n")
    path = directory / "plantgate.toml"
    path.write_text(CONFIG.format(data_dir=directory, port=port, token_file=token))
    return path


async def seeded(directory: Path) -> list[CloudEvent]:
    """The config's buffer, stopped: a backlog of an old sink, two dead letters before any sink."""
    buffer = Buffer(directory / "buffer.db")
    await buffer.open()
    buffer.cursor("old", ["transaction"])  # "cloud" has no cursor yet: the agent never ran with it
    made = [event(), event(item="FILL-500")]
    await buffer.append([event(), event()], [early_dead_letter(e, "item: unknown") for e in made])
    await buffer.close()
    return made


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_on_a_stopped_agents_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = await seeded(tmp_path)
    config = str(write_config(tmp_path))

    def run(*args: str) -> tuple[int, str, str]:
        return cli(capsys, "buffer", *args, "-c", config)

    code, out, _ = await asyncio.to_thread(run, "stats", "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["orphaned"] == {"old": 2} and stats["dead_letters"] == 2 and set(stats["sinks"]) == {"cloud"}
    code, out, _ = await asyncio.to_thread(run, "dead-letters", "--json")
    assert [d["id"] for d in json.loads(out)] == [e.id for e in made]

    # For people: tables with a header, full ids, the orphaned backlog and how to purge it.
    code, out, _ = await asyncio.to_thread(run, "stats")
    table = out.splitlines()
    assert code == 0 and "2 dead letter(s)" in table[0]
    assert table[2].split() == ["SINK", "LANE", "DEPTH", "OLDEST"]
    assert any(row.split()[:3] == ["old", "orphaned", "2"] and "buffer purge --sink old" in row for row in table)
    code, out, _ = await asyncio.to_thread(run, "dead-letters")
    table = out.splitlines()
    assert table[0].split() == ["ID", "TYPE", "SUBJECT", "SINK", "AGE", "REASON"]
    assert [row.split()[0] for row in table[1:-1]] == [e.id for e in made]
    assert table[-1] == "2 dead letter(s)"

    code, out, _ = await asyncio.to_thread(run, "replay", "--id", made[1].id)
    assert (code, out) == (0, "replayed 1, failed 0\n")
    code, out, _ = await asyncio.to_thread(run, "replay", "--all", "--json")
    assert (code, json.loads(out)) == (0, {"replayed": 1, "failed": 0})

    # The question is answered on the real stdin of the installed command.
    plantgate = Path(sys.executable).parent / "plantgate"
    asked = await asyncio.to_thread(
        subprocess.run,
        [str(plantgate), "buffer", "purge", "--sink", "old", "-c", config],
        input="n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert asked.returncode == 1
    assert "the backlog of sink old (2 orphaned event(s))" in asked.stderr and "not confirmed" in asked.stderr
    code, out, _ = await asyncio.to_thread(run, "purge", "--sink", "old", "--yes")
    assert (code, out) == (0, "removed the backlog of sink old: 2 event(s) (transaction 2)\n")
    code, out, _ = await asyncio.to_thread(run, "stats", "--json")
    assert json.loads(out)["orphaned"] == {}

    buffer = Buffer(tmp_path / "buffer.db")
    await buffer.open()
    try:
        taken = await take_all(buffer, buffer.cursor("cloud", LANES))
    finally:
        await buffer.close()
    replayed = [decode_event(item.body) for item in taken if item.id in {e.id for e in made}]
    assert [(e["id"], e["data"]["item"]) for e in replayed] == [
        (made[1].id, "40012345000017"),
        (made[0].id, "40012345000017"),
    ]
    code, _, err = await asyncio.to_thread(cli, capsys, "buffer", "purge", "-c", config)
    assert code == 2 and "--sink NAME or --dead-letters" in err


async def _serve(admin: BufferAdmin, token: str) -> HttpServer:
    """The agent's side, as its HTTP server wires it: bearer token, then ``BufferAdmin.handle``."""

    async def endpoint(request: Request) -> Response:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return json_response({"error": "unauthorized"}, status=401)
        body = await request.body()
        status, answer = await admin.handle(request.method, request.url.path, request.query_params, body)
        return json_response(answer, status=status)

    route = Route("/v1/buffer/{action}", endpoint, methods=["GET", "POST"])
    server = HttpServer("127.0.0.1:0", view=None, routes=[route])  # type: ignore[arg-type]  # built-ins unused
    await server.start()
    return server


async def test_cli_on_a_running_agent_goes_through_its_http_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = await seeded(tmp_path)
    buffer = Buffer(tmp_path / "buffer.db", sinks={"cloud": LANES})
    await buffer.open()  # the running agent holds the lock
    cloud = buffer.cursor("cloud", LANES)  # made at its start
    runner = await _serve(BufferAdmin(buffer, sinks={"cloud": LANES}), "t0ken")
    try:
        port = runner.port
        config = str(write_config(tmp_path, port))

        def run(*args: str) -> tuple[int, str, str]:
            return cli(capsys, "buffer", *args, "-c", config)

        code, out, _ = await asyncio.to_thread(run, "stats", "--json")
        assert json.loads(out)["orphaned"] == {"old": 2}
        code, out, _ = await asyncio.to_thread(run, "dead-letters", "--json", "--sink", "-")
        assert len(json.loads(out)) == 2
        code, out, _ = await asyncio.to_thread(run, "replay", "--reason", "unknown", "--json")
        assert (code, json.loads(out)) == (0, {"replayed": 2, "failed": 0})
        assert {item.id for item in await take_all(buffer, cloud)} == {e.id for e in made}
        code, out, _ = await asyncio.to_thread(run, "purge", "--sink", "old", "--yes", "--json")
        assert json.loads(out) == {"sink": "old", "events": 2, "lanes": {"transaction": 2}, "dead_letters": 0}
    finally:
        await runner.stop()
    try:
        # The agent's HTTP API is away: reading falls back to the file, changing it is refused.
        code, out, _ = await asyncio.to_thread(cli, capsys, "buffer", "stats", "--json", "-c", config)
        assert code == 0 and json.loads(out)["orphaned"] == {}
        code, _, err = await asyncio.to_thread(cli, capsys, "buffer", "replay", "--all", "-c", config)
        assert code == 1
        assert err.startswith(f"plantgate: agent is running: {tmp_path / 'buffer.db'} is in use by process")
        assert "\n" not in err.strip()
    finally:
        await buffer.close()
