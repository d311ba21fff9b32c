"""The ``[[sources.mes]]`` config: paths, modes, secrets, summaries; and the demo MES against a real agent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.pipeline import Agent
from agent.registry import build_sources
from agent.settings import ConfigError, parse_settings
from protocols.mes import MesSourceConfig, parse_path
from protocols.mes.simulator import MesSimulator
from tests.build import context
from tests.peers.waiting import wait_for

MAPPING = {"type": "production.completed", "fields": {"work_order": "$.order"}}


def test_paths() -> None:
    assert parse_path("$") == ()
    assert parse_path("$.a.b") == ("a", "b")
    assert parse_path("$.items[0].x") == ("items", 0, "x")
    assert parse_path('$["odd key"].y') == ("odd key", "y")
    for bad in ("a.b", "$.", "$..a", "$[x]", "$.a b"):
        with pytest.raises(ValueError, match="not a field path"):
            parse_path(bad)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"mode": "poll"}, "needs url"),
        ({"mode": "webhook", "url": "http://mes/x"}, "apply only to mode"),
        ({"mode": "poll", "url": "ftp://mes/x"}, "not an http"),
        ({"mode": "poll", "url": "http://u:p@mes/x"}, "credentials"),
        ({"mode": "poll", "url": "http://mes/x", "mapping": "nope"}, "not a key of mappings"),
        ({"mode": "poll", "url": "http://mes/x", "username": "u"}, "needs password_file"),
        ({"mappings": {"a b": MAPPING}}, "mapping name"),
        ({"mappings": {"m": {**MAPPING, "type": "coffee.brewed"}}}, "not a canonical event type"),
        ({"mappings": {"m": {**MAPPING, "timezone": "Mars/Olympus"}}}, "not a known time zone"),
        ({"mappings": {"m": {**MAPPING, "fields": {"x": "order"}}}}, "not a field path"),
        ({"mappings": {"m": {**MAPPING, "optional": ["lot"]}}}, "not keys of fields"),
        ({"commit_timeout": 5}, "has no unit"),
    ],
)
def test_invalid_entries_name_the_problem(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MesSourceConfig.model_validate({"name": "mes", **entry})


def test_type_spelled_either_way_and_summary_masks_secrets(tmp_path: Path) -> None:
    mapping = {**MAPPING, "type": "io.plantgate.scrap.declared"}
    full = MesSourceConfig.model_validate({"name": "m", "mappings": {"x": mapping}})
    assert full.mappings["x"].type == "scrap.declared"
    (tmp_path / "secret").write_text("hunter2", encoding="utf-8")
    poll = MesSourceConfig.model_validate(
        {"name": "rest", "mode": "poll", "url": "http://mes.local/api", "bearer_token_file": "secret"}
    )
    summary = "\n".join(poll.describe(context(tmp_path)))
    assert "hunter2" not in summary and "(from file secret)" in summary
    warnings = poll.warnings()
    assert any("plain http" in w for w in warnings) and any("cursor" in w for w in warnings)
    assert poll.build(context(tmp_path)).name == "rest"


def test_build_errors_name_the_key(tmp_path: Path) -> None:
    no_token = parse_settings(f'[agent]\nsite = "s"\ndata_dir = "{tmp_path}"\n[[sources.mes]]\nname = "mes"\n')
    with pytest.raises(ConfigError, match="ingest_token_file"):
        build_sources(no_token)
    missing = MesSourceConfig.model_validate(
        {"name": "rest", "mode": "poll", "url": "https://mes.local/api", "bearer_token_file": "absent"}
    )
    with pytest.raises(ValueError, match=r"^bearer_token_file: cannot read"):
        missing.build(context(tmp_path))
    bad_ca = MesSourceConfig.model_validate(
        {"name": "rest", "mode": "poll", "url": "https://mes/x", "ca_file": "nope.pem"}
    )
    with pytest.raises(ValueError, match=r"^ca_file: cannot load"):
        bad_ca.build(context(tmp_path))


async def test_demo_mes_feeds_both_modes(tmp_path: Path) -> None:
    token = "demo-token"
    (tmp_path / "token").write_text(token, encoding="utf-8")
    async with MesSimulator(token=token, serve_rest=True, seed=7) as simulator:
        text = (
            f'[agent]\nsite = "demo"\nid = "gw"\ndata_dir = "{tmp_path}"\n'
            '[http]\nlisten = "127.0.0.1:0"\ningest_token_file = "token"\n'
            '[mappings.items]\n"P-100-OLD" = { obsolete = true }\n'
            + simulator.webhook_config("mes")
            + simulator.poll_config("mes-rest").replace('interval = "2s"', 'interval = "100ms"')
            + '[[sinks.jsonl]]\nname = "file"\npath = "events.jsonl"\n'
        )
        agent = Agent(parse_settings(text))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        demo_stop = asyncio.Event()
        try:
            await asyncio.wait_for(agent.wait_started(), 10)
            assert agent.http is not None
            simulator.agent_url = agent.http.url
            demo = asyncio.create_task(simulator.run_demo(demo_stop))
            out = tmp_path / "events.jsonl"

            def types() -> set[str]:
                if not out.exists():
                    return set()
                return {json.loads(line)["type"] for line in out.read_text(encoding="utf-8").splitlines()}

            wanted = {f"io.plantgate.{name}" for name in
                      ("workorder.released", "production.completed", "goods.received")}  # fmt: skip
            await wait_for(lambda: wanted <= types(), timeout=15, message=lambda: f"types so far {types()}")
            demo_stop.set()
            await asyncio.wait_for(demo, 10)
            assert simulator.sent > 0 and simulator.refused == 0
        finally:
            demo_stop.set()
            stop.set()
            await asyncio.wait_for(task, 30)


def test_one_webhook_per_agent(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t", encoding="utf-8")
    text = (
        f'[agent]\nsite = "s"\ndata_dir = "{tmp_path}"\n[http]\ningest_token_file = "token"\n'
        '[[sources.mes]]\nname = "mes-a"\n[[sources.mes]]\nname = "mes-b"\n'
    )
    with pytest.raises(ConfigError, match="already is the MES webhook") as error:
        build_sources(parse_settings(text))
    assert error.value.key == "sources.mes.1.mode"
