"""The console served by a running agent: the page, its JSON, its headers and who may change the buffer.

The agent runs in process with its real HTTP server on a free loopback port, a real
OPC UA press (the simulator) and the MES webhook as sources and a JSON Lines sink;
every request goes over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import html5lib
import httpx
import pytest
from asyncua import ua
from starlette.exceptions import HTTPException
from starlette.requests import Request

from agent.buffer_api import OperatorAccess
from agent.pipeline import Agent
from agent.settings import parse_settings
from agent.simulator import PressSimulator
from tests.peers.waiting import wait_for

INGEST = "ingest-secret-4711"
ADMIN = "admin-secret-0815"

CONFIG = """
[agent]
site = "plant-console"
id = "gw-console"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"
{tokens}

[[sources.opcua]]
name = "press7"
endpoint = "{endpoint}"
publishing_interval = "50ms"
reconnect_max_backoff = "1s"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  kind = "telemetry"

  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=Press7.CycleDone"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.cycle_ack"
  node = "ns=2;s=Press7.CycleAck"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.work_order"
  node = "ns=2;s=Press7.WorkOrder"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.item"
  node = "ns=2;s=Press7.Item"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.batch_qty"
  node = "ns=2;s=Press7.BatchQty"
  kind = "value"

{mes}
[[transactions]]
name = "press7-completion"
when = "press7.cycle_done"
type = "production.completed"
fields = {{ work_order = "press7.work_order", item = "press7.item", quantity = "press7.batch_qty" }}
uom = "EA"
ack = "press7.cycle_ack"

[mappings.items]
"P-100-OLD" = {{ obsolete = true }}

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""

MES = """
[[sources.mes]]
name = "mes"
mode = "webhook"
"""

TOKEN_LINES = {
    "none": "",
    "ingest": 'ingest_token_file = "ingest-token"',
    "admin": 'ingest_token_file = "ingest-token"\nadmin_token_file = "admin-token"',
}


def mes_event(event_id: str, item: str, work_order: str = "WO-4711") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "mes://plant/erp-bridge",
        "type": "io.plantgate.material.consumed",
        "time": "2026-12-04T08:00:00Z",
        "subject": work_order,
        "data": {"work_order": work_order, "item": item, "quantity": {"value": "2.5", "uom": "EA"}},
    }


class Running:
    """The started agent and an HTTP client on its address."""

    def __init__(self, agent: Agent, client: httpx.AsyncClient):
        self.agent = agent
        self.client = client

    async def post_event(self, body: dict[str, Any]) -> httpx.Response:
        headers = {"Content-Type": "application/cloudevents+json", "Authorization": f"Bearer {INGEST}"}
        return await self.client.post("/v1/events", content=json.dumps(body).encode(), headers=headers)

    async def get_json(self, path: str, **params: str) -> Any:
        response = await self.client.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, press: PressSimulator, tokens: str = "none") -> AsyncIterator[Running]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "ingest-token").write_text(INGEST + "\n", encoding="utf-8")
    (data_dir / "admin-token").write_text(ADMIN + "\n", encoding="utf-8")
    settings = parse_settings(
        CONFIG.format(
            data_dir=data_dir, endpoint=press.endpoint, tokens=TOKEN_LINES[tokens], mes=MES if tokens != "none" else ""
        )
    )
    agent = Agent(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        await wait_for(lambda: agent.sources[0].status.state == "connected", timeout=15, message="OPC UA connected")
        await wait_for(lambda: agent.state == "running", message="the agent runs")
        assert agent.http is not None
        async with httpx.AsyncClient(base_url=agent.http.url, timeout=10) as client:
            # The console is opened before anything flows: it keeps what is accepted from then on.
            assert (await client.get("/")).status_code == 200
            yield Running(agent, client)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# --- the page ---------------------------------------------------------------------------------------------

_URL = re.compile(r"""(?<!xmlns=")https?://[^\s"'`<>)]+""")


def external_urls(text: str) -> list[str]:
    """Every http(s) URL in ``text`` whose host is not loopback (an XML namespace name is not fetched)."""
    found = []
    for url in _URL.findall(text):
        host = urlsplit(url).hostname or ""
        if host == "localhost":
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_loopback:
                continue
        found.append(url)
    return found


async def test_the_page_is_small_local_valid_and_sent_with_a_strict_policy(
    tmp_path: Path, press_server: PressSimulator
) -> None:
    async with running(tmp_path, press_server) as run:
        page = await run.client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY"

        # Whatever the page loads is served here, with the same headers.
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(assets) == ["/console/console.css", "/console/console.js", "/console/favicon.svg"]
        total = len(page.content)
        bodies = [page.text]
        for path in assets:
            asset = await run.client.get(path)
            assert asset.status_code == 200, path
            assert asset.headers["x-content-type-options"] == "nosniff"
            assert asset.headers["content-security-policy"] == policy
            total += len(asset.content)
            bodies.append(asset.text)
        assert (await run.client.get("/console/../__init__.py")).status_code == 404
        assert (await run.client.get("/console/nothing.js")).status_code == 404
        assert total < 200 * 1024, f"the page and its assets weigh {total} bytes"

        for body in bodies:
            assert external_urls(body) == [], "nothing is fetched from beyond this host"
            # No inline handler (the policy would block it) and no markup built from strings.
            assert not re.search(r"\son[a-z]+\s*=\s*\"", body)
            assert ".innerHTML" not in body and "outerHTML" not in body and "insertAdjacentHTML" not in body
        script = next(body for path, body in zip(assets, bodies[1:], strict=True) if path.endswith(".js"))
        assert "<script>" not in page.text and "style=" not in page.text
        assert "textContent" in script

        parser = html5lib.HTMLParser(strict=True)
        document = parser.parse(page.text)
        assert not parser.errors
        ids = {node.get("id") for node in document.iter() if node.get("id")}
        assert {"page-overview", "page-tags", "page-events", "page-dead", "sources", "sinks", "tags", "dead"} <= ids


# --- the JSON ---------------------------------------------------------------------------------------------


async def test_the_console_json_shows_sources_tags_rules_events_and_dead_letters(
    tmp_path: Path, press_server: PressSimulator
) -> None:
    async with running(tmp_path, press_server, "ingest") as run:
        assert await press_server.complete_cycle("WO-100", "FILL-500", 7, wait_ack=10)
        assert (await run.post_event(mes_event("mes-old-1", "P-100-OLD"))).status_code == 202
        assert (await run.post_event(mes_event("mes-ok-1", "FILL-500", "WO-200"))).status_code == 202
        await press_server.write("Temperature", None, status=ua.StatusCodes.BadSensorFailure)

        async def fired() -> Any:
            rules = (await run.get_json("/v1/console/tags"))["rules"]
            return rules[0]["last"]

        last = await wait_for(fired, timeout=10, message="the rule's last transaction is shown")

        # Read-only JSON needs no token on a loopback listen address, although a token is configured.
        overview = await run.get_json("/v1/console/overview")
        assert overview["agent"] == "gw-console" and overview["site"] == "plant-console"
        assert overview["data_dir"] == str(tmp_path / "data")
        assert overview["config_path"] is None  # an agent built in process is not told its file
        assert overview["version"]
        assert set(overview["sources"]) == {"press7", "mes"}
        assert overview["sources"]["press7"]["kind"] == "opcua"
        assert overview["sources"]["press7"]["last_value_time"].endswith("Z")
        assert overview["sources"]["mes"]["last_event_at"] > 0
        assert overview["actions"] == {
            "offered": True,
            "token": "ingest",
            "detail": "replay and purge need the ingest token",
        }

        tags = await run.get_json("/v1/console/tags")
        by_tag = {tag["tag"]: tag for tag in tags["tags"]}
        assert set(by_tag) == {
            "press7.temperature",
            "press7.cycle_done",
            "press7.cycle_ack",
            "press7.work_order",
            "press7.item",
            "press7.batch_qty",
        }
        assert by_tag["press7.work_order"]["value"] == "WO-100"
        assert by_tag["press7.work_order"]["source"] == "press7"
        assert by_tag["press7.work_order"]["quality"] == "good"
        assert by_tag["press7.work_order"]["time"].endswith("Z")
        assert by_tag["press7.work_order"]["feeds"] == [{"rule": "press7-completion", "as": "fields.work_order"}]
        assert by_tag["press7.cycle_done"]["feeds"] == [{"rule": "press7-completion", "as": "trigger"}]
        assert by_tag["press7.temperature"]["feeds"] == []
        assert by_tag["press7.cycle_ack"]["feeds"] == [{"rule": "press7-completion", "as": "ack"}]

        async def temperature_bad() -> bool:
            listed = (await run.get_json("/v1/console/tags"))["tags"]
            return any(t["tag"] == "press7.temperature" and t["quality"] == "bad" for t in listed)

        await wait_for(temperature_bad, message="a bad reading shows as bad, not as the last good value")
        [rule] = tags["rules"]
        assert rule["name"] == "press7-completion" and rule["type"] == "production.completed"
        assert rule["trigger"] == "tag press7.cycle_done"
        assert rule["reads"] == ["press7.batch_qty", "press7.item", "press7.work_order"]
        assert last["subject"] == "WO-100" and last["type"] == "io.plantgate.production.completed"

        async def listed() -> Any:
            lanes = (await run.get_json("/v1/console/events"))["lanes"]
            return lanes if {e["id"] for e in lanes["transaction"]} >= {last["id"], "mes-ok-1"} else None

        lanes = await wait_for(listed, message="both transactions are listed")
        assert set(lanes) == {"transaction", "operational", "telemetry"}
        newest = lanes["transaction"][0]
        assert set(newest) == {"id", "type", "subject", "time", "source", "sequence", "lane"}
        assert newest["id"] == "mes-ok-1", "newest first"
        assert "mes-old-1" not in {e["id"] for e in lanes["transaction"]}, "a dead letter was never accepted"
        started = [e for e in lanes["operational"] if e["type"] == "io.plantgate.agent.started"]
        assert started, "events from before the console's first request are listed too"

        whole = await run.get_json("/v1/console/event", id=last["id"])
        assert whole["specversion"] == "1.0" and whole["id"] == last["id"]
        assert whole["data"]["work_order"] == "WO-100" and whole["sequence"]
        missing = await run.client.get("/v1/console/event", params={"id": "no-such-event"})
        assert missing.status_code == 404 and missing.json()["error"] == "not found"

        found = await run.get_json("/v1/console/search", key="WO-200")
        assert [e["id"] for e in found["events"]] == ["mes-ok-1"]
        assert [e["id"] for e in (await run.get_json("/v1/console/search", key=last["id"]))["events"]] == [last["id"]]
        assert (await run.client.get("/v1/console/search")).status_code == 400

        dead = await run.get_json("/v1/console/dead-letters")
        assert dead["total"] == 1
        [letter] = dead["dead_letters"]
        assert letter["id"] == "mes-old-1" and letter["sink"] == "-" and "obsolete" in letter["reason"]
        assert letter["time"] > 0 and letter["subject"] == "WO-4711"
        assert dead["reasons"] == {letter["reason"]: 1}
        one = await run.get_json("/v1/console/dead-letter", id="mes-old-1")
        assert one["reason"] == letter["reason"] and one["event"]["id"] == "mes-old-1"
        assert one["event"]["data"]["item"] == "P-100-OLD"
        assert (await run.client.get("/v1/console/dead-letter", params={"id": "nope"})).status_code == 404

        # No secret anywhere the console or monitoring shows.
        for path in [
            "/",
            "/console/console.js",
            "/status",
            "/v1/console/overview",
            "/v1/console/tags",
            "/v1/console/events",
            "/v1/console/dead-letters",
        ]:
            text = (await run.client.get(path)).text
            assert INGEST not in text and ADMIN not in text, path


# --- who may replay and purge -----------------------------------------------------------------------------


async def _replay(run: Running, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await run.client.post("/v1/buffer/replay", json={"all": True}, headers=headers)


async def _dead_letter(run: Running, press: PressSimulator) -> None:
    """A cycle with an obsolete item: a dead letter (the PLC is acknowledged all the same)."""
    assert await press.complete_cycle("WO-OLD", "P-100-OLD", 5, wait_ack=10)
    assert run.agent.buffer.dead_letter_count == 1


async def test_with_the_ingest_token_only_it_allows_replay(tmp_path: Path, press_server: PressSimulator) -> None:
    async with running(tmp_path, press_server, "ingest") as run:
        await _dead_letter(run, press_server)
        refused = await _replay(run, None)
        assert refused.status_code == 401 and refused.json()["detail"] == "bearer token required"
        assert (await _replay(run, "wrong")).status_code == 401
        accepted = await _replay(run, INGEST)
        assert accepted.status_code == 200 and accepted.json() == {"replayed": 0, "failed": 1}
        assert (await run.client.get("/v1/console/dead-letters")).status_code == 200, "reading needs no token here"


async def test_an_admin_token_replaces_the_ingest_token_for_changes(
    tmp_path: Path, press_server: PressSimulator
) -> None:
    async with running(tmp_path, press_server, "admin") as run:
        await _dead_letter(run, press_server)
        assert (await _replay(run, None)).status_code == 401
        refused = await _replay(run, INGEST)
        assert refused.status_code == 401 and refused.json()["detail"] == "invalid bearer token"
        purge = await run.client.post(
            "/v1/buffer/purge", json={"dead_letters": True}, headers={"Authorization": f"Bearer {INGEST}"}
        )
        assert purge.status_code == 401
        assert run.agent.buffer.dead_letter_count == 1, "the refused purge removed nothing"
        accepted = await _replay(run, ADMIN)
        assert accepted.status_code == 200 and accepted.json() == {"replayed": 0, "failed": 1}
        # Reading the buffer takes either token.
        for token in (INGEST, ADMIN):
            listed = await run.client.get("/v1/buffer/dead-letters", headers={"Authorization": f"Bearer {token}"})
            assert listed.status_code == 200 and [d["subject"] for d in listed.json()] == ["WO-OLD"]
        assert (await run.client.get("/v1/buffer/dead-letters")).status_code == 401
        overview = await run.get_json("/v1/console/overview")
        assert overview["actions"]["token"] == "admin" and overview["actions"]["offered"] is True


async def test_without_any_token_a_loopback_agent_allows_replay(tmp_path: Path, press_server: PressSimulator) -> None:
    async with running(tmp_path, press_server, "none") as run:
        await _dead_letter(run, press_server)
        assert (await _replay(run, None)).json() == {"replayed": 0, "failed": 1}
        overview = await run.get_json("/v1/console/overview")
        assert overview["actions"] == {"offered": True, "token": None, "detail": "open on this loopback listen address"}


def _request(token: str | None) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return Request({"type": "http", "method": "POST", "path": "/v1/buffer/replay", "headers": headers})


@pytest.mark.parametrize(
    ("admin", "ingest", "loopback", "action", "token", "expected"),
    [
        (None, None, True, "change", None, "allowed"),
        (None, None, False, "change", None, "forbidden"),
        (None, None, False, "read", None, "forbidden"),
        (None, "i", False, "read", None, "unauthorized"),
        (None, "i", False, "read", "i", "allowed"),
        (None, "i", False, "change", "i", "allowed"),
        ("a", "i", False, "read", "i", "allowed"),
        ("a", "i", False, "read", "a", "allowed"),
        ("a", "i", False, "change", "i", "unauthorized"),
        ("a", "i", True, "change", "i", "unauthorized"),
        ("a", "i", True, "change", "a", "allowed"),
        ("a", None, True, "change", None, "unauthorized"),
    ],
)
def test_operator_access_rules(
    admin: str | None, ingest: str | None, loopback: bool, action: Any, token: str | None, expected: str
) -> None:
    # Beyond loopback cannot be reached over a socket in a test (loopback only): the rule itself.
    access = OperatorAccess(admin_token=admin, ingest_token=ingest, loopback=loopback)
    try:
        refused = access.check(_request(token), action)
    except HTTPException as exc:
        assert exc.status_code == 401
        outcome = "unauthorized"
    else:
        outcome = "allowed" if refused is None else "forbidden"
    assert outcome == expected


def test_the_events_page_keeps_the_last_events_of_each_lane() -> None:
    from datetime import UTC, datetime

    from agent.console import EVENTS_PER_LANE, RecentEvents
    from agent.events import make_event

    recent = RecentEvents()

    def made(name: str, n: int) -> Any:
        event = make_event(
            name,
            id=f"{name}-{n}",
            source="plantgate/p/g/press7",
            time=datetime(2026, 12, 4, tzinfo=UTC),
            site="p",
            data={"work_order": f"WO-{n}"},
            subject=f"WO-{n}",
        )
        event.sequence = f"{n:020d}"  # as the buffer numbers what it accepts
        return event

    for start in range(0, 3 * EVENTS_PER_LANE, 10):  # groups of 10, both lanes mixed
        recent([made(name, n) for n in range(start, start + 10) for name in ("production.completed", "alarm.raised")])
    duplicate = made("production.completed", 999)
    duplicate.sequence = None  # the buffer dropped it as a duplicate: never shown
    recent([duplicate])
    listing = recent.listing()
    assert [len(listing[lane]) for lane in ("transaction", "operational", "telemetry")] == [EVENTS_PER_LANE] * 2 + [0]
    last = 3 * EVENTS_PER_LANE - 1
    newest = [e.id for e in listing["transaction"][:2]]
    assert newest == [f"production.completed-{last}", f"production.completed-{last - 1}"]
    assert listing["transaction"][-1].id == f"production.completed-{last - EVENTS_PER_LANE + 1}"
    assert recent.find("production.completed-0") is None, "older ones are let go"
    assert recent.find(f"alarm.raised-{last}") is not None
    assert [e.id for e in recent.matching(f"WO-{last}")] == [f"production.completed-{last}", f"alarm.raised-{last}"]
    assert recent.matching("production.completed-999") == []
    assert recent.last_at["plantgate/p/g/press7"] > 0
