"""Prometheus metrics of the agent (contract names, ``plantgate_`` prefix).

``Metrics`` owns a private ``CollectorRegistry`` (never the process-global one, so
tests and a second agent in one process do not collide) and creates every label
set it can know from the config at construction: the contract says the series are
*exposed from start-up*, so a dashboard shows a zero instead of "no data".

The hot-path methods (``received``, ``delivered``, ``observe_latency``, ...) take
counts and are called once per batch, never once per event. They look the
labelled child up in a plain dict instead of going through ``.labels()``, whose
argument checking and locking cost several times more.

All methods are meant to be called from the agent's event loop (one thread); the
latency histogram relies on that and uses no lock.

``render()`` is prometheus_client's own exposition (``generate_latest``); the
batch histogram is a custom collector on the library's public collector API.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from agent.events import LANES, TRANSACTION_TYPES
from agent.health import CONNECTION_STATES

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The content type of ``Metrics.render()``: prometheus_client's own text exposition."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
"""Delivery latency buckets: 1 ms on loopback up to an hour of backlog after an outage."""

PRE_SINK = "-"
"""The sink label of dead letters made before any sink (mapping, validation), as in ``plantgate buffer``."""

DEAD_LETTER_REASONS: tuple[str, ...] = ("rejected", "mapping", "validation", "other")
"""Low-cardinality ``reason`` label values of ``plantgate_dead_letters_total``.

``rejected``: the sink's peer refused the event (HTTP 400/422); ``mapping``: an
obsolete or unknown item or unit; ``validation``: the event failed validation.
Anything else is counted as ``other``: the label must never carry free text such
as a response body (that goes into the dead letter itself), or every distinct
error would become a new time series.
"""

OUTCOME_RESULTS: tuple[str, ...] = ("recorded", "unchanged", "unknown", "invalid")
"""The ``result`` label values of ``plantgate_outcome_reports_total``."""

Component = Literal["source", "sink"]
"""The ``component`` label of connection state and component paths; restarts may name other tasks."""


class _HistogramSeries:
    """Per-bucket (non-cumulative) counts and the sum of one label set."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0


class _BatchHistogram:
    """A histogram collector that takes a batch of observations in one call.

    ``prometheus_client.Histogram.observe`` takes two locks and walks the buckets
    for each value (about 1.2 µs); a batch of 500 acknowledged events would pay
    that 500 times. Here a value costs one C ``bisect`` and an integer add; the
    cumulative buckets are built only when scraped. Uses only the public custom
    collector API (``collect``/``describe`` returning ``HistogramMetricFamily``).
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]):
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("histogram buckets must be strictly increasing")
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(bounds)
        self._le = tuple(floatToGoString(b) for b in bounds)
        self._series: dict[tuple[str, ...], _HistogramSeries] = {}

    def series(self, *labelvalues: str) -> _HistogramSeries:
        """The series of one label set, created (all zero) on first use."""
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labelvalues!r}")
        found = self._series.get(labelvalues)
        if found is None:
            found = self._series[labelvalues] = _HistogramSeries(len(self._bounds))
        return found

    def observe_many(self, series: _HistogramSeries, values: Iterable[float]) -> None:
        """Count every value of ``values`` into ``series``."""
        bounds = self._bounds
        counts = series.counts
        total = 0.0
        for value in values:
            # A wall-clock step backwards can make a latency negative; counting it as 0
            # keeps _sum monotonic, which Prometheus needs to detect counter resets.
            if value < 0:
                value = 0.0
            counts[bisect_left(bounds, value)] += 1  # first bound >= value, i.e. "le"
            total += value
        series.total += total

    def describe(self) -> Iterator[Metric]:
        """The family without samples, so the registry knows the name (duplicate check)."""
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        """Cumulative buckets, count and sum of every label set."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labelvalues, series in self._series.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._le, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(labelvalues), buckets, series.total)
        yield family


class Metrics:
    """Every metric of the agent, in a private registry; ``render()`` gives the /metrics body.

    ``sources``: the configured source names; ``internal_sources``: sources with no
    peer (the agent's own events: no connection series); ``sinks``: sink name -> the
    lanes it takes. Series for every (source, lane), (sink, lane of that sink), (sink,
    reason) and component are created here with value 0. A label value that only
    turns up later (an orphaned sink's backlog, a source outside the config such as
    the agent's own events) is created on first use.
    """

    def __init__(
        self,
        *,
        sources: Sequence[str],
        sinks: Mapping[str, Sequence[str]],
        internal_sources: Sequence[str] = (),
        agent_id: str,
        site: str,
        version: str,
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry

        self._received_family = Counter(
            "plantgate_events_received_total",
            "Events accepted from a source into the pipeline, by source and lane",
            ["source", "lane"],
            registry=reg,
        )
        self._delivered_family = Counter(
            "plantgate_events_delivered_total",
            "Events acknowledged by a sink's peer (and removed from its buffer), by sink and lane",
            ["sink", "lane"],
            registry=reg,
        )
        self._dead_letters_family = Counter(
            "plantgate_dead_letters_total",
            'Events turned into dead letters, by sink ("-" before any sink) and reason category',
            ["sink", "reason"],
            registry=reg,
        )
        self._depth_family = Gauge(
            "plantgate_buffer_depth_events",
            "Events in the buffer not yet acknowledged by a sink, by sink and lane",
            ["sink", "lane"],
            registry=reg,
        )
        self._oldest_family = Gauge(
            "plantgate_buffer_oldest_age_seconds",
            "Age of the oldest undelivered event, by sink and lane (0 when empty)",
            ["sink", "lane"],
            registry=reg,
        )
        self._latency = _BatchHistogram(
            "plantgate_delivery_latency_seconds",
            "Time from an event entering the buffer to its acknowledgement by the sink's peer",
            ["sink", "lane"],
            LATENCY_BUCKETS,
        )
        reg.register(self._latency)
        self._retries_family = Counter(
            "plantgate_delivery_retries_total",
            "Delivery attempts that ended in retry-later (peer down, timeout, 429/503, 5xx)",
            ["sink"],
            registry=reg,
        )
        self._duplicates_family = Counter(
            "plantgate_duplicates_suppressed_total",
            "Events not stored again because their id was already accepted, by source",
            ["source"],
            registry=reg,
        )
        self._evicted_events = Counter(
            "plantgate_telemetry_evicted_events_total",
            "Telemetry events evicted from a full buffer (each one reported by a telemetry.gap event)",
            registry=reg,
        )
        self._evicted_samples = Counter(
            "plantgate_telemetry_evicted_samples_total",
            "Telemetry samples inside the evicted telemetry events",
            registry=reg,
        )
        self._suppressed_family = Counter(
            "plantgate_telemetry_suppressed_total",
            "Telemetry changes inside a tag's deadband, not forwarded, by source",
            ["source"],
            registry=reg,
        )
        self._connection_family = Gauge(
            "plantgate_connection_up",
            "1 while a source or sink is connected to its peer, else 0",
            ["component", "name"],
            registry=reg,
        )
        self._state_family = Gauge(
            "plantgate_component_state",
            "1 for the state a source or sink is in now (connected, reconnecting, unauthorized, ...), 0 for the others",
            ["component", "name", "state"],
            registry=reg,
        )
        self._held_family = Gauge(
            "plantgate_dead_letters_held",
            'Dead letters in the buffer now (replay or purge removes them), by sink ("-" before any sink)',
            ["sink"],
            registry=reg,
        )
        self._sequencing_held = Gauge(
            "plantgate_events_held",
            "Events the sequencing guard holds now, waiting for their work order's release, by type",
            ["type"],
            registry=reg,
        )
        self._sequencing_types: set[str] = set()
        self._held_oldest_family = Gauge(
            "plantgate_dead_letter_oldest_age_seconds",
            "Age of the oldest dead letter held, by sink (0 when none)",
            ["sink"],
            registry=reg,
        )
        self._size_bytes = Gauge(
            "plantgate_buffer_size_bytes",
            "Size of the buffer database on disk (main file and WAL)",
            registry=reg,
        )
        self._max_size_bytes = Gauge(
            "plantgate_buffer_max_size_bytes",
            "The buffer's size cap ([buffer] max_size_mb): telemetry is evicted, then sources held, beyond it",
            registry=reg,
        )
        self._disk_free_bytes = Gauge(
            "plantgate_disk_free_bytes",
            "Free space on the file system that holds the buffer (what the agent's user may still use)",
            registry=reg,
        )
        self._refusing_writes = Gauge(
            "plantgate_buffer_refusing_writes",
            "1 while the buffer refuses writes (disk full or max_size_mb reached), else 0",
            registry=reg,
        )
        info = Gauge(
            "plantgate_info",
            "Constant 1, labelled with the agent's version, id and site",
            ["version", "agent", "site"],
            registry=reg,
        )
        info.labels(version, agent_id, site).set(1)
        self._component_info_family = Gauge(
            "plantgate_component_info",
            "Constant 1, labelled with the implementation path a source or sink uses "
            '(e.g. its fast decoder, or "library" after a failed self-check)',
            ["component", "name", "path"],
            registry=reg,
        )
        self._source_batches_retried_family = Counter(
            "plantgate_source_batches_retried_total",
            "Batches the pipeline could not take (buffer refusing writes) that the source kept to offer again",
            ["source"],
            registry=reg,
        )
        self._restarts_family = Counter(
            "plantgate_component_restarts_total",
            "Times a crashed source, sink or agent task was restarted",
            ["component", "name"],
            registry=reg,
        )
        self._outcome_families = tuple(
            Gauge(name, documentation, ["type"], registry=reg)
            for name, documentation in (
                (
                    "plantgate_outcomes_unconfirmed",
                    "Events delivered (acknowledged by a sink) that the ERP has neither posted nor rejected yet, "
                    "by type, among those the delivery journal keeps",
                ),
                ("plantgate_outcomes_confirmed", "Events the ERP reported posted (POST /v1/outcomes), by type"),
                ("plantgate_outcomes_rejected", "Events the ERP reported rejected (business dead letters), by type"),
                (
                    "plantgate_outcome_oldest_unconfirmed_age_seconds",
                    "Age of the oldest delivered event without an ERP outcome, by type (0 when none)",
                ),
            )
        )
        self._outcome_types: set[str] = set(TRANSACTION_TYPES)
        for type_ in TRANSACTION_TYPES:  # exposed from start-up, at 0, like every other series
            for family in self._outcome_families:
                family.labels(type_).set(0)
        self._outcome_reports_family = Counter(
            "plantgate_outcome_reports_total",
            "Business outcomes reported to POST /v1/outcomes, by result (recorded, unchanged, unknown id, "
            "invalid request)",
            ["result"],
            registry=reg,
        )
        for result in OUTCOME_RESULTS:
            self._outcome_reports_family.labels(result)
        self._summaries = Counter(
            "plantgate_reconciliation_summaries_total",
            "io.plantgate.reconciliation.summary events emitted (one per [journal] summary_interval window)",
            registry=reg,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds: read from
        # /proc only when scraped, they show the agent keeping its idle CPU and memory budget.
        ProcessCollector(registry=reg)

        # Cached children: the hot path is a dict lookup and one locked add.
        self._received: dict[tuple[str, str], Counter] = {}
        self._delivered: dict[tuple[str, str], Counter] = {}
        self._dead_letters: dict[tuple[str, str], Counter] = {}
        self._held_sinks: set[str] = set()
        self._buffer: dict[tuple[str, str], tuple[Gauge, Gauge]] = {}  # (depth, oldest age)
        self._latency_series: dict[tuple[str, str], _HistogramSeries] = {}
        self._retries: dict[str, Counter] = {}
        self._duplicates: dict[str, Counter] = {}
        self._suppressed: dict[str, Counter] = {}
        self._connection: dict[tuple[str, str], Gauge] = {}
        self._source_batches_retried: dict[str, Counter] = {}
        self._restarts: dict[tuple[str, str], Counter] = {}
        self._component_paths: dict[tuple[str, str], str] = {}

        for source in (*sources, *internal_sources):
            for source_lane in LANES:  # a source may produce every lane (OPC UA: samples, states, rules)
                self._received_child(source, source_lane)
            self._duplicate_child(source)
            self._suppressed_child(source)
        # The agent's own events (internal_sources) have no peer: no connection series, which
        # would read 0 forever and fire a "connection down" alert.
        for source in sources:
            self._connection_child("source", source)
            for state in CONNECTION_STATES:
                self._state_family.labels("source", source, state).set(1 if state == "starting" else 0)
            self._source_batch_retry_child(source)
            self._restart_child("source", source)
        for sink, lanes in sinks.items():
            for lane in lanes:
                self._delivered_child(sink, lane)
                self._buffer_children(sink, lane)
                self._latency_child(sink, lane)
            self._retry_child(sink)
            self._connection_child("sink", sink)
            for state in CONNECTION_STATES:
                self._state_family.labels("sink", sink, state).set(1 if state == "starting" else 0)
            self._restart_child("sink", sink)
        for sink in (*sinks, PRE_SINK):
            for reason in DEAD_LETTER_REASONS:
                self._dead_letter_child(sink, reason)
            self._held_family.labels(sink).set(0)
            self._held_oldest_family.labels(sink).set(0)
            self._held_sinks.add(sink)
        self._size_bytes.set(0)
        self._refusing_writes.set(0)

    # --- hot path: one call per batch ------------------------------------------------------------

    def received(self, source: str, lane: str, n: int = 1) -> None:
        """``n`` events of ``lane`` from ``source`` entered the pipeline."""
        child = self._received.get((source, lane))
        if child is None:
            child = self._received_child(source, lane)
        child.inc(n)

    def delivered(self, sink: str, lane: str, n: int = 1) -> None:
        """``n`` events of ``lane`` were acknowledged by ``sink``'s peer."""
        child = self._delivered.get((sink, lane))
        if child is None:
            child = self._delivered_child(sink, lane)
        child.inc(n)

    def observe_latency(self, sink: str, lane: str, seconds: Iterable[float]) -> None:
        """Buffer-to-acknowledgement latency of each event of one acknowledged batch."""
        series = self._latency_series.get((sink, lane))
        if series is None:
            series = self._latency_child(sink, lane)
        self._latency.observe_many(series, seconds)

    def dead_lettered(self, sink: str, reason: str, n: int = 1) -> None:
        """``n`` events became dead letters for ``sink`` (``PRE_SINK`` before any sink).

        ``reason`` is a category from ``DEAD_LETTER_REASONS``; anything else counts as
        ``other`` so free text can never explode the number of series.
        """
        if reason not in DEAD_LETTER_REASONS:
            reason = "other"
        child = self._dead_letters.get((sink, reason))
        if child is None:
            child = self._dead_letter_child(sink, reason)
        child.inc(n)

    def retried(self, sink: str, n: int = 1) -> None:
        """``n`` events of a delivery attempt to ``sink`` were handed back for retry."""
        child = self._retries.get(sink)
        if child is None:
            child = self._retry_child(sink)
        child.inc(n)

    def duplicates_suppressed(self, source: str, n: int = 1) -> None:
        """``n`` events from ``source`` were already accepted under the same id and not stored again."""
        child = self._duplicates.get(source)
        if child is None:
            child = self._duplicate_child(source)
        child.inc(n)

    def telemetry_suppressed(self, source: str, n: int = 1) -> None:
        """``n`` telemetry changes from ``source`` stayed inside their deadband."""
        child = self._suppressed.get(source)
        if child is None:
            child = self._suppressed_child(source)
        child.inc(n)

    def telemetry_evicted(self, events: int, samples: int) -> None:
        """The buffer evicted ``events`` telemetry events holding ``samples`` samples."""
        self._evicted_events.inc(events)
        self._evicted_samples.inc(samples)

    def source_batch_retried(self, source: str, n: int = 1) -> None:
        """``n`` batches from ``source`` were not taken by the pipeline; the source kept them to offer again."""
        child = self._source_batches_retried.get(source)
        if child is None:
            child = self._source_batch_retry_child(source)
        child.inc(n)

    def component_restarted(self, component: str, name: str) -> None:
        """The task of ``component`` ``name`` (a source, a sink, or an agent task) crashed and was restarted."""
        child = self._restarts.get((component, name))
        if child is None:
            child = self._restart_child(component, name)
        child.inc()

    # --- gauges, set from snapshots --------------------------------------------------------------

    def set_dead_letters_held(self, held: Mapping[str, tuple[int, float]]) -> None:
        """Dead letters held now from a full snapshot: ``sink -> (count, oldest_age_seconds)``.

        Sinks absent from the snapshot read 0 (their dead letters were replayed or purged).
        """
        for sink in self._held_sinks - held.keys():
            self._held_family.labels(sink).set(0)
            self._held_oldest_family.labels(sink).set(0)
        for sink, (count, oldest) in held.items():
            self._held_family.labels(sink).set(count)
            self._held_oldest_family.labels(sink).set(oldest if count else 0.0)
        self._held_sinks |= held.keys()

    def set_events_held(self, held: Mapping[str, int]) -> None:
        """Events the sequencing guard holds, from a full snapshot: ``type -> count`` (absent types read 0)."""
        for type_ in self._sequencing_types - held.keys():
            self._sequencing_held.labels(type_).set(0)
        for type_, count in held.items():
            self._sequencing_held.labels(type_).set(count)
        self._sequencing_types |= held.keys()

    def set_outcomes(self, outcomes: Mapping[str, tuple[int, int, int, float]]) -> None:
        """Business outcomes from a full snapshot: ``type -> (unconfirmed, confirmed, rejected, oldest age)``."""
        for type_ in self._outcome_types - outcomes.keys():
            for family in self._outcome_families:
                family.labels(type_).set(0)
        for type_, values in outcomes.items():
            for family, value in zip(self._outcome_families, values, strict=True):
                family.labels(type_).set(value)
        self._outcome_types |= outcomes.keys()

    def outcome_reports(self, results: Mapping[str, int]) -> None:
        """Outcome reports handled, by result (anything not in ``OUTCOME_RESULTS`` is not counted)."""
        for result, n in results.items():
            if result in OUTCOME_RESULTS and n:
                self._outcome_reports_family.labels(result).inc(n)

    def reconciliation_summaries(self, n: int) -> None:
        """``n`` reconciliation summary events were emitted."""
        if n:
            self._summaries.inc(n)

    def set_buffer(self, lanes: Mapping[tuple[str, str], tuple[int, float]]) -> None:
        """Set depth and oldest age from a full snapshot: ``(sink, lane) -> (depth, oldest_age_seconds)``.

        A label set known from before but absent from the snapshot is set to 0: the
        snapshot is the whole truth, so a drained or purged backlog reads as empty
        instead of keeping its last value.
        """
        for key in self._buffer.keys() - lanes.keys():
            depth_child, oldest_child = self._buffer[key]
            depth_child.set(0)
            oldest_child.set(0)
        for key, (depth, oldest) in lanes.items():
            children = self._buffer.get(key)
            if children is None:
                children = self._buffer_children(*key)
            children[0].set(depth)
            children[1].set(oldest if depth else 0.0)

    def set_buffer_size(self, size_bytes: int) -> None:
        """The buffer database's size on disk."""
        self._size_bytes.set(size_bytes)

    def set_headroom(self, max_size_bytes: int, disk_free_bytes: int) -> None:
        """The buffer's size cap and the free space on its file system."""
        self._max_size_bytes.set(max_size_bytes)
        self._disk_free_bytes.set(disk_free_bytes)

    def set_refusing_writes(self, refusing: bool) -> None:
        """Whether the buffer currently refuses writes (readiness is 503 while it does)."""
        self._refusing_writes.set(1 if refusing else 0)

    def set_connection(self, component: Component, name: str, up: bool, state: str | None = None) -> None:
        """Whether source or sink ``name`` is connected to its peer, and the state it is in."""
        child = self._connection.get((component, name))
        if child is None:
            child = self._connection_child(component, name)
        child.set(1 if up else 0)
        if state is not None:
            for known in CONNECTION_STATES:
                self._state_family.labels(component, name, known).set(1 if known == state else 0)

    def set_component_path(self, component: str, name: str, path: str) -> None:
        """Which implementation path ``component`` ``name`` uses now (``plantgate_component_info``).

        E.g. ``("source", "press7", "fast-decoder")``, then ``"asyncua"`` if its
        self-check fails. The previous path's series is removed, so exactly one is 1.
        """
        key = (component, name)
        previous = self._component_paths.get(key)
        if previous == path:
            return
        if previous is not None:
            self._component_info_family.remove(component, name, previous)
        self._component_info_family.labels(component, name, path).set(1)
        self._component_paths[key] = path

    def component_path(self, component: str, name: str) -> str | None:
        """The path last set for ``component`` ``name`` (for /status), None when it never said."""
        return self._component_paths.get((component, name))

    def component_paths(self) -> dict[tuple[str, str], str]:
        """``(component, name) -> path`` of every component that said which path it uses."""
        return dict(self._component_paths)

    # --- exposition ------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric (``prometheus_client.generate_latest``), and its
        content type."""
        return generate_latest(self.registry), CONTENT_TYPE

    # --- child creation (cold path) --------------------------------------------------------------

    def _received_child(self, source: str, lane: str) -> Counter:
        child = self._received[(source, lane)] = self._received_family.labels(source, lane)
        return child

    def _delivered_child(self, sink: str, lane: str) -> Counter:
        child = self._delivered[(sink, lane)] = self._delivered_family.labels(sink, lane)
        return child

    def _dead_letter_child(self, sink: str, reason: str) -> Counter:
        child = self._dead_letters[(sink, reason)] = self._dead_letters_family.labels(sink, reason)
        return child

    def _buffer_children(self, sink: str, lane: str) -> tuple[Gauge, Gauge]:
        children = self._buffer[(sink, lane)] = (
            self._depth_family.labels(sink, lane),
            self._oldest_family.labels(sink, lane),
        )
        return children

    def _latency_child(self, sink: str, lane: str) -> _HistogramSeries:
        series = self._latency_series[(sink, lane)] = self._latency.series(sink, lane)
        return series

    def _retry_child(self, sink: str) -> Counter:
        child = self._retries[sink] = self._retries_family.labels(sink)
        return child

    def _duplicate_child(self, source: str) -> Counter:
        child = self._duplicates[source] = self._duplicates_family.labels(source)
        return child

    def _suppressed_child(self, source: str) -> Counter:
        child = self._suppressed[source] = self._suppressed_family.labels(source)
        return child

    def _connection_child(self, component: str, name: str) -> Gauge:
        child = self._connection[(component, name)] = self._connection_family.labels(component, name)
        return child

    def _source_batch_retry_child(self, source: str) -> Counter:
        child = self._source_batches_retried[source] = self._source_batches_retried_family.labels(source)
        return child

    def _restart_child(self, component: str, name: str) -> Counter:
        child = self._restarts[(component, name)] = self._restarts_family.labels(component, name)
        return child
