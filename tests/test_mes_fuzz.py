"""The MES webhook under garbage: never a 5xx, never a reset connection, never a crash.

The agent runs as a child process (``plantgate run``); hypothesis sends it random
bytes, truncated and mangled events, deep nesting, bodies over the limit and
wrong content types, over real sockets. Every answer must be a 2xx or 4xx, and the
agent must be alive and ready at the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.peers.mosquitto import free_port

TOKEN = "fuzz-token"
MAX_BODY = 65536
CONTENT_TYPES = [
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "application/json",
    "application/cloudevents+json; charset=utf-8",
    "application/cloudevents-batch+json; charset=latin-1",
    "text/plain",
    "",
    "multipart/form-data; boundary=x",
    "application/cloudevents+json;;;",
]

CONFIG = """
[agent]
site = "plant-fuzz"
id = "gw-fuzz"
data_dir = "{data_dir}"
log_level = "ERROR"

[http]
listen = "127.0.0.1:{port}"
ingest_token_file = "token"
max_body_bytes = {max_body}

[[sources.mes]]
name = "mes"

  [sources.mes.mappings.native]
  type = "goods.received"
  items = "$.lines"
  id = "$.id"
  fields = {{ item = "$.item", quantity = "$.qty" }}
  uom = "EA"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def valid_event(n: int) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"fuzz-ok-{n}",
        "source": "mes://fuzz",
        "type": "io.plantgate.goods.received",
        "time": "2026-12-04T08:00:00Z",
        "data": {"item": "A-1", "quantity": {"value": "1", "uom": "EA"}},
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@st.composite
def mangled_events(draw: st.DrawFn) -> bytes:
    """A valid event or batch with one attribute replaced by any JSON value, or dropped."""
    event = valid_event(draw(st.integers(0, 10**6)))
    key = draw(st.sampled_from([*event, "data", "extra"]))
    if draw(st.booleans()):
        event.pop(key, None)
    else:
        event[key] = draw(json_values)
    body = event if draw(st.booleans()) else [valid_event(0), event]
    return json.dumps(body).encode()


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    body = json.dumps([valid_event(n) for n in range(draw(st.integers(1, 5)))]).encode()
    return body[: draw(st.integers(0, len(body) - 1))]


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 5000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = (opener * depth + "1" + closer * depth).encode()
    wrap = draw(st.booleans())
    if wrap:
        event = json.dumps(valid_event(1)).encode()
        return event[:-1] + b', "ext": ' + inner + b"}"
    return inner


@st.composite
def huge(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(MAX_BODY - 64, MAX_BODY * 4))
    return b"[" + b'"x",' * (size // 4) + b'"x"]'


bodies = st.one_of(st.binary(max_size=2000), mangled_events(), truncated(), deep(), huge())


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("mes-fuzz")
    (data_dir / "token").write_text(TOKEN, encoding="utf-8")
    port = free_port()
    config = data_dir / "plantgate.toml"
    config.write_text(CONFIG.format(data_dir=data_dir, port=port, max_body=MAX_BODY), encoding="utf-8")
    log = (data_dir / "agent.log").open("ab")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "plantgate"), "run", "-c", str(config)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "the agent exited at start"
            assert time.monotonic() < deadline, "the agent did not become ready"
            time.sleep(0.05)  # polling a child process's readiness with a deadline
        yield url
        assert process.poll() is None, "the agent crashed under garbage input"
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        status = httpx.get(f"{url}/status", timeout=5).json()
        assert status["tasks"]["source-mes"]["restarts"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=st.sampled_from(CONTENT_TYPES), path=st.sampled_from(["/v1/events", "/v1/mes/native"]))
def test_garbage_never_gets_a_5xx_or_a_reset(agent_url: str, body: bytes, content_type: str, path: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    response = httpx.post(agent_url + path, content=body, headers=headers, timeout=10)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["error"]  # a clear error, as JSON
    if len(body) > MAX_BODY:
        assert response.status_code in (401, 413, 415)
