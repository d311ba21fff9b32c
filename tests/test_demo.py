"""``plantgate demo``: every source and sink takes part, against the built-in simulators."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
import pytest

from tests.peers.waiting import wait_for


@pytest.mark.timeout(90)
async def test_demo_runs_every_source_and_sink_and_says_where_the_events_went(tmp_path: Path) -> None:
    plantgate = Path(sys.executable).parent / "plantgate"
    demo = await asyncio.create_subprocess_exec(
        str(plantgate), "demo", "--seconds", "10", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert demo.stdout is not None and demo.stderr is not None
        first = (await asyncio.wait_for(demo.stdout.readline(), 30)).decode()
        # The console's address comes first, before the simulators and the agent start.
        console = re.search(r"console (http://127\.0\.0\.1:\d+/) ", first)
        assert console, first
        url = console.group(1)

        async def status_answers() -> bool:
            async with httpx.AsyncClient(timeout=2) as client:
                try:
                    status = (await client.get(url + "status")).status_code
                    console = await client.get(url)
                except httpx.HTTPError:
                    return False
                # The first line's address is the console itself, not only the agent's API.
                return status == 200 and console.status_code == 200 and "<html" in console.text.lower()

        await wait_for(status_answers, timeout=30, interval=0.2, message=f"{url} (console) and {url}status answer")
        rest, errors = await asyncio.wait_for(demo.communicate(), 60)
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
    stdout = first + rest.decode()
    assert demo.returncode == 0, errors.decode()[-2000:]
    found = re.search(r"data in (\S+)", stdout)
    assert found, stdout
    data_dir = Path(found.group(1))
    events = [json.loads(line) for line in (data_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    sources = {event["source"].rsplit("/", 1)[-1] for event in events}
    assert {"press7", "filler2", "dock1", "mes", "mes-rest"} <= sources, sources
    types = {event["type"].removeprefix("io.plantgate.") for event in events}
    assert {"production.completed", "goods.received", "workorder.released", "telemetry.samples"} <= types, types
    received = re.search(r"the local receiver got (\d+) events", stdout)
    assert received and int(received.group(1)) > 0, stdout
    # The receiver plays the ERP's middleware: it decided on the transactions it got.
    erp = re.search(r"the ERP behind it: posted (\d+), rejected (\d+)", stdout)
    assert erp and int(erp.group(1)) > 0, stdout
    # Every report got an answer from the agent before it stopped (recorded, or no such endpoint yet).
    line = erp.string[erp.start() : erp.string.index("\n", erp.start())]
    assert "recorded" in line or "no /v1/outcomes" in line, line
    assert "wait for the agent" not in line, line
    transactions = sum(1 for event in events if event["type"].removeprefix("io.plantgate.") in _TRANSACTION_SEEN)
    assert int(erp.group(1)) + int(erp.group(2)) <= transactions
    # The console's address is shown again at the end, and a work order to trace.
    assert f"console: {url}" in stdout, stdout
    trace = re.search(r"trace: +(\S+) trace (\S+) -c (\S+)", stdout)
    assert trace and trace.group(3) == str(data_dir / "plantgate.toml"), stdout
    assert any(
        trace.group(2) in (str(e["data"].get("work_order")), e.get("subject"))
        for e in events
        if isinstance(e.get("data"), dict)
    ), trace.group(2)
    # The closing hint names a command that runs as printed.
    hint = re.search(r"inspect: (\S+) buffer stats -c (\S+)", stdout)
    assert hint, stdout
    stats = await asyncio.create_subprocess_exec(
        hint.group(1), "buffer", "stats", "--json", "-c", hint.group(2),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(stats.communicate(), 30)
    assert stats.returncode == 0, err.decode()
    assert set(json.loads(out)["sinks"]) >= {"demo-file", "erp-receiver"}


_TRANSACTION_SEEN = {"production.completed", "goods.received", "workorder.released", "material.consumed"}
