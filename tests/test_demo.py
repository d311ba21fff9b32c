"""``plantgate demo``: every source and sink takes part, against the built-in simulators."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(90)
def test_demo_runs_every_source_and_sink_and_says_where_the_events_went(tmp_path: Path) -> None:
    plantgate = Path(sys.executable).parent / "plantgate"
    done = subprocess.run(
        [str(plantgate), "demo", "--seconds", "10"], capture_output=True, text=True, timeout=80, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"data in (\S+)", done.stdout)
    assert found, done.stdout
    data_dir = Path(found.group(1))
    events = [json.loads(line) for line in (data_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    sources = {event["source"].rsplit("/", 1)[-1] for event in events}
    assert {"press7", "filler2", "dock1", "mes", "mes-rest"} <= sources, sources
    types = {event["type"].removeprefix("io.plantgate.") for event in events}
    assert {"production.completed", "goods.received", "workorder.released", "telemetry.samples"} <= types, types
    received = re.search(r"the local receiver got (\d+) events", done.stdout)
    assert received and int(received.group(1)) > 0, done.stdout
    # The closing hint names a command that runs as printed.
    hint = re.search(r"inspect: (\S+) buffer stats -c (\S+)", done.stdout)
    assert hint, done.stdout
    stats = subprocess.run([hint.group(1), "buffer", "stats", "--json", "-c", hint.group(2)],
                           capture_output=True, text=True, timeout=30)
    assert stats.returncode == 0, stats.stderr
    assert set(json.loads(stats.stdout)["sinks"]) >= {"demo-file", "erp-receiver"}
