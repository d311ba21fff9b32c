"""The demo's receiver as the ERP's middleware: references in its answers, outcomes reported to the agent.

The receiver is sent real batches over HTTP; the "agent" it reports to is a real
HTTP server on loopback that records what ``POST /v1/outcomes`` receives and
answers as the contract says (or 404, or not at all).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocols.https.receiver import REJECTION_REASON, DemoReceiver
from tests.peers.waiting import wait_for

HOST = "127.0.0.1"
TOKEN = "outcome-token-1234"
BATCH = "application/cloudevents-batch+json"


class OutcomesPeer:
    """The agent's ``/v1/outcomes`` as the contract has it: bearer token, one object or a list, per-id results."""

    def __init__(self, *, port: int = 0, answer: int = 200) -> None:
        self.port = port
        self.answer = answer
        self.reports: list[dict[str, Any]] = []
        self.refused = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _outcomes(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            self.refused += 1
            return JSONResponse({"error": "unauthorized"}, 401)
        if self.answer != 200:
            return JSONResponse({"error": "not here"}, self.answer)
        body = await request.json()
        reports = body if isinstance(body, list) else [body]
        self.reports.extend(reports)
        return JSONResponse({"results": [{"id": report["id"], "result": "recorded"} for report in reports]})

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        sock.listen(16)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        app = Starlette(routes=[Route("/v1/outcomes", self._outcomes, methods=["POST"])])
        config = uvicorn.Config(app, loop="none", lifespan="off", log_config=None, access_log=False, ws="none")
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server, self._sock = server, sock
        self._task = asyncio.create_task(server.main_loop())

    async def stop(self) -> None:
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        if server is None or task is None or sock is None:
            return
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await server.shutdown(sockets=[sock])
        sock.close()


def event(n: int, kind: str = "production.completed", **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"ev-{kind}-{n}",
        "source": "plantgate/demo-plant/demo-gw/press7",
        "type": f"io.plantgate.{kind}",
        "subject": f"WO-{n}",
        "data": {"work_order": f"WO-{n}", **data},
    }


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


async def test_references_come_back_and_the_erp_outcomes_reach_the_agent(client: httpx.AsyncClient) -> None:
    peer = OutcomesPeer()
    await peer.start()
    receiver = DemoReceiver(middleware=True, agent_url=peer.url, token=TOKEN, reject_every=3, outcome_delay=0.05)
    await receiver.start()
    try:
        batch = [event(n) for n in range(1, 5)] + [event(9, "machine.state.changed")]
        answer = await client.post(receiver.url, json=batch, headers={"content-type": BATCH})
        assert answer.status_code == 200
        references = answer.json()["references"]
        assert set(references) == {e["id"] for e in batch}
        assert len(set(references.values())) == 5 and all(r.startswith("ERP-") for r in references.values())
        # The same id again gets the same reference (a redelivery after a lost answer).
        again = await client.post(receiver.url, json=batch[:1], headers={"content-type": BATCH})
        assert again.json()["references"] == {batch[0]["id"]: references[batch[0]["id"]]}

        await wait_for(
            lambda: {r["id"] for r in peer.reports} >= {e["id"] for e in batch[:4]},
            message=lambda: f"reports: {peer.reports}",
        )
        by_id = {r["id"]: r for r in peer.reports}
        third = batch[2]["id"]
        assert by_id[third] == {"id": third, "outcome": "rejected", "reason": REJECTION_REASON}
        first = batch[0]["id"]
        assert by_id[first] == {
            "id": first,
            "outcome": "posted",
            "reference": "DOC-" + references[first].removeprefix("ERP-"),
        }
        # An operational event gets a reference but no business outcome.
        assert batch[4]["id"] not in by_id
        assert (receiver.posted, receiver.rejected) == (3, 1)
        await wait_for(lambda: receiver.outcomes_recorded >= 4 and not receiver.pending_outcomes)
        assert peer.refused == 0
        rejected = [d for d in receiver.decisions if d.outcome == "rejected"]
        assert [(d.id, d.work_order) for d in rejected] == [(third, "WO-3")]

        # Replayed once the period is open again: posted under the same id and reference.
        peer.reports.clear()
        replay = await client.post(receiver.url, json=[batch[2]], headers={"content-type": BATCH})
        assert replay.json()["references"] == {third: references[third]}
        await wait_for(lambda: any(r["id"] == third for r in peer.reports))
        assert [r for r in peer.reports if r["id"] == third] == [
            {"id": third, "outcome": "posted", "reference": "DOC-" + references[third].removeprefix("ERP-")}
        ]
        assert (receiver.posted, receiver.rejected) == (4, 1)
    finally:
        await receiver.stop()
        await peer.stop()


async def test_an_agent_without_outcomes_is_counted_not_retried(client: httpx.AsyncClient) -> None:
    peer = OutcomesPeer(answer=404)
    await peer.start()
    receiver = DemoReceiver(middleware=True, agent_url=peer.url, token=TOKEN, outcome_delay=0.01, retry_interval=0.05)
    await receiver.start()
    try:
        answer = await client.post(receiver.url, json=[event(1), event(2)], headers={"content-type": BATCH})
        assert answer.status_code == 200 and len(answer.json()["references"]) == 2
        await wait_for(
            lambda: receiver.outcomes_not_supported == 2,
            message=lambda: f"not supported {receiver.outcomes_not_supported}",
        )
        assert receiver.pending_outcomes == 0 and receiver.outcomes_failed == 0
        # A request the agent refuses as such (400) is not sent again either.
        peer.answer = 400
        await client.post(receiver.url, json=[event(3)], headers={"content-type": BATCH})
        await wait_for(lambda: receiver.outcomes_unknown == 1, message=lambda: f"unknown {receiver.outcomes_unknown}")
        assert receiver.pending_outcomes == 0 and receiver.outcomes_failed == 0
        assert receiver.outcomes_not_supported == 2
    finally:
        await receiver.stop()
        await peer.stop()


async def test_reports_wait_for_an_agent_that_is_not_there_yet(client: httpx.AsyncClient) -> None:
    peer = OutcomesPeer(port=free_port())
    receiver = DemoReceiver(middleware=True, agent_url=peer.url, token=TOKEN, outcome_delay=0.01, retry_interval=0.05)
    await receiver.start()
    try:
        await client.post(receiver.url, json=[event(n) for n in range(1, 4)], headers={"content-type": BATCH})
        await wait_for(lambda: receiver.outcomes_failed >= 2, message="the receiver tries to report")
        assert receiver.pending_outcomes == 3
        await peer.start()
        await wait_for(lambda: len(peer.reports) == 3, message=lambda: f"reports: {peer.reports}")
        assert [r["id"] for r in peer.reports] == [event(n)["id"] for n in range(1, 4)]
        await wait_for(lambda: receiver.pending_outcomes == 0)
    finally:
        await receiver.stop()
        await peer.stop()


async def test_without_middleware_the_answer_has_no_references(client: httpx.AsyncClient) -> None:
    receiver = DemoReceiver()
    await receiver.start()
    try:
        answer = await client.post(receiver.url, json=[event(1)], headers={"content-type": BATCH})
        assert answer.json() == {"accepted": 1}
        assert receiver.posted == 0 and receiver.pending_outcomes == 0
    finally:
        await receiver.stop()
