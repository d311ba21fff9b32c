"""The agent's HTTP surface, served for real on loopback and queried with httpx."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from agent.health import ComponentStatus
from agent.http_server import (
    HttpListenError,
    HttpServer,
    check_bearer,
    json_response,
    parse_listen,
    read_token_file,
    require_bearer,
)
from agent.metrics import Metrics
from tests.peers.waiting import wait_for

SOURCES = ["press7", "dock1"]
SINKS = {"cloud": ["transaction", "operational", "telemetry"], "erp": ["transaction"]}
TOKEN = "s3cret-ingest-token"


class StaticAgent:
    """A real ``AgentView``: plain state the test changes, no running pipeline behind it."""

    def __init__(self) -> None:
        self.metrics = Metrics(sources=SOURCES, sinks=SINKS, agent_id="line3-gw", site="plant-01", version="9.9.9")
        self.reason: str | None = "starting"
        self.degraded: list[dict[str, str]] = []
        self.depth = 0
        self.refreshes = 0
        self.sources = {name: ComponentStatus(name=name, kind="opcua") for name in SOURCES}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.reason is not None:
            return False, {"reason": self.reason}
        return True, {"degraded": self.degraded}

    def status(self) -> dict[str, Any]:
        return {"agent": "line3-gw", "sources": self.sources, "buffer": {"depth": self.depth}}

    async def refresh_metrics(self) -> None:
        self.refreshes += 1
        self.metrics.set_buffer({("cloud", "transaction"): (self.depth, 12.5 if self.depth else 0.0)})


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def key(metric: str, /, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return metric, frozenset(labels.items())


def http_client(server: HttpServer, **kwargs: Any) -> httpx.AsyncClient:
    # trust_env=False: a proxy configured in the environment must not intercept loopback.
    return httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=kwargs.pop("timeout", 10), **kwargs)


@pytest.fixture
def agent() -> StaticAgent:
    return StaticAgent()


@pytest.fixture
async def server(agent: StaticAgent) -> AsyncIterator[HttpServer]:
    async with HttpServer("127.0.0.1:0", agent) as http:
        yield http


@pytest.fixture
async def client(server: HttpServer) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(server) as http:
        yield http


# --- the built-in endpoints -------------------------------------------------------------------------------


async def test_healthz_answers_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok"}


async def test_readyz_is_503_with_reason_until_ready_then_200_with_degraded(
    client: httpx.AsyncClient, agent: StaticAgent
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"reason": "starting"}

    agent.reason = None
    agent.degraded = [{"component": "sink", "name": "cloud", "state": "reconnecting"}]
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"degraded": [{"component": "sink", "name": "cloud", "state": "reconnecting"}]}

    agent.reason = "buffer refusing writes: disk full"
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "buffer refusing writes: disk full"

    agent.reason = "stopping"
    assert (await client.get("/readyz")).status_code == 503


async def test_metrics_are_the_registrys_exposition_with_every_configured_series(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    values = samples(response.text)
    for source in SOURCES:
        assert values[key("plantgate_events_received_total", source=source, lane="transaction")] == 0
    for sink, lanes in SINKS.items():
        for lane in lanes:
            assert values[key("plantgate_buffer_depth_events", sink=sink, lane=lane)] == 0
            assert values[key("plantgate_events_delivered_total", sink=sink, lane=lane)] == 0
        assert values[key("plantgate_dead_letters_total", sink=sink, reason="rejected")] == 0


async def test_metrics_scrape_refreshes_gauges_first(client: httpx.AsyncClient, agent: StaticAgent) -> None:
    agent.depth = 42
    values = samples((await client.get("/metrics")).text)
    assert agent.refreshes == 1
    assert values[key("plantgate_buffer_depth_events", sink="cloud", lane="transaction")] == 42
    assert values[key("plantgate_buffer_oldest_age_seconds", sink="cloud", lane="transaction")] == 12.5

    agent.depth = 0  # drained: the snapshot is the whole truth, the gauges go back to 0
    values = samples((await client.get("/metrics")).text)
    assert agent.refreshes == 2
    assert values[key("plantgate_buffer_depth_events", sink="cloud", lane="transaction")] == 0
    assert values[key("plantgate_buffer_oldest_age_seconds", sink="cloud", lane="transaction")] == 0


async def test_status_is_the_views_document_as_json(client: httpx.AsyncClient, agent: StaticAgent) -> None:
    agent.depth = 3
    agent.sources["press7"].set_state("reconnecting", "connection refused")
    agent.sources["dock1"].set_state("connected")
    response = await client.get("/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["agent"] == "line3-gw"
    assert body["buffer"] == {"depth": 3}
    assert body["sources"]["press7"]["state"] == "reconnecting"
    assert body["sources"]["press7"]["last_error"] == "connection refused"
    assert body["sources"]["dock1"]["state"] == "connected"
    assert body["sources"]["dock1"]["last_error"] is None


async def test_unknown_path_is_404_and_wrong_method_405_as_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "not found"}
    response = await client.post("/healthz")
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed"}
    assert {method.strip() for method in response.headers["allow"].split(",")} == {"GET", "HEAD"}


async def test_head_answers_a_get_route_with_its_headers_and_no_body(client: httpx.AsyncClient) -> None:
    get = await client.get("/healthz")
    head = await client.head("/healthz")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == str(len(get.content))
    # the connection stays usable after a HEAD (no body was expected or sent)
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_no_access_log_line_per_request(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert (await client.get("/healthz")).status_code == 200
    assert [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("uvicorn", "agent"))] == []


# --- routes added from outside ----------------------------------------------------------------------------


async def test_added_routes_are_served_beside_the_built_in_ones(agent: StaticAgent) -> None:
    received: list[tuple[str, str, str, bytes, str]] = []

    async def ingest(request: Request) -> Response:
        body = await request.body()
        query, content_type = request.url.query, request.headers["content-type"]
        received.append((request.method, request.url.path, query, body, content_type))
        return json_response({"accepted": len(body)}, status=202, headers={"Location": "/v1/events/1"})

    async def stats(request: Request) -> Response:
        return json_response({"depth": 0})

    http = HttpServer("127.0.0.1:0", agent, routes=[Route("/v1/events", ingest, methods=["POST"])])
    http.add_routes([Route("/v1/buffer/stats", stats)])
    async with http, http_client(http) as client:
        body = b'{"work_order": "WO-4711", "quantity": 12}'
        response = await client.post("/v1/events?dry=1", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 202
        assert response.json() == {"accepted": len(body)}
        assert response.headers["location"] == "/v1/events/1"
        assert received == [("POST", "/v1/events", "dry=1", body, "application/json")]

        assert (await client.get("/v1/buffer/stats")).json() == {"depth": 0}
        assert (await client.get("/v1/events")).status_code == 405
        assert (await client.get("/healthz")).status_code == 200

        with pytest.raises(RuntimeError, match="before"):
            http.add_routes([Route("/late", stats)])


async def test_a_body_over_the_limit_is_413(agent: StaticAgent) -> None:
    received: list[int] = []

    async def ingest(request: Request) -> Response:
        received.append(len(await request.body()))
        return Response(status_code=204)

    routes = [Route("/v1/events", ingest, methods=["POST"])]
    http = HttpServer("127.0.0.1:0", agent, routes=routes, max_body_bytes=1000)
    async with http, http_client(http) as client:
        assert (await client.post("/v1/events", content=b"x" * 1000)).status_code == 204  # the limit itself is fine
        response = await client.post("/v1/events", content=b"x" * 1001)
        assert response.status_code == 413
        assert response.json()["error"] == "request entity too large"

        # chunked: no length up front, refused once what arrived passes the limit
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"y" * 500

        response = await client.post("/v1/events", content=chunks())
        assert response.status_code == 413
        assert response.json()["error"] == "request entity too large"
        assert received == [1000]
        assert (await client.get("/healthz")).status_code == 200  # and the server serves on


async def test_a_failing_handler_gives_500_is_logged_once_and_the_server_serves_on(
    agent: StaticAgent, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("the MES mapping blew up")

    http = HttpServer("127.0.0.1:0", agent, routes=[Route("/broken", broken)])
    async with http, http_client(http, limits=httpx.Limits(max_connections=1)) as client:
        with caplog.at_level(logging.ERROR):
            response = await client.get("/broken?x=1")
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error"}  # nothing of the exception leaks
        [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.name == "agent.http_server"
        assert record.getMessage() == "HTTP handler failed"
        assert (record.method, record.path) == ("GET", "/broken")  # type: ignore[attr-defined]
        assert record.exc_info is not None
        assert (await client.get("/healthz")).status_code == 200  # even on the same connection


# --- bearer token -----------------------------------------------------------------------------------------


@pytest.fixture
async def guarded(agent: StaticAgent, tmp_path: Path) -> AsyncIterator[HttpServer]:
    token_file = tmp_path / "ingest-token"
    token_file.write_text(TOKEN + "\n")
    token = read_token_file(token_file)

    @require_bearer(token)
    async def replay(request: Request) -> Response:
        return json_response({"replayed": 0})

    async def purge(request: Request) -> Response:
        check_bearer(request, token)
        return json_response({"purged": 0})

    routes = [Route("/v1/buffer/replay", replay, methods=["POST"]), Route("/v1/buffer/purge", purge, methods=["POST"])]
    async with HttpServer("127.0.0.1:0", agent, routes=routes) as http:
        yield http


@pytest.mark.parametrize("path", ["/v1/buffer/replay", "/v1/buffer/purge"])
async def test_bearer_token_guards_a_route(guarded: HttpServer, path: str) -> None:
    async with http_client(guarded) as client:
        missing = await client.post(path)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["error"] == "unauthorized"

        for wrong in (
            "Bearer nope",
            f"Bearer {TOKEN}x",
            f"Basic {TOKEN}",
            "Bearer",
            f"Bearer {TOKEN[:-1]}",
            "Bearer é",
        ):
            response = await client.post(path, headers={"Authorization": wrong.encode()})
            assert response.status_code == 401, wrong
            assert response.json()["error"] == "unauthorized"

        right = await client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
        assert right.json() in ({"replayed": 0}, {"purged": 0})
        assert (await client.post(path, headers={"Authorization": f"bearer  {TOKEN}"})).status_code == 200


def test_read_token_file_names_the_file_when_unusable(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=r"empty.*empty"):
        read_token_file(empty)
    with pytest.raises(ValueError, match="missing"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(ValueError):
        require_bearer("")


# --- lifecycle --------------------------------------------------------------------------------------------


async def test_stop_lets_an_in_flight_request_finish(agent: StaticAgent) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await release.wait()
        return PlainTextResponse("done")

    http = HttpServer("127.0.0.1:0", agent, routes=[Route("/slow", slow)], graceful_timeout=30)
    await http.start()
    port = http.port
    async with http_client(http, timeout=30) as client:
        request = asyncio.create_task(client.get("/slow"))
        await wait_for(entered.is_set, message="the slow handler was never entered")
        stopping = asyncio.create_task(http.stop())

        async def refused() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:  # accepted by the kernel as the listener closed: try again
                return False
            writer.close()
            return False

        await wait_for(refused, message="still accepting connections after stop()")
        assert not request.done() and not stopping.done()  # waiting on the request in flight
        started = time.monotonic()
        release.set()
        response = await asyncio.wait_for(request, 10)
        assert response.status_code == 200
        assert response.text == "done"
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - started < 5  # not the graceful timeout


async def test_stop_cuts_a_request_short_after_the_graceful_timeout(agent: StaticAgent) -> None:
    entered = asyncio.Event()

    async def stuck(request: Request) -> Response:
        entered.set()
        await asyncio.Event().wait()  # never returns
        raise AssertionError("unreachable")

    before = asyncio.all_tasks()
    http = HttpServer("127.0.0.1:0", agent, routes=[Route("/stuck", stuck)], graceful_timeout=0.2)
    await http.start()
    async with http_client(http, timeout=30) as client:
        request = asyncio.create_task(client.get("/stuck"))
        await wait_for(entered.is_set, message="the stuck handler was never entered")
        started = time.monotonic()
        await asyncio.wait_for(http.stop(), 10)
        assert time.monotonic() - started < 3  # the graceful timeout, not the handler, decides
        assert asyncio.all_tasks() - {request} == before  # the cut-short request's task is over too
        response = await asyncio.wait_for(request, 10)
        assert response.status_code == 503
        assert response.json() == {"error": "service unavailable", "detail": "the agent is stopping"}


async def test_stop_closes_idle_keep_alive_connections_promptly(agent: StaticAgent) -> None:
    http = HttpServer("127.0.0.1:0", agent, graceful_timeout=30)
    await http.start()
    async with http_client(http) as client:
        assert (await client.get("/healthz")).status_code == 200  # leaves a kept-alive connection
        started = time.monotonic()
        await http.stop()
        # an idle connection is closed at once, not waited on for the graceful timeout
        assert time.monotonic() - started < 5


async def test_stop_closes_the_port_and_is_idempotent(agent: StaticAgent) -> None:
    http = HttpServer("127.0.0.1:0", agent)
    await http.start()
    port = http.port
    await http.stop()
    await http.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    # and the port can be bound again at once (nothing left listening)
    async with HttpServer(f"127.0.0.1:{port}", agent) as again:
        assert again.port == port


async def test_port_in_use_is_a_clear_error_naming_the_address(server: HttpServer, agent: StaticAgent) -> None:
    listen = f"127.0.0.1:{server.port}"
    second = HttpServer(listen, agent)
    with pytest.raises(HttpListenError) as caught:
        await second.start()
    assert caught.value.address == listen
    assert listen in str(caught.value)
    assert "in use" in str(caught.value)
    await second.stop()  # nothing to stop: harmless
    # the first server is unaffected
    async with http_client(server) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_unresolvable_host_is_a_listen_error(agent: StaticAgent) -> None:
    # .invalid is reserved (RFC 2606): it never resolves
    http = HttpServer("no-such-host.invalid:0", agent)
    with pytest.raises(HttpListenError, match=r"no-such-host\.invalid:0"):
        await http.start()


async def test_serving_runs_one_background_task_and_stop_leaves_none(agent: StaticAgent) -> None:
    # uvicorn's tick (Date header, exit flag) is the only task while idle; stop() ends it.
    before = asyncio.all_tasks()
    http = HttpServer("127.0.0.1:0", agent)
    async with http:
        assert [task.get_name() for task in asyncio.all_tasks() - before] == ["http-server"]
        async with http_client(http) as client:
            assert (await client.get("/healthz")).status_code == 200
        # the client is gone: its request's task ends, and nothing else is left behind
        await wait_for(lambda: len(asyncio.all_tasks() - before) == 1, message=lambda: f"{asyncio.all_tasks()}")
    assert asyncio.all_tasks() == before


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9480") == ("127.0.0.1", 9480)
    assert parse_listen("[::1]:9480") == ("::1", 9480)
    assert parse_listen(":9480") == ("", 9480)
    for bad in ("9480", "host:", "host:http", "::1:9480", "host:70000"):
        with pytest.raises(ValueError, match=r"host:port|brackets"):
            parse_listen(bad)


async def test_ipv6_loopback_when_available(agent: StaticAgent) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this build")
    http = HttpServer("[::1]:0", agent)
    try:
        await http.start()
    except HttpListenError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert http.url.startswith("http://[::1]:")
        async with http_client(http) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
    finally:
        await http.stop()


def test_the_agent_does_not_load_aiohttp() -> None:
    # The server is Starlette + uvicorn: aiohttp.web alone cost about 15 MB RSS.
    code = "import sys, agent.pipeline, agent.cli; print(sorted(m for m in sys.modules if m.startswith('aiohttp')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
