"""The agent's HTTP surface, served for real on loopback and queried with httpx."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.health import ComponentStatus
from agent.http_server import HttpListenError, HttpServer, Request, Response, Route, parse_listen
from agent.metrics import DEAD_LETTER_REASONS, LATENCY_BUCKETS, PRE_SINK, Metrics
from tests.peers.waiting import wait_for

SOURCES = ["press7", "dock1"]
SINKS = {"cloud": ["transaction", "operational", "telemetry"], "erp": ["transaction"]}
LANES = ("transaction", "operational", "telemetry")

CONTRACT_METRICS = {
    # family name as the parser reports it -> its type
    "plantgate_events_received": "counter",
    "plantgate_events_delivered": "counter",
    "plantgate_dead_letters": "counter",
    "plantgate_buffer_depth_events": "gauge",
    "plantgate_buffer_oldest_age_seconds": "gauge",
    "plantgate_delivery_latency_seconds": "histogram",
    "plantgate_delivery_retries": "counter",
    "plantgate_duplicates_suppressed": "counter",
    "plantgate_telemetry_evicted_events": "counter",
    "plantgate_telemetry_evicted_samples": "counter",
    "plantgate_telemetry_suppressed": "counter",
    "plantgate_connection_up": "gauge",
    "plantgate_buffer_size_bytes": "gauge",
    "plantgate_buffer_refusing_writes": "gauge",
    "plantgate_info": "gauge",
}


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
    """(sample name, labels) -> value, from the Prometheus text format via prometheus_client's parser."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def key(metric: str, /, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return metric, frozenset(labels.items())


@pytest.fixture
def agent() -> StaticAgent:
    return StaticAgent()


@pytest.fixture
async def server(agent: StaticAgent) -> AsyncIterator[HttpServer]:
    http = HttpServer("127.0.0.1:0", agent)
    await http.start()
    try:
        yield http
    finally:
        await http.stop()


@pytest.fixture
async def client(server: HttpServer) -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: a proxy configured in the environment must not intercept loopback.
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as http:
        yield http


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


async def test_metrics_expose_every_contract_series_from_start_up(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")

    families = {family.name: family.type for family in text_string_to_metric_families(response.text)}
    for name, kind in CONTRACT_METRICS.items():
        assert families.get(name) == kind, f"{name} missing or not a {kind}"

    values = samples(response.text)
    for source in SOURCES:
        for lane in LANES:
            assert values[key("plantgate_events_received_total", source=source, lane=lane)] == 0
        assert values[key("plantgate_duplicates_suppressed_total", source=source)] == 0
        assert values[key("plantgate_telemetry_suppressed_total", source=source)] == 0
        assert values[key("plantgate_connection_up", component="source", name=source)] == 0
    for sink, lanes in SINKS.items():
        for lane in lanes:
            assert values[key("plantgate_events_delivered_total", sink=sink, lane=lane)] == 0
            assert values[key("plantgate_buffer_depth_events", sink=sink, lane=lane)] == 0
            assert values[key("plantgate_buffer_oldest_age_seconds", sink=sink, lane=lane)] == 0
            assert values[key("plantgate_delivery_latency_seconds_count", sink=sink, lane=lane)] == 0
        assert values[key("plantgate_delivery_retries_total", sink=sink)] == 0
        assert values[key("plantgate_connection_up", component="sink", name=sink)] == 0
    # erp takes transactions only: no series for lanes it never carries
    assert key("plantgate_events_delivered_total", sink="erp", lane="telemetry") not in values
    for sink in [*SINKS, PRE_SINK]:
        for reason in DEAD_LETTER_REASONS:
            assert values[key("plantgate_dead_letters_total", sink=sink, reason=reason)] == 0
    assert values[key("plantgate_telemetry_evicted_events_total")] == 0
    assert values[key("plantgate_telemetry_evicted_samples_total")] == 0
    assert values[key("plantgate_buffer_size_bytes")] == 0
    assert values[key("plantgate_buffer_refusing_writes")] == 0
    assert values[key("plantgate_info", version="9.9.9", agent="line3-gw", site="plant-01")] == 1
    if sys.platform == "linux":  # the process collector reads /proc
        assert values[key("process_cpu_seconds_total")] > 0
        assert values[key("process_resident_memory_bytes")] > 0


async def test_metrics_count_what_the_pipeline_reports(client: httpx.AsyncClient, agent: StaticAgent) -> None:
    metrics = agent.metrics
    metrics.received("press7", "transaction", 3)
    metrics.received("press7", "transaction", 2)
    metrics.received("agent", "operational", 1)  # a source outside the config is created on first use
    metrics.delivered("cloud", "transaction", 4)
    metrics.observe_latency("cloud", "transaction", [0.0005, 0.003, 0.2, 45.0, -1.0])
    metrics.dead_lettered("erp", "rejected", 2)
    metrics.dead_lettered("erp", 'HTTP 422: {"item": "unknown"}')  # free text must not become a label
    metrics.retried("cloud", 7)
    metrics.duplicates_suppressed("dock1")
    metrics.telemetry_suppressed("press7", 10)
    metrics.telemetry_evicted(events=5, samples=50)
    metrics.set_connection("sink", "cloud", True)
    metrics.set_buffer_size(4096)
    metrics.set_refusing_writes(True)

    values = samples((await client.get("/metrics")).text)
    assert values[key("plantgate_events_received_total", source="press7", lane="transaction")] == 5
    assert values[key("plantgate_events_received_total", source="press7", lane="telemetry")] == 0
    assert values[key("plantgate_events_received_total", source="agent", lane="operational")] == 1
    assert values[key("plantgate_events_delivered_total", sink="cloud", lane="transaction")] == 4
    assert values[key("plantgate_dead_letters_total", sink="erp", reason="rejected")] == 2
    assert values[key("plantgate_dead_letters_total", sink="erp", reason="other")] == 1
    assert not any(labels and dict(labels).get("reason", "").startswith("HTTP") for _, labels in values)
    assert values[key("plantgate_delivery_retries_total", sink="cloud")] == 7
    assert values[key("plantgate_duplicates_suppressed_total", source="dock1")] == 1
    assert values[key("plantgate_telemetry_suppressed_total", source="press7")] == 10
    assert values[key("plantgate_telemetry_evicted_events_total")] == 5
    assert values[key("plantgate_telemetry_evicted_samples_total")] == 50
    assert values[key("plantgate_connection_up", component="sink", name="cloud")] == 1
    assert values[key("plantgate_connection_up", component="sink", name="erp")] == 0
    assert values[key("plantgate_buffer_size_bytes")] == 4096
    assert values[key("plantgate_buffer_refusing_writes")] == 1

    def latency(suffix: str, **labels: str) -> float:
        name = "plantgate_delivery_latency_seconds_" + suffix
        return values[key(name, sink="cloud", lane="transaction", **labels)]

    def bucket(le: str) -> float:
        return latency("bucket", le=le)

    # cumulative "less or equal" buckets; the negative latency (clock step) counts as 0
    assert bucket("0.001") == 2
    assert bucket("0.005") == 3
    assert bucket("0.25") == 4
    assert bucket("30.0") == 4
    assert bucket("60.0") == 5
    assert bucket("+Inf") == 5
    assert len(LATENCY_BUCKETS) + 1 == sum(
        1 for name, labels in values if name.endswith("_bucket") and ("sink", "erp") in labels
    )
    assert latency("count") == 5
    assert latency("sum") == pytest.approx(45.2035)


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


def test_set_buffer_zeroes_label_sets_missing_from_the_snapshot() -> None:
    metrics = Metrics(sources=[], sinks={"cloud": ["transaction"]}, agent_id="a", site="s", version="v")
    metrics.set_buffer({("cloud", "transaction"): (3, 9.0), ("removed-sink", "telemetry"): (8, 60.0)})
    values = samples(metrics.render()[0].decode())
    assert values[key("plantgate_buffer_depth_events", sink="removed-sink", lane="telemetry")] == 8
    metrics.set_buffer({("cloud", "transaction"): (1, 2.0)})  # the orphaned backlog was purged
    values = samples(metrics.render()[0].decode())
    assert values[key("plantgate_buffer_depth_events", sink="removed-sink", lane="telemetry")] == 0
    assert values[key("plantgate_buffer_oldest_age_seconds", sink="removed-sink", lane="telemetry")] == 0
    assert values[key("plantgate_buffer_depth_events", sink="cloud", lane="transaction")] == 1
    assert values[key("plantgate_buffer_oldest_age_seconds", sink="cloud", lane="transaction")] == 2.0


def test_two_agents_in_one_process_keep_separate_registries() -> None:
    first = Metrics(sources=["a"], sinks={}, agent_id="one", site="s", version="v")
    second = Metrics(sources=["a"], sinks={}, agent_id="two", site="s", version="v")
    first.received("a", "transaction", 1)
    values = samples(second.render()[0].decode())
    assert values[key("plantgate_events_received_total", source="a", lane="transaction")] == 0


async def test_status_is_the_views_document_as_json(client: httpx.AsyncClient, agent: StaticAgent) -> None:
    agent.depth = 3
    agent.sources["press7"].set_state("reconnecting", "connection refused")
    agent.sources["dock1"].set_state("connected")
    response = await client.get("/status")
    assert response.status_code == 200
    body = response.json()
    assert body["agent"] == "line3-gw"
    assert body["buffer"] == {"depth": 3}
    assert body["sources"]["press7"]["state"] == "reconnecting"
    assert body["sources"]["press7"]["last_error"] == "connection refused"
    assert body["sources"]["dock1"]["state"] == "connected"
    assert body["sources"]["dock1"]["last_error"] is None


async def test_unknown_path_is_404_and_wrong_method_405(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nope")).status_code == 404
    response = await client.post("/healthz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_extra_routes_are_served_beside_the_built_in_ones(agent: StaticAgent) -> None:
    received: list[Request] = []

    async def ingest(request: Request) -> Response:
        received.append(request)
        return Response(f"got {len(request.body)} bytes".encode(), status=202, headers={"Location": "/v1/events/1"})

    http = HttpServer(
        "127.0.0.1:0", agent, extra_routes=[Route("/v1/events", ingest, methods=("POST",))], max_body_bytes=1000
    )
    async with http, httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=10) as client:
        body = b'{"work_order": "WO-4711", "quantity": 12}'
        response = await client.post(
            "/v1/events?dry=1", content=body, headers={"Content-Type": "application/json", "X-Trace": "abc"}
        )
        assert response.status_code == 202
        assert response.text == f"got {len(body)} bytes"
        assert response.headers["location"] == "/v1/events/1"
        [request] = received
        assert (request.method, request.path, request.query) == ("POST", "/v1/events", "dry=1")
        assert request.body == body
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-trace"] == "abc"

        # a chunked body (no length up front) arrives whole too
        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"[1,", b"2,", b"3]"):
                yield part

        assert (await client.post("/v1/events", content=chunks())).status_code == 202
        assert received[-1].body == b"[1,2,3]"
        assert received[-1].headers["transfer-encoding"] == "chunked"

        assert (await client.get("/v1/events")).status_code == 405
        assert (await client.get("/healthz")).status_code == 200


async def test_a_body_over_the_limit_is_413_and_never_reaches_the_handler(agent: StaticAgent) -> None:
    received: list[Request] = []

    async def ingest(request: Request) -> Response:
        received.append(request)
        return Response(status=204)

    http = HttpServer(
        "127.0.0.1:0", agent, extra_routes=[Route("/v1/events", ingest, methods=("POST",))], max_body_bytes=1000
    )
    async with http, httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=10) as client:
        assert (await client.post("/v1/events", content=b"x" * 1000)).status_code == 204  # the limit itself is fine
        # declared too large: refused from the headers, the body is not read
        response = await client.post("/v1/events", content=b"x" * 1001)
        assert response.status_code == 413
        assert response.json()["error"]
        big = await client.post("/v1/events", content=b"x" * (4 * 1024 * 1024))
        assert big.status_code == 413

        # chunked: refused once what arrived passes the limit
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"y" * 500

        assert (await client.post("/v1/events", content=chunks())).status_code == 413
        assert len(received) == 1
        assert (await client.get("/healthz")).status_code == 200  # and the server serves on


async def test_head_answers_a_get_route_with_its_headers_and_no_body(client: httpx.AsyncClient) -> None:
    get = await client.get("/healthz")
    head = await client.head("/healthz")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == str(len(get.content))
    # the connection stays usable after a HEAD (no body was expected or sent)
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_keep_alive_serves_several_requests_on_one_connection(server: HttpServer) -> None:
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10, limits=limits) as client:
        first = await client.get("/healthz")
        second = await client.get("/status")
        assert (first.status_code, second.status_code) == (200, 200)
        assert "connection" not in first.headers  # HTTP/1.1: persistent unless said otherwise

        def local_address(response: httpx.Response) -> Any:
            return response.extensions["network_stream"].get_extra_info("client_addr")

        assert local_address(first) == local_address(second)  # the same TCP connection


async def raw_exchange(server: HttpServer, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()  # until EOF
    finally:
        writer.close()


async def test_a_malformed_request_gets_400_and_the_server_serves_on(
    server: HttpServer, client: httpx.AsyncClient
) -> None:
    answer = await raw_exchange(server, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"error":"bad request"' in answer

    # headers far too large: 431, from h11's own limit
    answer = await raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * 70000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")

    assert (await client.get("/healthz")).status_code == 200


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    answer = await raw_exchange(
        server,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"404", b"200"]


async def test_a_failing_handler_gives_500_is_logged_once_and_the_server_serves_on(
    agent: StaticAgent, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("the MES mapping blew up")

    http = HttpServer("127.0.0.1:0", agent, extra_routes=[Route("/broken", broken)])
    limits = httpx.Limits(max_connections=1)
    async with http, httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=10, limits=limits) as client:
        with caplog.at_level(logging.ERROR, logger="agent.http_server"):
            response = await client.get("/broken?x=1")
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error"}  # nothing of the exception leaks
        [record] = [r for r in caplog.records if r.name == "agent.http_server"]
        assert record.getMessage() == "HTTP handler failed"
        assert (record.method, record.path) == ("GET", "/broken")  # type: ignore[attr-defined]
        assert record.exc_info is not None
        assert (await client.get("/healthz")).status_code == 200  # even on the same connection


async def test_stop_lets_an_in_flight_request_finish(agent: StaticAgent) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await release.wait()
        return Response(b"done")

    http = HttpServer("127.0.0.1:0", agent, extra_routes=[Route("/slow", slow)], graceful_timeout=30)
    await http.start()
    port = http.port
    async with httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=30) as client:
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
        assert response.headers["connection"] == "close"
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - started < 5  # not the graceful timeout


async def test_stop_cuts_a_request_short_after_the_graceful_timeout(agent: StaticAgent) -> None:
    entered = asyncio.Event()

    async def stuck(request: Request) -> Response:
        entered.set()
        await asyncio.Event().wait()  # never returns
        raise AssertionError("unreachable")

    http = HttpServer("127.0.0.1:0", agent, extra_routes=[Route("/stuck", stuck)], graceful_timeout=0.2)
    await http.start()
    async with httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=30) as client:
        request = asyncio.create_task(client.get("/stuck"))
        await wait_for(entered.is_set, message="the stuck handler was never entered")
        await asyncio.wait_for(http.stop(), 10)
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(request, 10)


async def test_connections_beyond_the_limit_are_closed_at_once(agent: StaticAgent) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    async def answer(http: HttpServer) -> bytes:
        try:
            return await raw_exchange(http, request)
        except ConnectionResetError:  # closed with our request unread: the kernel resets
            return b""

    async with HttpServer("127.0.0.1:0", agent, max_connections=2) as http:
        clients = [httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=10) for _ in range(2)]
        try:
            for client in clients:  # each holds one kept-alive connection
                assert (await client.get("/healthz")).status_code == 200
            assert await answer(http) == b""  # the third is closed without an answer
            assert (await clients[0].get("/healthz")).status_code == 200  # the others are served on
        finally:
            for client in clients:
                await client.aclose()

        async def served() -> bool:
            return (await answer(http)).startswith(b"HTTP/1.1 200 ")

        await wait_for(served, message="no connection accepted after the others closed")


async def test_silent_connections_are_closed(agent: StaticAgent) -> None:
    async with HttpServer("127.0.0.1:0", agent, keep_alive_timeout=0.2, header_timeout=0.5) as http:
        # idle keep-alive after a request
        answer = await raw_exchange(http, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        # headers that never complete (a slow-loris client)
        assert await raw_exchange(http, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") == b""
        # a connection that never says anything
        assert await raw_exchange(http, b"") == b""


async def test_port_in_use_is_a_clear_error_naming_the_address(server: HttpServer, agent: StaticAgent) -> None:
    listen = f"127.0.0.1:{server.port}"
    second = HttpServer(listen, agent)
    with pytest.raises(HttpListenError) as caught:
        await second.start()
    assert caught.value.address == listen
    assert listen in str(caught.value)
    assert "in use" in str(caught.value)
    # the first server is unaffected
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_stop_closes_the_port(agent: StaticAgent) -> None:
    http = HttpServer("127.0.0.1:0", agent)
    await http.start()
    port = http.port
    await http.stop()
    await http.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    # and the port can be bound again at once (SO_REUSEADDR, nothing left listening)
    again = HttpServer(f"127.0.0.1:{port}", agent)
    async with again:
        assert again.port == port


async def test_stop_closes_idle_keep_alive_connections_promptly(agent: StaticAgent) -> None:
    http = HttpServer("127.0.0.1:0", agent, graceful_timeout=30)
    await http.start()
    async with httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200  # leaves a kept-alive connection
        started = time.monotonic()
        await http.stop()
        # an idle connection is closed at once, not waited on for the graceful timeout
        assert time.monotonic() - started < 5


async def test_serving_starts_no_background_task(agent: StaticAgent) -> None:
    # The idle CPU budget is 0.01 core: nothing may run, or wake up, while no client is connected.
    before = asyncio.all_tasks()
    async with HttpServer("127.0.0.1:0", agent) as http:
        assert asyncio.all_tasks() == before
        async with httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert len(asyncio.all_tasks()) == len(before) + 1  # the kept-alive connection's coroutine
        # the client is gone: its connection's task ends, and nothing is left behind
        await wait_for(lambda: asyncio.all_tasks() == before, message=lambda: f"tasks left: {asyncio.all_tasks()}")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9480") == ("127.0.0.1", 9480)
    assert parse_listen("[::1]:9480") == ("::1", 9480)
    assert parse_listen(":9480") == ("", 9480)
    for bad in ("9480", "host:", "host:http", "::1:9480", "host:70000"):
        with pytest.raises(ValueError, match=r"host:port|brackets"):
            parse_listen(bad)


async def test_unresolvable_host_is_a_listen_error(agent: StaticAgent) -> None:
    # .invalid is reserved (RFC 2606): it never resolves
    http = HttpServer("no-such-host.invalid:0", agent)
    with pytest.raises(HttpListenError, match=r"no-such-host\.invalid:0"):
        await http.start()


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
        async with httpx.AsyncClient(base_url=http.url, trust_env=False, timeout=10) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
    finally:
        await http.stop()
