"""docs/metrics.md and docs/alerts.yml against what a running agent exposes."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from agent.pipeline import Agent
from agent.settings import parse_settings

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONFIG = """
[agent]
site = "plant-docs"
id = "gw-docs"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def catalogue() -> dict[str, str]:
    """Metric name -> its row's labels cell, from docs/metrics.md."""
    rows: dict[str, str] = {}
    for line in (DOCS / "metrics.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| `(plantgate_\w+)` \| (\w+) \|([^|]*)\|", line)
        if match:
            rows[match.group(1)] = match.group(3)
    return rows


async def exposed(tmp_path: Path) -> str:
    agent = Agent(parse_settings(CONFIG.format(data_dir=tmp_path)), sources=[])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        assert agent.http is not None
        async with httpx.AsyncClient(base_url=agent.http.url) as client:
            return (await client.get("/metrics")).text
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_every_exposed_metric_is_in_the_catalogue_and_every_catalogued_one_is_exposed(tmp_path: Path) -> None:
    text = await exposed(tmp_path)
    declared = re.findall(r"^# TYPE (plantgate_\w+) \w+$", text, re.MULTILINE)
    families = {name for name in declared if not name.endswith("_created")}
    documented = catalogue()
    assert families == set(documented), (
        f"exposed but not documented: {sorted(families - set(documented))}; "
        f"documented but not exposed: {sorted(set(documented) - families)}"
    )
    # Every label a series carries is named in its row.
    for name in families:
        labels = set()
        for series in re.findall(rf"^{name}(?:_bucket|_count|_sum|_total)?\{{([^}}]*)\}}", text, re.MULTILINE):
            labels |= {pair.split("=", 1)[0] for pair in series.split(",") if pair}
        labels.discard("le")
        missing = [label for label in labels if f"`{label}`" not in documented[name]]
        assert not missing, f"{name}: labels {missing} not documented"


def test_alert_rules_use_only_catalogued_metrics() -> None:
    rules = (DOCS / "alerts.yml").read_text(encoding="utf-8")
    used = set(re.findall(r"\b(plantgate_\w+)", rules))
    assert used and used <= set(catalogue()), sorted(used - set(catalogue()))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is missing (Debian package prometheus)")
def test_promtool_accepts_the_alert_rules_and_their_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=DOCS, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=DOCS, capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr
