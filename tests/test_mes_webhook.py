"""The MES webhook on a running agent: POST /v1/events and /v1/mes/<mapping> over real sockets.

The agent runs in process with its real HTTP server on a free loopback port, the
MES source built from the TOML config, and a JSON Lines sink; what the buffer
committed is read from the SQLite file with another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.pipeline import Agent
from agent.settings import parse_settings
from tests.peers.mosquitto import free_port
from tests.peers.waiting import wait_for

TOKEN = "mes-ingest-token"
EVENT = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

CONFIG = """
[agent]
site = "plant-mes"
id = "gw-mes"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"
ingest_token_file = "ingest-token"
max_body_bytes = 65536

[mappings.items]
"P-100-OLD" = {{ obsolete = true }}
"FILL-500" = "40012345000017"

[mappings.uom]
"pcs" = "EA"

[[sources.mes]]
name = "mes"
mode = "webhook"

  [sources.mes.mappings.confirmations]
  type = "production.completed"
  items = "$.confirmations"
  id = "$.confirmationId"
  time = "$.postedAt"
  correlationid = "$.confirmationId"
  fields = {{ work_order = "$.order", item = "$.material", quantity = "$.qty", lot = "$.batch" }}
  optional = ["lot"]
  uom = "$.unit"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"

[[sinks.mqtt]]
name = "held"
url = "mqtt://127.0.0.1:{closed_port}"
"""


def ce(event_id: str, **overrides: Any) -> dict[str, Any]:
    """A valid MES CloudEvent (material consumed for WO-4711)."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": "mes://plant/erp-bridge",
        "type": "io.plantgate.material.consumed",
        "time": "2026-12-04T08:00:00Z",
        "subject": "WO-4711",
        "data": {"work_order": "WO-4711", "item": "FILL-500", "quantity": {"value": "2.5", "uom": "pcs"}},
    }
    event.update(overrides)
    return event


def stored_ids(path: Path) -> list[str]:
    """Ids of the events committed in the buffer file, as another process reads them.

    The ``held`` sink never connects, so nothing committed is deleted after delivery.
    """
    from buffer.store import unpack_segment

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        ids: list[str] = []
        for lane in ("transaction", "operational", "telemetry"):
            for (blob,) in db.execute(f"SELECT events FROM lane_{lane} ORDER BY first_seq"):
                ids.extend(event.id for event in unpack_segment(blob))
        return ids


def dead_letter_ids(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT id FROM dead_letters ORDER BY n")]


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextlib.asynccontextmanager
async def running_agent(data_dir: Path, config: str = CONFIG) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    (data_dir / "ingest-token").write_text(TOKEN + "\n", encoding="utf-8")
    agent = Agent(parse_settings(config.format(data_dir=data_dir, closed_port=free_port())))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        assert agent.http is not None
        async with httpx.AsyncClient(base_url=agent.http.url, timeout=10, headers=AUTH) as client:
            yield agent, client
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def post(client: httpx.AsyncClient, body: Any, content_type: str = BATCH, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post("/v1/events", content=content, headers={"Content-Type": content_type}, **kwargs)


async def test_202_only_after_the_commit_and_the_event_keeps_its_identity(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (agent, client):
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        one = ce("mes-1", correlationid="corr-1", traceparent=traceparent)
        response = await post(client, one, EVENT)
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": 1}
        # Answered only after the commit: another connection already reads it from the file.
        assert "mes-1" in stored_ids(tmp_path / "buffer.db")
        batch = [ce(f"mes-b{n}", data={"work_order": 4711, "item": "X-1", "quantity": {"value": "1", "uom": "EA"}})
                 for n in range(3)]  # fmt: skip
        response = await post(client, batch)
        assert response.status_code == 202, response.text
        assert {"mes-b0", "mes-b1", "mes-b2"} <= set(stored_ids(tmp_path / "buffer.db"))
        out = tmp_path / "events.jsonl"
        await wait_for(lambda: {"mes-1", "mes-b2"} <= {e["id"] for e in lines(out)}, message="delivered")
        assert agent.sources[0].status.state == "connected"
    events = {e["id"]: e for e in lines(tmp_path / "events.jsonl")}
    first = events["mes-1"]
    assert first["source"] == "plantgate/plant-mes/gw-mes/mes"
    assert first["originsource"] == "mes://plant/erp-bridge"
    assert first["type"] == "io.plantgate.material.consumed"
    assert first["time"] in ("2026-12-04T08:00:00Z", "2026-12-04T08:00:00+00:00")
    assert first["correlationid"] == "corr-1"
    assert first["traceparent"] == traceparent
    assert first["lane"] == "transaction"
    quantity = {"value": "2.5", "uom": "EA"}
    assert first["data"] == {"work_order": "WO-4711", "item": "40012345000017", "quantity": quantity}
    assert events["mes-b0"]["data"]["work_order"] == "4711"  # identifiers are strings
    assert events["mes-b0"]["subject"] == "WO-4711"


async def test_an_id_already_accepted_is_acknowledged_again_and_stored_once(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (agent, client):
        assert (await post(client, ce("dup-1"), EVENT)).status_code == 202
        again = await post(client, [ce("dup-1"), ce("dup-2")])
        assert again.status_code == 202
        assert (await post(client, ce("dup-2"), EVENT)).status_code == 202
        ids = stored_ids(tmp_path / "buffer.db")
        assert ids.count("dup-1") == 1 and ids.count("dup-2") == 1
        assert agent.buffer.duplicates_suppressed == 2


@pytest.mark.parametrize(
    ("body", "index", "field"),
    [
        ([ce("ok-0"), ce("bad-1", time="yesterday")], 1, "time"),
        ([ce("ok-0"), ce("ok-1"), ce("bad-2", type="io.plantgate.coffee.brewed")], 2, "type"),
        ([ce("ok-0"), {k: v for k, v in ce("bad-1").items() if k != "source"}], 1, "source"),
        ([ce("bad-0", id="")], 0, "id"),
        ([ce("bad-0", specversion="0.3")], 0, "specversion"),
        ([ce("ok-0"), ce("bad-1", time="2026-12-04T08:00:00")], 1, "time"),
        ([ce("ok-0"), ce("bad-1", data={"work_order": "W", "quantity": 2.5})], 1, "data.quantity"),
        ([ce("ok-0"), ce("bad-1", data=[1, 2])], 1, "data"),
        ([ce("ok-0"), ce("bad-1", subject=17)], 1, "subject"),
        (
            [ce("ok-0"), ce("bad-1", type="io.plantgate.machine.state.changed", data={"tag": "t"})],
            1,
            "data.state",
        ),
    ],
)
async def test_400_names_the_element_and_field_and_stores_nothing(
    tmp_path: Path, body: list[dict[str, Any]], index: int, field: str
) -> None:
    async with running_agent(tmp_path) as (_, client):
        response = await post(client, body)
        assert response.status_code == 400, response.text
        errors = response.json()["errors"]
        assert {"index": index, "field": field} == {k: errors[0][k] for k in ("index", "field")}, errors
        assert errors[0]["message"]
        # The valid elements before it are not stored either: nothing of a 400.
        assert not [i for i in stored_ids(tmp_path / "buffer.db") if i.startswith(("ok-", "bad-"))]


async def test_whole_request_errors(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (_, client):
        empty = await post(client, [])
        assert empty.status_code == 400 and "empty batch" in empty.json()["error"]
        as_single = await post(client, [ce("x")], EVENT)
        assert as_single.status_code == 400 and "batch" in as_single.json()["error"]
        single_as_batch = await post(client, ce("x"), BATCH)
        assert single_as_batch.status_code == 400
        deep = {"specversion": "1.0", "id": "deep", "source": "s", "type": "io.plantgate.material.consumed",
                "time": "2026-12-04T08:00:00Z", "data": {}, "ext": json.loads("[" * 40 + "]" * 40)}  # fmt: skip
        nested = await post(client, deep, EVENT)
        assert nested.status_code == 400 and "deeper than 32" in nested.json()["error"]
        within = dict(deep, id="within", ext=json.loads("[" * 30 + "]" * 30))
        assert (await post(client, within, EVENT)).status_code == 202
        broken = await post(client, b'[{"specversion": "1.0", "id": ', BATCH)
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
        assert "deep" not in stored_ids(tmp_path / "buffer.db")


async def test_token_content_type_and_size(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (_, client):
        body = json.dumps(ce("auth-1")).encode()
        missing = await client.post("/v1/events", content=body, headers={"Content-Type": EVENT, "Authorization": ""})
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await client.post(
            "/v1/events", content=body, headers={"Content-Type": EVENT, "Authorization": "Bearer not-the-token"}
        )
        assert wrong.status_code == 401 and "invalid_token" in wrong.headers["WWW-Authenticate"]
        for content_type in ("application/json", "text/plain", f"{EVENT}; charset=latin-1"):
            response = await client.post("/v1/events", content=body, headers={"Content-Type": content_type})
            assert response.status_code == 415, content_type
        no_type = await client.post("/v1/events", content=body, headers={"Content-Type": ""})
        assert no_type.status_code == 415
        huge = [ce(f"huge-{n}") for n in range(400)]  # well over max_body_bytes = 64 KiB
        too_large = await post(client, huge)
        assert too_large.status_code == 413
        ok = await client.post("/v1/events", content=body, headers={"Content-Type": f"{EVENT}; charset=utf-8"})
        assert ok.status_code == 202
        ids = stored_ids(tmp_path / "buffer.db")
        assert "auth-1" in ids and not any(i.startswith("huge-") for i in ids)


async def test_503_with_retry_after_while_the_buffer_refuses_writes(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (agent, client):
        assert (await post(client, ce("before"), EVENT)).status_code == 202
        path = tmp_path / "buffer.db"
        pages = int(sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("PRAGMA page_count").fetchone()[0])
        await agent.buffer.set_max_page_count(pages)  # a genuinely full file: SQLITE_FULL on the next commit
        # Incompressible (segments are compressed): 20 x 2 kB does not fit in the file as it is.
        filler = [ce(f"fill-{n}", data={"work_order": "W", "note": secrets.token_hex(1000)}) for n in range(20)]
        first = asyncio.create_task(post(client, filler))

        await wait_for(lambda: agent.buffer.refusing_writes is not None, message="the buffer refuses writes")
        refused = await post(client, ce("during"), EVENT)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert "refuses writes" in refused.json()["detail"]
        await agent.buffer.set_max_page_count(1 << 30)  # room again
        await wait_for(lambda: agent.buffer.refusing_writes is None, message="writes accepted again")
        answered = await asyncio.wait_for(first, 20)
        assert answered.status_code in (202, 503)  # within or beyond its commit_timeout
        retried = await post(client, filler)  # the caller's retry: acknowledged, stored once
        assert retried.status_code == 202
        assert (await post(client, ce("during"), EVENT)).status_code == 202
        ids = stored_ids(path)
        assert all(ids.count(f"fill-{n}") == 1 for n in range(20))
        assert "during" in ids


async def test_obsolete_item_is_a_dead_letter_and_acknowledged(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (_, client):
        response = await post(
            client,
            ce("old-1", data={"work_order": "W", "item": "P-100-OLD", "quantity": {"value": "1", "uom": "EA"}}),
            EVENT,
        )
        assert response.status_code == 202
        assert dead_letter_ids(tmp_path / "buffer.db") == ["old-1"]


async def test_native_mapping_route(tmp_path: Path) -> None:
    native = {
        "plant": "P01",
        "confirmations": [
            {"confirmationId": "C-1001", "postedAt": "2026-12-04T09:15:00+01:00", "order": 4711,
             "material": "FILL-500", "qty": 120, "unit": "pcs", "batch": "L-77"},
            {"confirmationId": "C-1002", "postedAt": "2026-12-04T09:20:00", "order": "4712",
             "material": "FILL-500", "qty": "12.50", "unit": "pcs"},
        ],
    }  # fmt: skip
    async with running_agent(tmp_path) as (_, client):
        headers = {"Content-Type": "application/json"}
        response = await client.post("/v1/mes/confirmations", content=json.dumps(native), headers=headers)
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": 2}
        again = await client.post("/v1/mes/confirmations", content=json.dumps(native), headers=headers)
        assert again.status_code == 202  # the MES's retry: same ids, stored once
        assert len(stored_ids(tmp_path / "buffer.db")) == 3  # agent.started and the two confirmations

        bad = {"confirmations": [native["confirmations"][0], {"confirmationId": "C-1003", "postedAt": "x"}]}
        rejected = await client.post("/v1/mes/confirmations", content=json.dumps(bad), headers=headers)
        assert rejected.status_code == 400
        assert rejected.json()["errors"][0]["index"] == 1
        assert rejected.json()["errors"][0]["field"] == "$.order"
        unknown = await client.post("/v1/mes/nothing", content=b"{}", headers=headers)
        assert unknown.status_code == 404
        wrong_type = await client.post("/v1/mes/confirmations", content=b"{}", headers={"Content-Type": EVENT})
        assert wrong_type.status_code == 415
        no_list = await client.post("/v1/mes/confirmations", content=b'{"confirmations": 3}', headers=headers)
        assert no_list.status_code == 400 and no_list.json()["errors"][0]["field"] == "$.confirmations"
        out = tmp_path / "events.jsonl"
        await wait_for(lambda: len([e for e in lines(out) if e["type"].endswith("production.completed")]) == 2)
    events = sorted((e for e in lines(tmp_path / "events.jsonl") if "production" in e["type"]), key=lambda e: e["time"])
    first, second = events
    assert first["time"] in ("2026-12-04T08:15:00Z", "2026-12-04T08:15:00+00:00")  # converted to UTC
    assert first["data"] == {"work_order": "4711", "item": "40012345000017", "quantity": {"value": "120", "uom": "EA"},
                             "lot": "L-77"}  # fmt: skip
    assert first["subject"] == "4711" and first["correlationid"] == "C-1001"
    assert first["source"] == "plantgate/plant-mes/gw-mes/mes"
    assert second["data"]["quantity"] == {"value": "12.5", "uom": "EA"} and "lot" not in second["data"]
    assert first["id"] != second["id"]
