"""End to end: what the plant posted, proven against a real HTTPS middleware that reports what its ERP did.

A child ``plantgate run`` takes MES events (work orders WO-1..WO-8) on its webhook and
delivers them over HTTPS to ``tests.peers.middleware.Middleware`` (trustme certificates),
which answers with references and reports outcomes back to ``POST /v1/outcomes``: it
posts most, rejects WO-3 and WO-5 with a reason, and loses WO-7 (acknowledges it, never
records it). The test then checks, through the ``plantgate`` command line as an operator
would:

- the trace of each event shows its whole path: committed, acknowledged by the
  middleware with its reference, posted with the ERP's document number;
- the rejected ones are business dead letters (sink ``erp``), a repeated rejection makes
  no second one, and they are posted after a fix and ``plantgate buffer replay``;
- the lost one is found by ``plantgate reconcile --against <the ERP's ids>`` and by the
  summary digest (``summary_interval = "2s"``) recomputed over what the ERP holds;
- all of it survives ``kill -9`` and a restart, and reads from the stopped agent's file.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from agent.lineage import digest
from tests.peers.https_server import Certificates, free_port
from tests.peers.middleware import Middleware
from tests.peers.waiting import wait_for

TOKEN = "lineage-e2e-token"
PLANTGATE = str(Path(sys.executable).parent / "plantgate")
REJECT = {"WO-3": "posting period closed", "WO-5": "unknown storage location"}
LOST = "WO-7"

CONFIG = """
[agent]
site = "plant-lineage"
id = "gw-lineage"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{http_port}"
ingest_token_file = "ingest-token"

[journal]
summary_interval = "2s"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sinks.https]]
name = "middleware"
url = "{url}"
ca_file = "{ca_file}"
lanes = ["transaction", "operational"]
timeout = "2s"
"""


def completion(n: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e2e-completion-{n}",
        "source": "mes://plant/mes",
        "type": "io.plantgate.production.completed",
        "time": f"2026-12-05T10:00:{n:02d}Z",
        "subject": f"WO-{n}",
        "data": {"work_order": f"WO-{n}", "item": "FILL-500", "quantity": {"value": str(10 * n), "uom": "EA"}},
    }


def event_id(work_order: str) -> str:
    return f"e2e-completion-{work_order.removeprefix('WO-')}"


async def plantgate(*args: str) -> tuple[int, str, str]:
    """Run the command line; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        PLANTGATE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Plant:
    """The agent as a child process on one config and data dir."""

    def __init__(self, config: Path, port: int, log: Path):
        self.config = config
        self.port = port
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
        )

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                PLANTGATE, "run", "-c", str(self.config), stdout=log, stderr=log
            )
        await wait_for(self.ready, timeout=20, interval=0.05, message=lambda: self.log.read_text()[-2000:])

    async def ready(self) -> bool:
        try:
            return (await self.client.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def kill(self, sig: int) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), 30)
        self.process = None
        return code

    async def entry(self, work_order: str) -> dict[str, Any] | None:
        response = await self.client.get(f"/v1/trace/{event_id(work_order)}")
        if response.status_code != 200:
            return None
        entries: list[dict[str, Any]] = response.json()["entries"]
        return entries[0]

    async def outcome_of(self, work_order: str) -> str | None:
        entry = await self.entry(work_order)
        return None if entry is None else entry.get("outcome")


async def trace_json(config: Path, key: str) -> dict[str, Any]:
    code, out, err = await plantgate("trace", key, "-c", str(config), "--json")
    assert code == 0, err
    answer: dict[str, Any] = json.loads(out)
    return answer


async def dead_letters(config: Path) -> list[dict[str, Any]]:
    code, out, err = await plantgate("buffer", "dead-letters", "-c", str(config), "--json")
    assert code == 0, err
    letters: list[dict[str, Any]] = json.loads(out)
    return letters


def assert_whole_path(entry: dict[str, Any], middleware: Middleware) -> None:
    """Committed, acknowledged by the middleware with its reference, posted with the ERP's document."""
    steps = entry["steps"]
    names = [s["step"] for s in steps]
    assert names[0] == "committed", names
    acked = [s for s in steps if s["step"] == "acked" and s.get("sink") == "middleware"]
    assert acked and acked[0].get("reference") == middleware.references[entry["id"]], steps
    posted = [s for s in steps if s["step"] == "posted"]
    assert posted and posted[-1]["reference"] == middleware.erp[entry["id"]], steps
    assert entry["outcome"] == "posted" and entry["reference"] == middleware.erp[entry["id"]]
    assert names.index("committed") < names.index("acked") < names.index("posted")
    assert entry["trigger"]["source"] == "mes"


async def test_trace_outcomes_and_reconciliation_against_a_middleware(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ingest-token").write_text(TOKEN, encoding="utf-8")
    certs = Certificates(tmp_path / "certs")
    middleware = Middleware(certs, token=TOKEN)
    middleware.reject.update(REJECT)
    middleware.lose.add(LOST)
    port = free_port()
    middleware.agent_url = f"http://127.0.0.1:{port}"
    config = tmp_path / "plantgate.toml"
    config.write_text(
        CONFIG.format(data_dir=data, http_port=port, url=middleware.url, ca_file=certs.ca_file), encoding="utf-8"
    )
    plant = Plant(config, port, tmp_path / "agent.log")
    work_orders = [f"WO-{n}" for n in range(1, 9)]
    reported = [w for w in work_orders if w != LOST]
    with middleware:
        await plant.start()
        try:
            started = time.time()
            posted = await plant.client.post(
                "/v1/events", content=json.dumps([completion(n) for n in range(1, 9)]),
                headers={"Content-Type": "application/cloudevents-batch+json"},
            )  # fmt: skip
            assert posted.status_code == 202, posted.text

            async def all_reported() -> bool:
                return all([await plant.outcome_of(w) is not None for w in reported])

            await wait_for(all_reported, timeout=20, message="an outcome for every event the ERP saw")

            # The whole path of each, as an operator reads it.
            for work_order in (w for w in reported if w not in REJECT):
                answer = await trace_json(config, work_order)
                assert [e["id"] for e in answer["entries"]] == [event_id(work_order)]
                assert_whole_path(answer["entries"][0], middleware)
            code, text, _ = await plantgate("trace", "WO-1", "-c", str(config))
            assert code == 0
            document = middleware.erp[event_id("WO-1")]
            assert "committed" in text and "acked" in text and f"ERP: posted, reference {document}" in text
            assert middleware.references[event_id("WO-1")] in text

            # The rejected: business dead letters, once each, even when the middleware repeats itself.
            letters = await dead_letters(config)
            assert sorted((d["id"], d["sink"], d["reason"]) for d in letters) == sorted(
                (event_id(w), "erp", f"rejected by the ERP: {reason}") for w, reason in REJECT.items()
            )
            answers_before = len(middleware.answers())
            middleware.report_again([event_id("WO-3")])
            await wait_for(lambda: len(middleware.answers()) > answers_before, message="the repeat answered")
            assert middleware.answers()[-1]["results"][0]["result"] == "unchanged"
            assert len(await dead_letters(config)) == 2
            status = (await plant.client.get("/status")).json()
            assert status["buffer"]["dead_letters_by_sink"]["erp"]["count"] == 2
            assert status["lineage"]["outcomes"]["io.plantgate.production.completed"]["rejected"] == 2

            # The lost one: acknowledged with the middleware's reference, no outcome.
            lost = await plant.entry(LOST)
            assert lost is not None and lost.get("delivered") is not None and "outcome" not in lost

            # kill -9: everything above is still known after a restart.
            assert await plant.kill(signal.SIGKILL) == -signal.SIGKILL
            await plant.start()
            assert_whole_path((await trace_json(config, "WO-1"))["entries"][0], middleware)
            assert len(await dead_letters(config)) == 2

            # Fixed in the ERP: replayed under their ids, then posted.
            for work_order in REJECT:
                middleware.accept_again(work_order)
            code, out, err = await plantgate("buffer", "replay", "--sink", "erp", "-c", str(config))
            assert code == 0 and out.strip() == "replayed 2, failed 0", (out, err)

            async def fixed() -> bool:
                return all([await plant.outcome_of(w) == "posted" for w in REJECT])

            await wait_for(fixed, timeout=20, message="the replayed events posted")
            assert await dead_letters(config) == []
            for work_order in REJECT:
                entry = (await trace_json(config, work_order))["entries"][0]
                names = [s["step"] for s in entry["steps"]]
                assert max(names.index("rejected"), names.index("dead_letter")) < names.index("replayed")
                assert_whole_path(entry, middleware)

            # Reconcile against what the ERP holds (plus one id the plant never sent).
            export = tmp_path / "erp.jsonl"
            erp_ids = middleware.erp_ids()
            export.write_text("".join(json.dumps({"id": i}) + "\n" for i in [*erp_ids, "erp-only-1"]))
            code, out, err = await plantgate("reconcile", "--against", str(export), "-c", str(config), "--json")
            assert code == 1, err
            comparison = json.loads(out)
            assert comparison["missing_in_erp"] == [event_id(LOST)]
            assert comparison["unknown_to_plant"] == ["erp-only-1"]
            code, text, _ = await plantgate("reconcile", "--against", str(export), "-c", str(config))
            assert code == 1 and event_id(LOST) in text and "erp-only-1" in text

            # The summary digest tells the cloud the same, without asking.
            lost_at = lost["delivered"]

            def summary_of_lost() -> dict[str, Any] | None:
                for summary in middleware.summary_events():
                    start = datetime_seconds(summary["data"]["from"])
                    end = datetime_seconds(summary["data"]["to"])
                    if start <= lost_at < end and "production.completed" in summary["data"]["types"]:
                        return summary
                return None

            summary = await wait_for(summary_of_lost, timeout=20, message="the summary of the lost one's window")
            figures = summary["data"]["types"]["production.completed"]
            window = (await plant.client.get("/v1/reconciliation", params={
                "from": summary["data"]["from"], "to": summary["data"]["to"], "type": "production.completed",
            })).json()  # fmt: skip
            window_ids = [e["id"] for e in window["events"]]
            assert figures["digest"] == window["digest"] == digest(window_ids)
            assert figures["delivered"] == len(window_ids)
            assert event_id(LOST) in window_ids
            held_by_erp = [i for i in window_ids if i in set(middleware.erp_ids())]
            assert digest(held_by_erp) != figures["digest"]
            assert digest([*held_by_erp, event_id(LOST)]) == figures["digest"]  # all that differs is the lost one
            windows: dict[str, set[str]] = {}
            for event in middleware.summary_events():
                windows.setdefault(event["data"]["to"], set()).add(event["id"])
            assert all(len(ids) == 1 for ids in windows.values()), "one summary id per window, restart included"
            assert min(datetime_seconds(t) for t in windows) >= started - 4

            # Resent at once under its id: the middleware receives it again.
            code, out, err = await plantgate(
                "reconcile", "--against", str(export), "-c", str(config), "--resend", "--json"
            )
            assert json.loads(out)["resent"] == [event_id(LOST)], (out, err)
            await wait_for(
                lambda: middleware.received_ids().count(event_id(LOST)) >= 2, message="the lost event resent"
            )
        finally:
            if plant.process is not None:
                assert await plant.kill(signal.SIGTERM) == 0
            await plant.client.aclose()

    # The stopped agent's file answers the same.
    answer = await trace_json(config, "WO-1")
    assert_whole_path(answer["entries"][0], middleware)
    code, out, _ = await plantgate("reconcile", "--against", str(export), "-c", str(config), "--json")
    assert code == 1 and json.loads(out)["missing_in_erp"] == [event_id(LOST)]
    code, _, err = await plantgate("trace", "WO-nothing", "-c", str(config))
    assert code == 1 and "nothing known" in err


def datetime_seconds(text: str) -> float:
    from agent.lineage import parse_time

    return parse_time(text)
