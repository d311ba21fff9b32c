"""The MES poll against a real pageable HTTP server on loopback (tests/peers/mes_server.py).

Paging, the cursor committed with each page, ETag / 304, an MES answering 500 or
going away and coming back, auth, a record that does not fit; and the agent killed
(SIGKILL, as a child process ``plantgate run``) in the middle of paging: every
record arrives under one id and the restarted agent asks from the committed cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.pipeline import Agent
from agent.settings import parse_settings
from tests.peers.mes_server import MesRestServer
from tests.peers.mosquitto import free_port
from tests.peers.waiting import wait_for

MES_TOKEN = "mes-rest-token"

CONFIG = """
[agent]
site = "plant-poll"
id = "gw-poll"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{http_port}"

[[sources.mes]]
name = "mes"
mode = "poll"
url = "{url}"
interval = "{interval}"
max_backoff = "300ms"
timeout = "2s"
records = "$.records"
next = "$.next"
cursor_param = "since"
cursor_field = "$.id"
mapping = "confirmations"
{auth}

  [sources.mes.mappings.confirmations]
  type = "production.completed"
  id = "$.confirmation"
  time = "$.postedAt"
  fields = {{ work_order = "$.order", item = "$.material", quantity = "$.qty" }}
  uom = "$.unit"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def config_text(data_dir: Path, url: str, *, interval: str = "200ms", auth: str = "", http_port: int = 0) -> str:
    return CONFIG.format(data_dir=data_dir, url=url, interval=interval, auth=auth, http_port=http_port)


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by SIGKILL
            found.append(json.loads(line))
    return found


def confirmations(path: Path) -> dict[str, set[str]]:
    """Work order -> the ids it was delivered under."""
    out: dict[str, set[str]] = {}
    for event in lines(path):
        if event["type"] == "io.plantgate.production.completed":
            out.setdefault(event["subject"], set()).add(event["id"])
    return out


def committed_cursor(path: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM state WHERE key = 'source/mes/cursor'").fetchone()
        return row[0] if row else None


@contextlib.asynccontextmanager
async def running_agent(text: str) -> AsyncIterator[Agent]:
    agent = Agent(parse_settings(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_pages_cursor_etag_failures_and_restart(tmp_path: Path) -> None:
    (tmp_path / "mes-token").write_text(MES_TOKEN + "\n", encoding="utf-8")
    auth = 'bearer_token_file = "mes-token"'
    out = tmp_path / "events.jsonl"
    async with MesRestServer(35, page_size=10, token=MES_TOKEN) as server:
        async with running_agent(config_text(tmp_path, server.url, auth=auth)) as agent:
            source = agent.sources[0]
            await wait_for(lambda: len(confirmations(out)) == 35, message=lambda: f"{len(confirmations(out))} of 35")
            assert [r.since for r in server.requests[:4]] == [None, "10", "20", "30"]
            # Nothing new: the next polls ask from the cursor and get 304 for their ETag.
            await wait_for(lambda: any(r.status == 304 for r in server.requests), message="a 304")
            assert all(r.since == "35" for r in server.requests[4:])
            assert committed_cursor(tmp_path / "buffer.db") == "35"
            assert source.status.state == "connected"

            server.fail_next = 3  # the MES's database is busy for a while
            await wait_for(lambda: source.status.state == "reconnecting", message="the poll fails")
            assert "HTTP 500" in (source.status.last_error or "")
            ready, body = agent.readiness()
            assert ready and any(entry.get("source") == "mes" for entry in body["degraded"])
            server.add(5)
            await wait_for(lambda: len(confirmations(out)) == 40, message="records after the failures")
            assert source.status.state == "connected"

            await server.stop()  # the MES goes away
            await wait_for(lambda: source.status.state == "reconnecting", message="the MES is away")
            server.add(3)
            bad = server.records[-1]
            del bad["order"]  # a record the mapping cannot take
            await server.start()
            await wait_for(lambda: len(confirmations(out)) == 42, message="records after the MES came back")
            await wait_for(lambda: "records" in source.status.degraded, message="the bad record is reported")
            assert "$.order" in source.status.degraded["records"]
            assert source.status.info["rejected_records"] == "1"
            assert committed_cursor(tmp_path / "buffer.db") == "43"  # past the bad record: the feed goes on

        # A new agent on the same buffer asks from the committed cursor.
        seen = len(server.requests)
        server.add(2)
        async with running_agent(config_text(tmp_path, server.url, auth=auth)):
            await wait_for(lambda: len(confirmations(out)) == 44, message="records after the restart")
            assert server.requests[seen].since == "43"
    ids = [event_ids for event_ids in confirmations(out).values()]
    assert all(len(event_ids) == 1 for event_ids in ids)
    assert len({next(iter(event_ids)) for event_ids in ids}) == 44


async def test_basic_auth_and_a_wrong_token_is_reported(tmp_path: Path) -> None:
    (tmp_path / "mes-password").write_text("s3cret\n", encoding="utf-8")
    out = tmp_path / "events.jsonl"
    async with MesRestServer(3, basic=("plantgate", "s3cret")) as server:
        auth = 'username = "plantgate"\npassword_file = "mes-password"'
        async with running_agent(config_text(tmp_path, server.url, auth=auth)):
            await wait_for(lambda: len(confirmations(out)) == 3, message="records with basic auth")
    async with MesRestServer(3, token="another-token") as server:
        (tmp_path / "mes-token").write_text(MES_TOKEN, encoding="utf-8")
        text = config_text(tmp_path / "other", server.url, auth='bearer_token_file = "../mes-token"')
        (tmp_path / "other").mkdir()
        async with running_agent(text) as agent:
            source = agent.sources[0]
            await wait_for(lambda: "HTTP 401" in (source.status.last_error or ""), message="401 reported")
            assert source.status.state == "reconnecting"


@pytest.mark.timeout(90)
async def test_agent_killed_mid_page_resumes_at_the_committed_cursor(tmp_path: Path) -> None:
    total = 150
    http_port = free_port()
    config = tmp_path / "plantgate.toml"
    data_dir = tmp_path / "data"
    out = data_dir / "events.jsonl"
    command = [str(Path(sys.executable).parent / "plantgate"), "run", "-c", str(config)]
    # A slow MES: each page of 10 takes 100 ms, so the kill lands in the middle of the paging.
    async with MesRestServer(total, page_size=10, page_delay=0.1) as server:
        config.write_text(config_text(data_dir, server.url, interval="5s", http_port=http_port), encoding="utf-8")
        with (tmp_path / "agent.log").open("ab") as agent_log:
            agent = await asyncio.create_subprocess_exec(*command, stdout=agent_log, stderr=agent_log)
            try:
                await wait_for(lambda: sum(r.status == 200 for r in server.requests) >= 5, timeout=30)
            finally:
                agent.send_signal(signal.SIGKILL)
                await asyncio.wait_for(agent.wait(), 10)
            assert agent.returncode == -signal.SIGKILL
            cursor = committed_cursor(data_dir / "buffer.db")
            assert cursor is not None and 0 < int(cursor) < total, cursor
            seen = len(server.requests)
            agent = await asyncio.create_subprocess_exec(*command, stdout=agent_log, stderr=agent_log)
            try:
                await wait_for(
                    lambda: len(confirmations(out)) == total,
                    timeout=40,
                    message=lambda: f"{len(confirmations(out))} of {total} delivered",
                )
            finally:
                agent.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(agent.wait(), 30) == 0
    assert server.requests[seen].since == cursor, "the restarted agent resumed at the committed cursor"
    delivered = confirmations(out)
    assert set(delivered) == {f"WO-{n:05d}" for n in range(1, total + 1)}
    assert all(len(ids) == 1 for ids in delivered.values()), "every record under one id"
    assert len({next(iter(ids)) for ids in delivered.values()}) == total


CLOUDEVENTS_CONFIG = """
[agent]
site = "plant-poll"
id = "gw-poll"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sources.mes]]
name = "mes"
mode = "poll"
url = "{url}"
interval = "200ms"
max_backoff = "300ms"
records = "$.records"
cursor_field = "$.seq"
{extra}

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def receipts(path: Path) -> dict[str, dict[str, Any]]:
    return {event["id"]: event for event in lines(path) if event["type"] == "io.plantgate.goods.received"}


async def test_cloudevents_records_paged_by_link_header_and_a_bad_record_reported(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    async with MesRestServer(12, page_size=5, cloudevents=True, link_header=True) as server:
        server.records[7]["time"] = "not a time"  # one record the agent cannot take
        text = CLOUDEVENTS_CONFIG.format(data_dir=tmp_path, url=server.url, extra="")
        async with running_agent(text) as agent:
            source = agent.sources[0]
            await wait_for(lambda: len(receipts(out)) == 11, message=lambda: f"{len(receipts(out))} of 11")
            assert [r.since for r in server.requests[:3]] == [None, "5", "10"]  # followed the Link header
            assert "time" in source.status.degraded["records"]
            assert source.status.info["rejected_records"] == "1"
            assert committed_cursor(tmp_path / "buffer.db") == "12"
    received = receipts(out)
    assert "gr-00008" not in received
    first = received["gr-00001"]
    assert first["source"] == "plantgate/plant-poll/gw-poll/mes"
    assert first["originsource"] == "mes://plant/rest"
    assert first["data"]["quantity"] == {"value": "1", "uom": "EA"}


async def test_https_with_the_configured_ca(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    out = tmp_path / "events.jsonl"
    async with MesRestServer(3, cloudevents=True, tls=(str(cert_file), str(key_file))) as server:
        assert server.url.startswith("https://")
        untrusted = tmp_path / "untrusted"
        untrusted.mkdir()
        async with running_agent(CLOUDEVENTS_CONFIG.format(data_dir=untrusted, url=server.url, extra="")) as agent:
            source = agent.sources[0]
            await wait_for(lambda: source.status.state == "reconnecting", message="certificate refused")
            assert "CERTIFICATE_VERIFY_FAILED" in (source.status.last_error or "")
        text = CLOUDEVENTS_CONFIG.format(data_dir=tmp_path, url=server.url, extra=f'ca_file = "{ca_file}"')
        async with running_agent(text):
            await wait_for(lambda: len(receipts(out)) == 3, message="records over HTTPS")
