"""The agent's metrics: contract names from start-up, counts, and prometheus_client's own exposition."""

from __future__ import annotations

import re
import sys

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import DEAD_LETTER_REASONS, LATENCY_BUCKETS, PRE_SINK, Metrics

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
    "plantgate_source_batches_retried": "counter",
    "plantgate_component_restarts": "counter",
}

Key = tuple[str, frozenset[tuple[str, str]]]


def samples(text: str) -> dict[Key, float]:
    """(sample name, labels) -> value, from the Prometheus text format via prometheus_client's parser."""
    found: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def key(metric: str, /, **labels: str) -> Key:
    return metric, frozenset(labels.items())


def scrape(metrics: Metrics) -> dict[Key, float]:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    return samples(body.decode())


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(sources=SOURCES, sinks=SINKS, agent_id="line3-gw", site="plant-01", version="9.9.9")


def test_every_contract_series_is_exposed_from_start_up_with_zero(metrics: Metrics) -> None:
    body, _ = metrics.render()
    families = {family.name: family.type for family in text_string_to_metric_families(body.decode())}
    for name, kind in CONTRACT_METRICS.items():
        assert families.get(name) == kind, f"{name} missing or not a {kind}"

    values = samples(body.decode())
    for source in SOURCES:
        for lane in LANES:
            assert values[key("plantgate_events_received_total", source=source, lane=lane)] == 0
        assert values[key("plantgate_duplicates_suppressed_total", source=source)] == 0
        assert values[key("plantgate_telemetry_suppressed_total", source=source)] == 0
        assert values[key("plantgate_connection_up", component="source", name=source)] == 0
        assert values[key("plantgate_source_batches_retried_total", source=source)] == 0
        assert values[key("plantgate_component_restarts_total", component="source", name=source)] == 0
    for sink, lanes in SINKS.items():
        for lane in lanes:
            assert values[key("plantgate_events_delivered_total", sink=sink, lane=lane)] == 0
            assert values[key("plantgate_buffer_depth_events", sink=sink, lane=lane)] == 0
            assert values[key("plantgate_buffer_oldest_age_seconds", sink=sink, lane=lane)] == 0
            assert values[key("plantgate_delivery_latency_seconds_count", sink=sink, lane=lane)] == 0
        assert values[key("plantgate_delivery_retries_total", sink=sink)] == 0
        assert values[key("plantgate_connection_up", component="sink", name=sink)] == 0
        assert values[key("plantgate_component_restarts_total", component="sink", name=sink)] == 0
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


def test_render_is_prometheus_clients_own_exposition(metrics: Metrics) -> None:
    metrics.received("press7", "transaction", 3)
    metrics.observe_latency("cloud", "transaction", [0.01, 2.0])
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST

    def stable(text: bytes) -> list[bytes]:  # without the process series: CPU time and RSS move between reads
        return [line for line in text.splitlines() if not re.match(rb"(# (HELP|TYPE) )?process_", line)]

    assert stable(body) == stable(generate_latest(metrics.registry))


def test_counts_what_the_pipeline_reports(metrics: Metrics) -> None:
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
    metrics.source_batch_retried("press7")
    metrics.source_batch_retried("press7", 2)
    metrics.component_restarted("sink", "cloud")
    metrics.component_restarted("task", "delivery")  # a task outside the config is created on first use

    values = scrape(metrics)
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
    assert values[key("plantgate_source_batches_retried_total", source="press7")] == 3
    assert values[key("plantgate_source_batches_retried_total", source="dock1")] == 0
    assert values[key("plantgate_component_restarts_total", component="sink", name="cloud")] == 1
    assert values[key("plantgate_component_restarts_total", component="sink", name="erp")] == 0
    assert values[key("plantgate_component_restarts_total", component="task", name="delivery")] == 1

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


def test_component_path_shows_one_series_per_component(metrics: Metrics) -> None:
    assert metrics.component_path("source", "press7") is None
    assert not any(name == "plantgate_component_info" for name, _ in scrape(metrics))

    metrics.set_component_path("source", "press7", "fast-decoder")
    metrics.set_component_path("sink", "cloud", "fast-publish")
    values = scrape(metrics)
    assert values[key("plantgate_component_info", component="source", name="press7", path="fast-decoder")] == 1

    # the self-check failed: the source falls back to the library's path
    metrics.set_component_path("source", "press7", "asyncua")
    values = scrape(metrics)
    press7 = {dict(labels)["path"] for name, labels in values if name == "plantgate_component_info"
              and ("name", "press7") in labels}  # fmt: skip
    assert press7 == {"asyncua"}
    assert metrics.component_path("source", "press7") == "asyncua"
    assert metrics.component_paths() == {("source", "press7"): "asyncua", ("sink", "cloud"): "fast-publish"}


def test_set_buffer_zeroes_label_sets_missing_from_the_snapshot() -> None:
    metrics = Metrics(sources=[], sinks={"cloud": ["transaction"]}, agent_id="a", site="s", version="v")
    metrics.set_buffer({("cloud", "transaction"): (3, 9.0), ("removed-sink", "telemetry"): (8, 60.0)})
    values = scrape(metrics)
    assert values[key("plantgate_buffer_depth_events", sink="removed-sink", lane="telemetry")] == 8
    metrics.set_buffer({("cloud", "transaction"): (1, 2.0)})  # the orphaned backlog was purged
    values = scrape(metrics)
    assert values[key("plantgate_buffer_depth_events", sink="removed-sink", lane="telemetry")] == 0
    assert values[key("plantgate_buffer_oldest_age_seconds", sink="removed-sink", lane="telemetry")] == 0
    assert values[key("plantgate_buffer_depth_events", sink="cloud", lane="transaction")] == 1
    assert values[key("plantgate_buffer_oldest_age_seconds", sink="cloud", lane="transaction")] == 2.0


def test_two_agents_in_one_process_keep_separate_registries() -> None:
    first = Metrics(sources=["a"], sinks={}, agent_id="one", site="s", version="v")
    second = Metrics(sources=["a"], sinks={}, agent_id="two", site="s", version="v")
    first.received("a", "transaction", 1)
    values = scrape(second)
    assert values[key("plantgate_events_received_total", source="a", lane="transaction")] == 0


def test_the_agents_own_events_count_but_have_no_connection_to_be_down() -> None:
    metrics = Metrics(sources=["press7"], internal_sources=["agent"], sinks={}, agent_id="a", site="s", version="v")
    values = scrape(metrics)
    assert values[key("plantgate_events_received_total", source="agent", lane="operational")] == 0
    assert values[key("plantgate_connection_up", component="source", name="press7")] == 0
    assert key("plantgate_connection_up", component="source", name="agent") not in values
    assert [labels for name, labels in values if name == "plantgate_connection_up"] == [
        frozenset({("component", "source"), ("name", "press7")})
    ]
