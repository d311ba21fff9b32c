"""The lineage endpoints of a running agent: trace, outcomes (and their edge cases), reconciliation, summaries.

An agent in this process takes MES events over its webhook (a real HTTP request on
loopback) and delivers them to a JSON lines file sink; the test plays the middleware
reporting outcomes with real HTTP requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.lineage import digest
from agent.pipeline import Agent
from agent.settings import parse_settings
from tests.peers.waiting import wait_for

TOKEN = "lineage-api-token"
COMPLETED = "io.plantgate.production.completed"

CONFIG = """
[agent]
site = "plant-lineage"
id = "gw-lineage"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"
ingest_token_file = "ingest-token"

{admin}
[journal]
enabled = {enabled}
summary_interval = "{interval}"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
lanes = ["transaction", "operational"]
"""


def completion(n: int, work_order: str | None = None) -> dict[str, Any]:
    work_order = work_order or f"WO-{n}"
    return {
        "specversion": "1.0",
        "id": f"mes-completion-{n}",
        "source": "mes://plant/mes",
        "type": COMPLETED,
        "time": "2026-12-05T10:00:00Z",
        "subject": work_order,
        "data": {"work_order": work_order, "item": "FILL-500", "lot": f"LOT-{n % 2}",
                 "quantity": {"value": str(n), "uom": "EA"}},
    }  # fmt: skip


@dataclass
class Running:
    agent: Agent
    client: httpx.AsyncClient
    path: Path

    def lines(self) -> list[dict[str, Any]]:
        file = self.path / "events.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]

    async def post_events(self, events: list[dict[str, Any]]) -> None:
        response = await self.client.post(
            "/v1/events", content=json.dumps(events),
            headers={"Content-Type": "application/cloudevents-batch+json"},
        )  # fmt: skip
        assert response.status_code == 202, response.text

    async def outcomes(self, body: Any, token: str | None = TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {"Authorization": ""}
        return await self.client.post("/v1/outcomes", json=body, headers=headers)

    async def trace(self, key: str) -> list[dict[str, Any]]:
        response = await self.client.get(f"/v1/trace/{key}")
        if response.status_code == 404:
            return []
        assert response.status_code == 200, response.text
        entries: list[dict[str, Any]] = response.json()["entries"]
        return entries

    async def delivered(self, *ids: str) -> bool:
        for event_id in ids:
            entries = await self.trace(event_id)
            if not entries or entries[0].get("delivered") is None:
                return False
        return True


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, *, enabled: bool = True, interval: str = "0s", admin: str | None = None
) -> AsyncIterator[Running]:
    (tmp_path / "ingest-token").write_text(TOKEN, encoding="utf-8")
    if admin is not None:
        (tmp_path / "admin-token").write_text(admin, encoding="utf-8")
    text = CONFIG.format(
        data_dir=tmp_path, enabled="true" if enabled else "false", interval=interval,
        admin='admin_token_file = "admin-token"' if admin is not None else "",
    )  # fmt: skip
    (tmp_path / "plantgate.toml").write_text(text, encoding="utf-8")
    agent = Agent(parse_settings(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        assert agent.http is not None
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=agent.http.url, headers=headers, timeout=10) as client:
            yield Running(agent, client, tmp_path)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Running]:
    async with running(tmp_path) as run:
        yield run


# --- outcomes ----------------------------------------------------------------------------------------


async def test_outcomes_need_the_ingest_token(live: Running) -> None:
    await live.post_events([completion(1)])
    await wait_for(lambda: live.delivered("mes-completion-1"), message="event 1 delivered")
    body = {"id": "mes-completion-1", "outcome": "posted", "reference": "4900001"}
    missing = await live.outcomes(body, token=None)
    assert missing.status_code == 401
    wrong = await live.outcomes(body, token="guess")
    assert wrong.status_code == 401
    entry = (await live.trace("mes-completion-1"))[0]
    assert "outcome" not in entry  # nothing of a refused request recorded
    assert (await live.client.get("/v1/trace/mes-completion-1", headers={"Authorization": ""})).status_code == 401


async def test_posted_is_recorded_with_the_erp_reference_once(live: Running) -> None:
    await live.post_events([completion(1), completion(2)])
    await wait_for(lambda: live.delivered("mes-completion-1", "mes-completion-2"), message="both delivered")
    body = [
        {"id": "mes-completion-1", "outcome": "posted", "reference": "4900001"},
        {"id": "nobody-knows-me", "outcome": "posted", "reference": "4900002"},
    ]
    first = await live.outcomes(body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["recorded"] == 1 and answer["unknown"] == ["nobody-knows-me"]
    assert [r["result"] for r in answer["results"]] == ["recorded", "unknown"]
    again = (await live.outcomes(body[0])).json()
    assert again["recorded"] == 0 and again["results"] == [{"id": "mes-completion-1", "result": "unchanged"}]
    entry = (await live.trace("mes-completion-1"))[0]
    assert entry["outcome"] == "posted" and entry["reference"] == "4900001"
    posted = [s for s in entry["steps"] if s["step"] == "posted"]
    assert len(posted) == 1 and posted[0]["reference"] == "4900001"  # the repeat added no step
    status = (await live.client.get("/status")).json()["lineage"]
    assert list(status["outcomes"]) == [COMPLETED]  # agent.started, delivered too, awaits no ERP outcome
    counts = status["outcomes"][COMPLETED]
    assert counts["confirmed"] == 1 and counts["unconfirmed"] == 1 and counts["rejected"] == 0
    assert counts["oldest_unconfirmed_age_seconds"] is not None
    assert status["outcome_reports"]["unknown"] == 1
    metrics = (await live.client.get("/metrics")).text
    assert 'plantgate_outcomes_confirmed{type="production.completed"} 1.0' in metrics
    assert 'plantgate_outcomes_unconfirmed{type="production.completed"} 1.0' in metrics
    assert 'plantgate_outcome_reports_total{result="unknown"} 1.0' in metrics


async def test_an_invalid_batch_is_refused_whole_naming_item_and_field(live: Running) -> None:
    await live.post_events([completion(1)])
    await wait_for(lambda: live.delivered("mes-completion-1"), message="delivered")
    body = [
        {"id": "mes-completion-1", "outcome": "posted", "reference": "4900001"},
        {"id": "mes-completion-1", "outcome": "booked"},
    ]
    response = await live.outcomes(body)
    assert response.status_code == 400
    assert "item 1" in response.json()["error"] and "$.outcome" in response.json()["error"]
    assert "outcome" not in (await live.trace("mes-completion-1"))[0]  # the valid item 0 was not recorded
    for bad in (b"{oops", b"[]", b'"posted"'):
        answer = await live.client.post("/v1/outcomes", content=bad, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, bad
    huge = b'{"id": "' + b"x" * (1024 * 1024) + b'", "outcome": "posted"}'
    assert (await live.client.post("/v1/outcomes", content=huge)).status_code == 413


async def test_a_rejection_is_a_business_dead_letter_once_and_replays(live: Running) -> None:
    await live.post_events([completion(1), completion(2)])
    await wait_for(lambda: live.delivered("mes-completion-1", "mes-completion-2"), message="delivered")
    rejection = {"id": "mes-completion-2", "outcome": "rejected", "reason": "posting period closed", "reference": "R-7"}
    answer = (await live.outcomes(rejection)).json()
    assert answer["results"][0]["result"] == "recorded"
    again = (await live.outcomes(rejection)).json()
    assert again["results"][0]["result"] == "unchanged"
    letters = (await live.client.get("/v1/buffer/dead-letters")).json()
    assert [(d["id"], d["sink"], d["reason"]) for d in letters] == [
        ("mes-completion-2", "erp", "rejected by the ERP: posting period closed")
    ]
    assert letters[0]["context"]["outcome"] == "rejected" and letters[0]["context"]["reference"] == "R-7"
    assert letters[0]["context"]["delivered_by"] == ["file"]
    entry = (await live.trace("mes-completion-2"))[0]
    assert entry["outcome"] == "rejected" and entry["reason"] == "posting period closed"
    await wait_for(lambda: live.agent.status()["buffer"]["dead_letters"] == 1, message="dead letter counted in /status")
    # The cause is fixed in the ERP: replay under the same id, the sink gets it again.
    replay = await live.client.post("/v1/buffer/replay", json={"sink": "erp"})
    assert replay.json() == {"replayed": 1, "failed": 0}
    await wait_for(
        lambda: [e["id"] for e in live.lines()].count("mes-completion-2") == 2, message="the replay delivered"
    )
    assert (await live.client.get("/v1/buffer/dead-letters")).json() == []
    steps = [s["step"] for s in (await live.trace("mes-completion-2"))[0]["steps"]]
    assert "dead_letter" in steps and "replayed" in steps
    posted = (await live.outcomes({"id": "mes-completion-2", "outcome": "posted", "reference": "4900009"})).json()
    assert posted["recorded"] == 1
    entry = (await live.trace("mes-completion-2"))[0]
    assert entry["outcome"] == "posted" and entry["reference"] == "4900009"


async def test_rejected_again_after_a_replay_is_a_dead_letter_again(live: Running) -> None:
    await live.post_events([completion(3)])
    await wait_for(lambda: live.delivered("mes-completion-3"), message="delivered")
    rejection = {"id": "mes-completion-3", "outcome": "rejected", "reason": "unknown storage location"}
    await live.outcomes(rejection)
    assert (await live.client.post("/v1/buffer/replay", json={"sink": "erp"})).json()["replayed"] == 1
    await wait_for(lambda: [e["id"] for e in live.lines()].count("mes-completion-3") == 2, message="replayed")
    answer = (await live.outcomes(rejection)).json()
    assert answer["results"][0]["result"] == "recorded"  # new after the replay, though worded the same
    letters = (await live.client.get("/v1/buffer/dead-letters")).json()
    assert [d["id"] for d in letters] == ["mes-completion-3"]


# --- trace and reconciliation --------------------------------------------------------------------------


async def test_trace_by_id_work_order_and_lot(live: Running) -> None:
    await live.post_events([completion(1), completion(2), completion(3, "WO-1")])
    ids = ("mes-completion-1", "mes-completion-2", "mes-completion-3")
    await wait_for(lambda: live.delivered(*ids), message="delivered")
    by_order = await live.trace("WO-1")
    assert [e["id"] for e in by_order] == ["mes-completion-1", "mes-completion-3"]
    explicit = (await live.client.get("/v1/trace", params={"work_order": "WO-1"})).json()["entries"]
    assert [e["id"] for e in explicit] == ["mes-completion-1", "mes-completion-3"]
    by_lot = (await live.client.get("/v1/trace", params={"lot": "LOT-1"})).json()["entries"]
    assert [e["id"] for e in by_lot] == ["mes-completion-1", "mes-completion-3"]
    entry = by_order[0]
    assert entry["type"] == COMPLETED and entry["work_order"] == "WO-1" and entry["seq"] is not None
    steps = [s["step"] for s in entry["steps"]]
    assert steps[0] == "committed" and "acked" in steps
    assert "body" not in entry
    unknown = await live.client.get("/v1/trace/WO-nothing")
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert (await live.client.get("/v1/trace")).status_code == 400


async def test_reconciliation_window_lists_states_and_digest(live: Running) -> None:
    import time

    before = time.time()
    await live.post_events([completion(n) for n in range(1, 5)])
    ids = [f"mes-completion-{n}" for n in range(1, 5)]
    await wait_for(lambda: live.delivered(*ids), message="delivered")
    await live.outcomes([{"id": ids[0], "outcome": "posted", "reference": "D1"},
                         {"id": ids[1], "outcome": "rejected", "reason": "closed"}])  # fmt: skip
    query = {"from": str(before - 1), "to": str(time.time() + 1), "type": "production.completed"}
    window = await live.client.get("/v1/reconciliation", params=query)
    assert window.status_code == 200, window.text
    body = window.json()
    assert body["count"] == 4 and body["type"] == COMPLETED
    assert body["digest"] == digest(ids)
    states = {e["id"]: e["state"] for e in body["events"]}
    assert states == {ids[0]: "posted", ids[1]: "rejected", ids[2]: "delivered", ids[3]: "delivered"}
    assert all(e["subject"] and e["time"] for e in body["events"])
    empty = (await live.client.get("/v1/reconciliation", params={"from": "2020-01-01T00:00:00Z",
                                                                  "to": "2020-01-02T00:00:00Z"})).json()  # fmt: skip
    assert empty["count"] == 0 and empty["events"] == []
    bad = await live.client.get("/v1/reconciliation", params={"from": "last tuesday"})
    assert bad.status_code == 400
    committed = (await live.client.get("/v1/reconciliation", params={**query, "by": "committed"})).json()
    assert committed["by"] == "committed" and sorted(e["id"] for e in committed["events"]) == sorted(ids)
    assert (await live.client.get("/v1/reconciliation", params={"by": "sequence"})).status_code == 400


async def test_summary_events_sum_up_each_window_once(tmp_path: Path) -> None:
    async with running(tmp_path, interval="1s") as live:
        await live.post_events([completion(n) for n in range(1, 4)])

        def summaries() -> list[dict[str, Any]]:
            return [e for e in live.lines() if e["type"] == "io.plantgate.reconciliation.summary"]

        def counted() -> int:
            return sum(s["data"]["types"].get("production.completed", {}).get("delivered", 0) for s in summaries())

        await wait_for(lambda: counted() == 3, timeout=15, message=lambda: f"summaries: {summaries()}")
        with_events = [s for s in summaries() if s["data"]["types"]]
        ids_by_window = {}
        for summary in with_events:
            window = (await live.client.get("/v1/reconciliation", params={
                "from": summary["data"]["from"], "to": summary["data"]["to"], "type": "production.completed"
            })).json()  # fmt: skip
            figures = summary["data"]["types"]["production.completed"]
            assert figures["digest"] == window["digest"] and figures["delivered"] == window["count"]
            ids_by_window[summary["data"]["to"]] = summary["id"]
        assert len({s["id"] for s in summaries()}) == len(summaries())  # one summary per window
        assert {s["data"]["to"] for s in summaries()} == {s["data"]["to"] for s in summaries()}
        assert live.agent.lineage.status()["reconciliation"]["summaries_sent"] >= len(with_events)  # type: ignore[index]


async def test_journal_off_answers_503(tmp_path: Path) -> None:
    async with running(tmp_path, enabled=False) as live:
        response = await live.client.get("/v1/trace/anything")
        assert response.status_code == 503
        assert (await live.outcomes({"id": "x", "outcome": "posted"})).status_code == 503
        assert live.agent.status()["lineage"]["journal"]["enabled"] is False


async def test_a_resend_needs_the_admin_token_when_there_is_one(tmp_path: Path) -> None:
    async with running(tmp_path, admin="the-admin-token") as live:
        await live.post_events([completion(1)])
        await wait_for(lambda: live.delivered("mes-completion-1"), message="delivered")
        body = {"ids": ["mes-completion-1"]}
        refused = await live.client.post("/v1/reconciliation/resend", json=body)  # the ingest token
        assert refused.status_code == 401
        admin = {"Authorization": "Bearer the-admin-token"}
        resent = await live.client.post("/v1/reconciliation/resend", json=body, headers=admin)
        assert resent.json() == {"resent": ["mes-completion-1"], "failed": []}
        await wait_for(lambda: [e["id"] for e in live.lines()].count("mes-completion-1") == 2, message="resent")
        assert "replayed" in [s["step"] for s in (await live.trace("mes-completion-1"))[0]["steps"]]
        unknown = await live.client.post("/v1/reconciliation/resend", json={"ids": ["nope"]}, headers=admin)
        assert unknown.json()["failed"][0]["id"] == "nope"
        # Reading and reporting outcomes take either token.
        assert (await live.client.get("/v1/trace/WO-1", headers=admin)).status_code == 200
        assert (await live.client.get("/v1/trace/WO-1")).status_code == 200
        bad = await live.client.post("/v1/reconciliation/lookup", json={"ids": "mes-completion-1"})
        assert bad.status_code == 400


async def plantgate(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "plantgate"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_command_line_on_a_stopped_agents_file(tmp_path: Path) -> None:
    async with running(tmp_path) as live:
        await live.post_events([completion(1), completion(2)])
        await wait_for(lambda: live.delivered("mes-completion-1", "mes-completion-2"), message="delivered")
        await live.outcomes({"id": "mes-completion-1", "outcome": "posted", "reference": "4900001"})
    config = str(tmp_path / "plantgate.toml")
    code, out, err = await plantgate("trace", "mes-completion-1", "-c", config)
    assert code == 0, err
    assert "mes-completion-1  production.completed  subject=WO-1" in out
    assert "ERP: posted, reference 4900001" in out
    code, out, _ = await plantgate("trace", "LOT-0", "-c", config, "--json")
    assert code == 0 and [e["id"] for e in json.loads(out)["entries"]] == ["mes-completion-2"]
    export = tmp_path / "erp.csv"
    export.write_text("document,id\n4900001,mes-completion-1\n4900077,mes-unheard-of\n", encoding="utf-8")
    code, out, _ = await plantgate("reconcile", "--against", str(export), "-c", config, "--json")
    assert code == 1
    answer = json.loads(out)
    assert answer["missing_in_erp"] == ["mes-completion-2"] and answer["unknown_to_plant"] == ["mes-unheard-of"]
    code, out, _ = await plantgate(
        "reconcile", "--against", str(export), "-c", config, "--type", "material.consumed", "--json"
    )
    assert json.loads(out)["missing_in_erp"] == []  # nothing of that type delivered
    agree = tmp_path / "agree.jsonl"
    agree.write_text('"mes-completion-1"\n"mes-completion-2"\n', encoding="utf-8")
    code, out, _ = await plantgate("reconcile", "--against", str(agree), "-c", config)
    assert code == 0 and "the plant and the ERP agree" in out
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a"}\n{"id": 5}\n', encoding="utf-8")
    code, _, err = await plantgate("reconcile", "--against", str(broken), "-c", config)
    assert code == 2 and "broken.jsonl:2:" in err and "Traceback" not in err
    code, _, err = await plantgate("reconcile", "--against", str(export), "-c", config, "--from", "someday")
    assert code == 2 and "--from/--to" in err
    # Resent offline, under the stopped agent's lock: delivered at the next start.
    code, out, err = await plantgate("reconcile", "--against", str(export), "-c", config, "--resend", "--json")
    assert json.loads(out)["resent"] == ["mes-completion-2"], err
    async with running(tmp_path) as live:
        await wait_for(lambda: [e["id"] for e in live.lines()].count("mes-completion-2") == 2, message="resent")


async def test_command_line_with_the_journal_off(tmp_path: Path) -> None:
    async with running(tmp_path, enabled=False) as live:
        await live.post_events([completion(1)])
    code, _, err = await plantgate("trace", "WO-1", "-c", str(tmp_path / "plantgate.toml"))
    assert code == 2 and "journal is off" in err


async def test_windows_missed_while_down_are_summed_up_at_start_at_most_48(tmp_path: Path) -> None:
    import math
    import time

    from agent.lineage import MAX_MISSED_WINDOWS, SUMMARY_STATE_KEY
    from buffer import Buffer

    buffer = Buffer(tmp_path / "buffer.db")
    await buffer.open()
    now_boundary = math.floor(time.time())
    await buffer.save_state(SUMMARY_STATE_KEY, repr(float(now_boundary - 100)))  # down for 100 windows of 1 s
    await buffer.close()

    async with running(tmp_path, interval="1s") as live:

        def summaries() -> list[dict[str, Any]]:
            return [e for e in live.lines() if e["type"] == "io.plantgate.reconciliation.summary"]

        await wait_for(lambda: len(summaries()) >= MAX_MISSED_WINDOWS, message=lambda: f"{len(summaries())}")
        first = summaries()[0]["data"]
        assert parse_seconds(first["from"]) >= now_boundary - MAX_MISSED_WINDOWS - 1  # the older ones skipped
        assert first["types"] == {}  # nothing delivered then; still a summary, so no window goes unreported
    ends = [parse_seconds(e["data"]["to"]) for e in summaries()]
    assert ends == sorted(set(ends))  # one per window, in order

    async with running(tmp_path, interval="1s") as live:
        await wait_for(lambda: len(summaries()) > len(ends), message="the next window summed up after a restart")
    again = [parse_seconds(e["data"]["to"]) for e in summaries()]
    assert again == sorted(set(again)) and again[: len(ends)] == ends  # a restart repeats no window


def parse_seconds(text: str) -> float:
    from agent.lineage import parse_time

    return parse_time(text)
