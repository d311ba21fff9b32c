"""asyncua and prometheus_client are imported without what the agent never runs, and fall back safely."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, Summary
from prometheus_client.core import GaugeMetricFamily

from agent.metrics import Metrics, render_text


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the tests' own process imported both libraries in full)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_agent_imports_neither_the_opcua_server_nor_the_metrics_exposition() -> None:
    out = run_python(
        """
        import sys
        import agent.cli, agent.pipeline, protocols.opcua
        import asyncua, prometheus_client
        unused = ("asyncua.server", "asyncua.pubsub", "prometheus_client.exposition", "wsgiref", "http.server")
        loaded = sorted(m for m in sys.modules if m.startswith(unused))
        print(asyncua.__plantgate_lean__, prometheus_client.__plantgate_lean__, asyncua.Client.__name__, loaded)
        """
    )
    assert out == "True True Client []"


def test_the_rest_loads_on_first_use() -> None:
    out = run_python(
        """
        import sys
        from importlib import metadata
        import agent
        from asyncua import Server, __version__
        from prometheus_client import generate_latest, GC_COLLECTOR
        import prometheus_client
        print(Server.__module__, __version__ == metadata.version("asyncua"), generate_latest.__module__,
              prometheus_client.exposition.__name__, type(GC_COLLECTOR).__name__)
        """
    )
    assert out == "asyncua.server.server True prometheus_client.exposition prometheus_client.exposition GCCollector"


def test_an_unexpected_layout_falls_back_to_the_ordinary_import() -> None:
    # A submodule that cannot be imported stands for a future release laid out differently.
    out = run_python(
        """
        import sys
        sys.modules["asyncua.client"] = None
        import agent, protocols.opcua
        import asyncua, prometheus_client
        print(getattr(asyncua, "__plantgate_lean__", False), "asyncua.server" in sys.modules,
              asyncua.Client.__name__, prometheus_client.__plantgate_lean__)
        """
    )
    assert out == "False True Client True"


def test_nothing_changes_when_a_library_was_imported_first() -> None:
    out = run_python(
        """
        import sys
        import asyncua
        import agent
        from agent import lean_import
        print(lean_import.install(), "asyncua.server" in sys.modules)
        """
    )
    assert out == "{'asyncua': False, 'prometheus_client': True} True"


def test_render_text_is_what_generate_latest_writes() -> None:
    registry = CollectorRegistry()
    counter = Counter("c_events", "Events\\ with a\nnewline", ["sink", "lane"], registry=registry)
    counter.labels('a"b', "x\\y\nz").inc(3)
    counter.labels("plain", "transaction").inc(0.5)
    Gauge("g_depth", "Depth", registry=registry).set(float("inf"))
    Histogram("h_latency", "Latency", ["sink"], buckets=(0.1, 1.0), registry=registry).labels("s").observe(0.3)
    Summary("s_size", "Size", registry=registry).observe(7)
    Info("i_build", "Build", registry=registry).info({"version": "1.2.3"})
    Enum("e_state", "State", states=["up", "down"], registry=registry).state("down")

    class Stamped:
        def collect(self):  # type: ignore[no-untyped-def]
            family = GaugeMetricFamily("t_stamped", "With a timestamp", labels=["k"])
            family.add_metric(["v"], 1.5, timestamp=1700000000.123)
            yield family

    registry.register(Stamped())  # type: ignore[arg-type]
    assert render_text(registry) == prometheus_client.generate_latest(registry)
    # With _created samples (the agent disables them; the format must still match).
    was_enabled = prometheus_client.metrics._use_created
    prometheus_client.enable_created_metrics()
    try:
        created = CollectorRegistry()
        Counter("c_made", "Made", registry=created).inc()
        Histogram("h_made", "Made", registry=created).observe(1)
        assert b"c_made_created" in render_text(created)
        assert render_text(created) == prometheus_client.generate_latest(created)
    finally:
        if not was_enabled:
            prometheus_client.disable_created_metrics()


def test_the_agents_metrics_render_as_generate_latest_would() -> None:
    metrics = Metrics(sources=["press7"], sinks={"cloud": ["transaction"]}, agent_id="gw", site="plant", version="1")
    metrics.received("press7", "transaction", 4)
    body, content_type = metrics.render()
    expected = prometheus_client.generate_latest(metrics.registry)

    def steady(text: bytes) -> list[bytes]:
        # process_cpu_seconds_total and friends move between the two renderings.
        return [line for line in text.splitlines() if not line.startswith(b"process_")]

    assert steady(body) == steady(expected)
    assert b"process_cpu_seconds_total" in body
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b'plantgate_events_received_total{lane="transaction",source="press7"} 4.0' in body
