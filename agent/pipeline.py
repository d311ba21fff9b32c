"""The running agent: sources -> rules -> buffer -> one delivery loop per sink.

``Agent.run(stop)`` opens the buffer, starts every source, sink and delivery
loop as tasks of one TaskGroup, serves /healthz, /readyz, /metrics and /status,
and on ``stop`` drains: sources stop first, what they produced is committed,
deliveries in flight finish (bounded), sinks close, the buffer closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import shlex
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.routing import BaseRoute

from agent import __version__, systemd
from agent.backoff import Backoff
from agent.buffer_api import buffer_routes
from agent.console import console_routes
from agent.events import (
    AgentStarted,
    BufferQuarantined,
    CloudEvent,
    Lane,
    Reading,
    TelemetryGap,
    make_event,
    stable_id,
    utc_now,
)
from agent.http_server import HttpServer
from agent.lineage import Lineage
from agent.metrics import Component, Metrics
from agent.outages import SinkOutageLog
from agent.pacing import RatePacer
from agent.plc_acks import PlcAckWriter
from agent.registry import build_sinks, build_sources
from agent.rules import RuleOutput, Rules, replayable
from agent.settings import MappingsSection, Settings
from agent.sink import PublishesStatus, RetryLater, Sink
from agent.source import BufferUnavailable, ServesHttp, Source
from agent.supervision import TaskHealth, supervise
from agent.throughput import DeliveryRate
from buffer import NO_SINK, Buffer, BufferError, DeadLetter, DeadLetterGroup, DeliveryCursor, Eviction

log = logging.getLogger(__name__)

AGENT_SOURCE = "agent"
"""Source name of the agent's own events (agent.started, telemetry.gap, buffer quarantined)."""

GAP_INTERVAL = 10.0
"""At most one telemetry.gap event per source per this many seconds."""

RETRY_AFTER_CAP = 60.0
"""The longest a peer's retry hint (HTTP Retry-After) holds a delivery loop back."""
COMMIT_LINES_PER_SECOND = 20
"""INFO lines "Transaction committed" a second at most; the rest are summed up once a second."""

EventTap = Callable[[Sequence[CloudEvent]], None]


class Agent:
    """One plantgate agent (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        sources: Sequence[Source] | None = None,
        sinks: Sequence[Sink] | None = None,
        serve_http: bool = True,
        drain_timeout: float = 10.0,
        batch_max: int | None = None,
        config_path: Path | None = None,
    ):
        self.settings = settings
        self.config_path = config_path
        """The file the settings came from (shown by the console), when known."""
        self.taps: list[EventTap] = []
        """Called with every group of events accepted into the buffer (the demo's live view, the console)."""
        self.sources = list(sources) if sources is not None else build_sources(settings)
        self.sinks = list(sinks) if sinks is not None else build_sinks(settings)
        self.rules = Rules(settings)
        self.buffer = Buffer(
            settings.data_path(settings.buffer.path),
            telemetry_max_rows=settings.buffer.telemetry_max_rows,
            max_size_mb=settings.buffer.max_size_mb,
            synchronous=settings.buffer.synchronous,
            dedupe_window=settings.buffer.dedupe_window,
            dedupe_max_ids=settings.buffer.dedupe_max_ids,
            sinks={sink.name: sink.lanes for sink in self.sinks},
            sequencing=settings.sequencing,
            journal=settings.journal.enabled,
            journal_retention=settings.journal.retention,
            journal_max_size_mb=settings.journal.max_size_mb,
        )
        self.metrics = Metrics(
            sources=[s.name for s in self.sources],
            internal_sources=[AGENT_SOURCE],
            sinks={s.name: sorted(s.lanes) for s in self.sinks},
            agent_id=settings.agent.id,
            site=settings.agent.site,
            version=__version__,
        )
        self._inlets = {source.name: _SourceInlet(self, source) for source in self.sources}
        routes: list[BaseRoute] = [
            *buffer_routes(
                settings, self.buffer, {sink.name: sink.lanes for sink in self.sinks}, lambda: self.rules.mappings
            )
        ]
        for source in self.sources:
            if isinstance(source, ServesHttp):
                routes.extend(source.routes(self._inlets[source.name]))
        self.lineage = Lineage(self)
        """Business outcomes and reconciliation (``agent.lineage``)."""
        routes.extend(self.lineage.routes())
        routes.extend(console_routes(self))
        self.http = (
            HttpServer(
                settings.http.listen,
                self,
                max_body_bytes=settings.http.max_body_bytes,
                routes=routes,
            )
            if serve_http
            else None
        )
        self.drain_timeout = drain_timeout
        self.batch_max = batch_max
        self.state = "starting"
        self.started_at = time.time()
        self._lanes_taken: set[Lane] = {lane for sink in self.sinks for lane in sink.lanes}
        self._unrouted: Counter[Lane] = Counter()
        self.delivered: Counter[str] = Counter()
        """Events acknowledged per sink since start (the demo's summary)."""
        self._stopping = asyncio.Event()
        self.acks = PlcAckWriter(
            self.sources,
            triggers={rule.ack: rule.when for rule in settings.transactions if rule.ack is not None},
            current=self.rules.current,
        )
        """The PLC handshakes: one queue and writer per source."""
        self.tasks: dict[str, TaskHealth] = {}
        """Every supervised long-running task, for /status."""
        self._oldest: dict[tuple[str, Lane], float] = {}
        self.outages = SinkOutageLog()
        self._commit_lines = 0  # "Transaction committed" lines logged in the current second
        self._commits_unlogged: list[str] = []  # ids committed beyond that, summed up once a second
        self.rates = DeliveryRate()
        """Acknowledged events per second per (sink, lane), for /status and the drain estimate."""
        self._gap_pending: dict[str, Eviction] = {}
        self._gap_sent: dict[str, float] = {}
        self._started = asyncio.Event()
        self._cursors: dict[str, DeliveryCursor] = {}
        self._dead_summary: dict[str, DeadLetterGroup] = {}
        self._dead_summary_at = (-1, 0.0)  # (dead letter count, monotonic time) it was read at
        self._pacers = {c.name: RatePacer(c.max_rate) for c in settings.sink_configs() if c.max_rate > 0}
        """``max_rate`` per sink name, applied to every sink alike (sinks built by hand included)."""
        self._idle: dict[str, asyncio.Event] = {}
        self._mappings_reloaded_at: float | None = None
        self._replayable: int | None = None  # pre-sink dead letters the reloaded mappings now accept

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain and return."""
        for lane in ("transaction", "operational", "telemetry"):
            if lane not in self._lanes_taken:
                log.warning("No sink takes this lane; its events are counted and not stored", extra={"lane": lane})
        await self.buffer.open()
        try:
            for key in self.rules.state_keys():  # counters pick up where the last run left them
                value = await self.buffer.load_state(key)
                if value is not None:
                    self.rules.restore(key, value)
            if self.http is not None:
                await self.http.start()
                log.info("HTTP server listening", extra={"url": self.http.url})
            try:
                await self._run_tasks(stop)
            finally:
                if self.http is not None:
                    await self.http.stop()
        finally:
            await self.buffer.close()
            self.state = "stopped"
            log.info("Agent stopped", extra={"agent": self.settings.agent.id})

    async def _run_tasks(self, stop: asyncio.Event) -> None:
        for sink in self.sinks:
            # Cursors first: a sink seen for the first time takes events from here on, agent.started included.
            self._cursors[sink.name] = self.buffer.cursor(sink.name, sink.lanes)
        self._announce_start()
        source_tasks: list[asyncio.Task[None]] = []
        sink_tasks: list[asyncio.Task[None]] = []
        delivery_tasks: list[asyncio.Task[None]] = []
        async with asyncio.TaskGroup() as group:

            def start(
                name: str, component: str, owner: str, run: Callable[[], Awaitable[None]], **options: Any
            ) -> asyncio.Task[None]:
                health = self.tasks[name] = TaskHealth(name, component, owner)
                restarted = functools.partial(self.metrics.component_restarted, component, owner)
                supervised = supervise(health, run, stopping=self._stopping, on_restart=restarted, **options)
                return group.create_task(supervised, name=name)

            for sink in self.sinks:
                # A crashed sink lost its connection: it says "reconnecting" until it is up again.
                run_sink = start(
                    f"sink-{sink.name}", "sink", sink.name, sink.run, status=sink.status, state_on_crash="reconnecting"
                )
                sink_tasks.append(run_sink)
                deliver = functools.partial(self._deliver_loop, sink, self._cursors[sink.name])
                delivery_tasks.append(start(f"deliver-{sink.name}", "delivery", sink.name, deliver, status=sink.status))
            for source in self.sources:
                run = functools.partial(source.run, self._inlets[source.name])
                run_source = start(
                    f"source-{source.name}", "source", source.name, run, status=source.status,
                    state_on_crash="reconnecting",
                )
                source_tasks.append(run_source)
            helpers = [
                start(f"plc-acks-{name}", "plc-acks", name, functools.partial(self.acks.run, name))
                for name in self.acks.source_names
            ]
            helpers.append(start("maintenance", "agent", "agent", self._maintenance))
            helpers.append(start("lineage", "agent", "agent", self.lineage.run))
            watchdog = functools.partial(systemd.watchdog_loop, self._stopping)
            helpers.append(start("watchdog", "agent", "agent", watchdog))
            self.state = "running"
            self._started.set()
            _settle_memory()
            systemd.ready(f"running: {len(self.sources)} sources, {len(self.sinks)} sinks")
            log.info(
                "Agent started",
                extra={
                    "agent": self.settings.agent.id,
                    "site": self.settings.agent.site,
                    "sources": [s.name for s in self.sources],
                    "sinks": [s.name for s in self.sinks],
                },
            )
            await stop.wait()
            await self._drain(source_tasks, delivery_tasks, sink_tasks, helpers)

    async def _drain(
        self,
        source_tasks: list[asyncio.Task[None]],
        delivery_tasks: list[asyncio.Task[None]],
        sink_tasks: list[asyncio.Task[None]],
        helpers: list[asyncio.Task[None]],
    ) -> None:
        self.state = "stopping"
        systemd.stopping("draining")
        log.info("Stopping: draining in-flight work", extra={"agent": self.settings.agent.id})
        # PLC acks for cycles already taken go out while the sources' sessions are still open,
        # so the line is not left waiting for a handshake; then the sources stop.
        await self.buffer.commit_now()
        await self.acks.flush(5.0)
        await _cancel(source_tasks)
        await self.buffer.commit_now()
        self._stopping.set()
        # Deliveries in flight finish (their acks settle into the buffer); no new batch starts.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain_timeout):
                for idle in self._idle.values():
                    await idle.wait()
        await _cancel(delivery_tasks)
        await self.buffer.commit_now()
        await _cancel(sink_tasks)
        await _cancel(helpers)

    def _announce_start(self) -> None:
        agent = self.settings.agent
        now = utc_now()
        uri = self.rules.source_uri(AGENT_SOURCE)
        events = [
            make_event(
                "agent.started",
                id=stable_id(uri, "started", now.isoformat()),
                source=uri,
                time=now,
                site=agent.site,
                subject=agent.id,
                data=AgentStarted(
                    agent=agent.id,
                    site=agent.site,
                    version=__version__,
                    sources=[s.name for s in self.sources],
                    sinks=[s.name for s in self.sinks],
                ),
            )
        ]
        if self.buffer.quarantined is not None:
            events.append(self._quarantine_event(self.buffer.quarantined, now))
        self.accept(AGENT_SOURCE, RuleOutput(events=events))

    def _quarantine_event(self, quarantined: dict[str, Any], now: datetime) -> CloudEvent:
        agent = self.settings.agent
        uri = self.rules.source_uri(AGENT_SOURCE)
        return make_event(
            "agent.buffer.quarantined",
            id=stable_id(uri, "quarantined", quarantined["moved_to"]),
            source=uri,
            time=now,
            site=agent.site,
            subject=agent.id,
            data=BufferQuarantined(**quarantined),
        )

    def _report_quarantines(self) -> None:
        """A buffer file found corrupt while running was moved aside: say so, as at start."""
        buffer = self.buffer
        if not buffer.on_quarantine.is_set():
            return
        buffer.on_quarantine.clear()
        found, buffer.quarantines = buffer.quarantines, []
        now = utc_now()
        self.accept(AGENT_SOURCE, RuleOutput(events=[self._quarantine_event(info, now) for info in found]))

    # --- ingest ---------------------------------------------------------------------------------

    def accept(self, source: str, out: RuleOutput) -> asyncio.Future[None] | None:
        """Append what the rules produced; returns the commit future (None when nothing to store)."""
        events = out.events
        if self._unrouted_lanes(events):
            events = [e for e in events if e.lane in self._lanes_taken]
        if not events and not out.dead_letters and not out.state:
            if out.acks:
                # A cycle with nothing to store (its condition did not hold, or no sink takes its lane):
                # the PLC is acknowledged all the same, so the line goes on.
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                self.acks.submit(done, out.acks)
            return None
        buffer = self.buffer
        before = buffer.duplicates_suppressed
        future = appended = buffer.append(events, out.dead_letters, out.contexts)
        for key, value in out.state.items():
            # The rules' counter state, in the same group commit as the events it counted.
            future = buffer.save_state(key, value)
        duplicates = buffer.duplicates_suppressed - before
        if duplicates:
            self.metrics.duplicates_suppressed(source, duplicates)
        if events and log.isEnabledFor(logging.INFO):
            committed = [
                (e.id, e.type, e.subject, e.correlationid, e.sequence)
                for e in events
                if e.lane == "transaction" and e.sequence is not None  # not a duplicate the buffer dropped
            ]
            if committed:
                appended.add_done_callback(functools.partial(self._log_committed, source, committed))
        if events:
            by_lane = Counter(event.lane for event in events)
            for lane, count in by_lane.items():
                self.metrics.received(source, lane, count)
            for tap in self.taps:
                tap(events)
        for dead in out.dead_letters:
            self.metrics.dead_lettered(dead.sink, "mapping")
            log.warning(
                "Dead letter before any sink",
                extra={"event_id": dead.id, "type": dead.type, "subject": dead.subject, "reason": dead.reason},
            )
        if out.suppressed:
            self.metrics.telemetry_suppressed(source, out.suppressed)
        if out.acks:
            self.acks.submit(future, out.acks)
        return future

    def _log_committed(self, source: str, committed: Sequence[tuple[str, str, str | None, str | None, str | None]],
                       future: asyncio.Future[None]) -> None:
        """One INFO line per transaction committed, up to 20 a second; beyond that a summary per second."""
        if future.cancelled() or future.exception() is not None:
            return
        for event_id, type_, subject, correlationid, sequence in committed:
            if self._commit_lines < COMMIT_LINES_PER_SECOND:
                self._commit_lines += 1
                log.info(
                    "Transaction committed",
                    extra={"source": source, "event_id": event_id, "type": type_, "subject": subject,
                           "correlationid": correlationid, "sequence": sequence},
                )
            else:
                self._commits_unlogged.append(event_id)

    def _log_commit_summary(self) -> None:
        unlogged, self._commits_unlogged = self._commits_unlogged, []
        self._commit_lines = 0
        if unlogged:
            log.info(
                "Transactions committed",
                extra={"count": len(unlogged), "first_event_id": unlogged[0], "last_event_id": unlogged[-1]},
            )

    def _unrouted_lanes(self, events: Sequence[CloudEvent]) -> bool:
        unrouted = False
        for event in events:
            if event.lane not in self._lanes_taken:
                self._unrouted[event.lane] += 1
                unrouted = True
        return unrouted

    # --- delivery -------------------------------------------------------------------------------

    async def _deliver_loop(self, sink: Sink, cursor: DeliveryCursor) -> None:
        """Take a batch, deliver it, settle the outcomes; back off while the peer is away.

        A sink that knows when to try again says so (``RetryLater.after``); otherwise
        the wait is jittered and capped at a few seconds, so a peer that is back is
        used again within seconds, not after a long grown backoff.
        """
        backoff = Backoff(base=0.5, cap=5.0)
        metrics = self.metrics
        idle = self._idle[sink.name] = asyncio.Event()
        idle.set()
        pacer = self._pacers.get(sink.name)
        limit = min(self.batch_max or sink.batch_max, sink.batch_max, pacer.burst if pacer else sink.batch_max)
        while not self._stopping.is_set():
            batch = await cursor.next_batch(limit)
            if not batch or self._stopping.is_set():
                continue
            if pacer is not None and not await pacer.acquire(len(batch), self._stopping):
                continue
            idle.clear()
            try:
                outcomes = await sink.deliver(batch)
                settlement = cursor.settle(batch, outcomes)
            finally:
                idle.set()
            if settlement.acked:
                self.delivered[sink.name] += len(settlement.acked)
                now = time.time()
                lanes: dict[Lane, list[float]] = {}
                for event in settlement.acked:
                    lanes.setdefault(event.lane, []).append(now - event.enqueued)
                for lane, latencies in lanes.items():
                    self.rates.record((sink.name, lane), len(latencies))
                    metrics.delivered(sink.name, lane, len(latencies))
                    metrics.observe_latency(sink.name, lane, latencies)
            for event, reason in settlement.rejected:
                metrics.dead_lettered(sink.name, "rejected")
                log.error(
                    "Sink rejected an event; kept as a dead letter",
                    extra={"sink": sink.name, "event_id": event.id, "type": event.type, "reason": reason},
                )
            if settlement.retry:
                metrics.retried(sink.name, settlement.retry)
                hint = max((o.after for o in outcomes if isinstance(o, RetryLater) and o.after), default=None)
                if hint is not None:
                    # The peer said when (Retry-After): wait that long, not our own guess, within a cap.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), min(hint, RETRY_AFTER_CAP))
                else:
                    await backoff.wait(self._stopping)
            else:
                backoff.reset()

    # --- mappings reload ------------------------------------------------------------------------

    async def reload_mappings(self, mappings: MappingsSection, *, origin: str | None = None) -> int | None:
        """Map with new ``[mappings]`` from the next batch on (SIGHUP), and say which dead letters they fix.

        Counts the pre-sink dead letters a mapping caused that the new mappings now
        accept (as ``plantgate buffer replay`` would map them), for ``/status`` and
        one log line; it replays nothing: that is the operator's decision. Returns
        the count, None when the buffer cannot be read. ``ValueError`` (a rule's unit
        conversion no longer works) leaves the running mappings.
        """
        self.rules.use_mappings(mappings)
        reloaded_at = time.time()
        log.warning(
            "Mappings reloaded; the rest of the config is not reloaded (restart for that)",
            extra={
                "config": origin,
                "items": len(mappings.items),
                "uom": len(mappings.uom),
                "unknown_items": mappings.unknown_items,
                "ratelimit": False,  # one line per operator action
            },
        )
        found = await self._count_replayable()
        self._mappings_reloaded_at = reloaded_at  # /status shows the reload with its count
        if found:
            reason = _replay_reason(found)
            log.warning(
                f"{len(found)} dead letters now replayable; run plantgate buffer replay --reason {shlex.quote(reason)}",
                extra={"replayable": len(found), "reason": reason, "ratelimit": False},
            )
        return None if found is None else len(found)

    async def _count_replayable(self) -> list[DeadLetter] | None:
        if not self.buffer.is_open:
            return None
        try:
            letters = await self.buffer.dead_letters(NO_SINK)
        except BufferError as exc:
            log.warning("Cannot read the dead letters to count the replayable ones", extra={"error": str(exc)})
            return None
        found = replayable(self.rules.mappings, letters)
        self._replayable = len(found)
        return found

    def _replayable_status(self) -> dict[str, Any] | None:
        if self._mappings_reloaded_at is None:
            return None
        reloaded = datetime.fromtimestamp(self._mappings_reloaded_at, UTC).isoformat().replace("+00:00", "Z")
        return {"count": self._replayable, "mappings_reloaded_at": reloaded}

    # --- upkeep ---------------------------------------------------------------------------------

    async def _maintenance(self) -> None:
        """Once a second: buffer size cap, telemetry gap events, aggregation windows."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            tick += 1
            await self.buffer.maintain()
            self._log_commit_summary()
            for sink in self.sinks:
                depth = sum(self.buffer.depth(sink.name, lane) for lane in sink.lanes)
                rate = sum(self.rates.rate((sink.name, lane)) for lane in sink.lanes)
                status = sink.status
                self.outages.observe(
                    sink.name, status.state, status.since, depth, self.delivered[sink.name], rate, status.last_error
                )
            self._report_quarantines()
            self._report_evictions()
            if self.rules.aggregating:
                out = self.rules.flush_due(utc_now())
                for source in {e.source.rsplit("/", 1)[-1] for e in out.events}:
                    self.accept(source, RuleOutput(events=[e for e in out.events if e.source.endswith("/" + source)]))
                if out.dead_letters or out.state:
                    # Window rules' dead letters and counter state, committed after the events they counted.
                    self.accept("rules", RuleOutput(dead_letters=out.dead_letters, state=out.state))
            await self._refresh_dead_letters()  # cheap unless dead letters changed
            if tick % 5 == 0:
                await self._refresh_oldest()
                self.rates.sample()
            figures = None
            for sink in self.sinks:
                if isinstance(sink, PublishesStatus):  # each sink refreshes on its own interval
                    figures = figures or self.key_figures()
                    sink.publish_status(figures)

    def _report_evictions(self) -> None:
        buffer = self.buffer
        if buffer.evictions:
            evictions, buffer.evictions = buffer.evictions, []
            for eviction in evictions:
                self.metrics.telemetry_evicted(eviction.events, eviction.samples)
                pending = self._gap_pending.get(eviction.source)
                if pending is None:
                    self._gap_pending[eviction.source] = eviction
                else:
                    pending.events += eviction.events
                    pending.samples += eviction.samples
                    pending.start = min(pending.start, eviction.start)
                    pending.end = max(pending.end, eviction.end)
                    pending.tags.extend(tag for tag in eviction.tags if tag not in pending.tags)
        now = time.monotonic()
        events: list[CloudEvent] = []
        for source, gap in list(self._gap_pending.items()):
            if now - self._gap_sent.get(source, -GAP_INTERVAL) < GAP_INTERVAL:
                continue
            del self._gap_pending[source]
            self._gap_sent[source] = now
            uri = self.rules.source_uri(source)
            log.warning(
                "Telemetry evicted from the full buffer",
                extra={"source": source, "evicted_events": gap.events, "evicted_samples": gap.samples},
            )
            events.append(
                make_event(
                    "telemetry.gap",
                    id=stable_id(uri, "gap", gap.start.isoformat(), gap.end.isoformat(), gap.events),
                    source=uri,
                    time=gap.end,
                    site=self.settings.agent.site,
                    subject=source,
                    partitionkey=source,
                    data=TelemetryGap(
                        source=source,
                        tags=gap.tags,
                        evicted_events=gap.events,
                        evicted_samples=gap.samples,
                        start=gap.start,
                        end=gap.end,
                    ),
                )
            )
        if events:
            self.accept(AGENT_SOURCE, RuleOutput(events=events))

    async def _refresh_dead_letters(self) -> None:
        """Re-read the dead-letter summary when dead letters changed (and every 30 s for safety)."""
        count, read_at = self._dead_summary_at
        now = time.monotonic()
        if count == self.buffer.dead_letter_count and now - read_at < 30.0:
            return
        try:
            self._dead_summary = await self.buffer.dead_letter_summary()
        except BufferError:
            return
        self._dead_summary_at = (self.buffer.dead_letter_count, now)
        if self._mappings_reloaded_at is not None:
            await self._count_replayable()  # a replay (or new dead letters) changes what is replayable
        wall = time.time()
        self.metrics.set_dead_letters_held(
            {sink: (group.count, max(0.0, wall - group.oldest)) for sink, group in self._dead_summary.items()}
        )

    def _held_status(self) -> dict[str, Any]:
        held = self.buffer.held_summary()
        return {"count": held.count, "oldest_age_seconds": held.oldest_age_seconds, "types": held.types}

    def _dead_letters_of(self, sink: str) -> dict[str, Any]:
        group = self._dead_summary.get(sink)
        if group is None:
            return {"count": 0, "oldest_age_seconds": 0.0, "reasons": {}}
        age = round(max(0.0, time.time() - group.oldest), 3)
        return {"count": group.count, "oldest_age_seconds": age, "reasons": dict(group.reasons)}

    async def _refresh_oldest(self) -> None:
        for sink in self.sinks:
            for lane in sink.lanes:
                age = await self.buffer.oldest_age(sink.name, lane)
                self._oldest[(sink.name, lane)] = age or 0.0

    # --- monitoring (AgentView) -----------------------------------------------------------------

    async def refresh_metrics(self) -> None:
        """Fresh gauges before a /metrics scrape."""
        if not self.buffer.is_open:
            return
        await self._refresh_oldest()
        await self._refresh_dead_letters()
        await self.lineage.refresh_metrics()
        self.metrics.set_buffer(
            {
                (sink.name, lane): (self.buffer.depth(sink.name, lane), self._oldest.get((sink.name, lane), 0.0))
                for sink in self.sinks
                for lane in sink.lanes
            }
        )
        self.metrics.set_buffer_size(self.buffer.size_bytes)
        held = self.buffer.held_summary()
        self.metrics.set_events_held(
            {**{rule.type: 0 for rule in self.settings.sequencing}, **held.types}
        )
        headroom = self._headroom()
        self.metrics.set_headroom(headroom["max_size_bytes"], headroom["disk_free_bytes"])
        self.metrics.set_refusing_writes(self.buffer.refusing_writes is not None)
        components: list[tuple[Component, Source | Sink]] = [
            *(("source", source) for source in self.sources),
            *(("sink", sink) for sink in self.sinks),
        ]
        for component, item in components:
            self.metrics.set_connection(component, item.name, item.status.state == "connected", item.status.state)
            # A speedup in use (or its fallback) is visible to monitoring, not only in /status.
            path = item.status.info.get("decoder")
            if path is not None:
                self.metrics.set_component_path(component, item.name, path)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """503 while starting, stopping or refusing writes; else 200 listing what is degraded."""
        if self.state != "running":
            return False, {"status": "unready", "reason": self.state}
        refusing = self.buffer.refusing_writes
        if refusing is not None:
            return False, {"status": "unready", "reason": refusing}
        degraded: list[dict[str, Any]] = []
        for component, items in (("source", self.sources), ("sink", self.sinks)):
            for item in items:
                status = item.status
                if status.state != "connected":
                    degraded.append(
                        {component: item.name, "state": status.state, "error": status.last_error}
                    )
                for key, reason in status.degraded.items():
                    degraded.append({component: item.name, "item": key, "error": reason})
        for name, health in self.tasks.items():
            if health.state == "restarting":
                degraded.append({"task": name, "state": health.state, "error": health.last_error})
        return True, {"status": "ready", "degraded": degraded}

    def status(self) -> dict[str, Any]:
        """The /status document."""
        agent = self.settings.agent
        sinks: dict[str, Any] = {}
        for sink in self.sinks:
            lanes = {}
            for lane in sorted(sink.lanes):
                depth = self.buffer.depth(sink.name, lane)
                drain = self.rates.drain_seconds((sink.name, lane), depth)
                lanes[lane] = {
                    "depth": depth,
                    "oldest_age_seconds": round(self._oldest.get((sink.name, lane), 0.0), 3),
                    "rate_per_second": round(self.rates.rate((sink.name, lane)), 1),
                    "drain_seconds": None if drain is None else round(drain, 1),
                }
            sinks[sink.name] = {
                **_status_of(sink.status),
                "depth": sum(entry["depth"] for entry in lanes.values()),
                "lanes": lanes,
                "dead_letters": self._dead_letters_of(sink.name),
            }
        return {
            "agent": {
                "id": agent.id,
                "site": agent.site,
                "version": __version__,
                "state": self.state,
                "uptime_seconds": round(time.time() - self.started_at, 1),
            },
            "sources": {source.name: _status_of(source.status) for source in self.sources},
            "sinks": sinks,
            "buffer": {
                "path": str(self.buffer.path),
                "size_bytes": self.buffer.size_bytes,
                "refusing_writes": self.buffer.refusing_writes,
                **self._headroom(),
                "last_sequence": self.buffer.last_sequence,
                "dead_letters": self.buffer.dead_letter_count,
                "dead_letters_by_sink": {name: self._dead_letters_of(name) for name in self._dead_summary},
                "duplicates_suppressed": self.buffer.duplicates_suppressed,
                "replayable_dead_letters": self._replayable_status(),
                "dedupe": self.buffer.dedupe_status(),
                "held": self._held_status(),
                "journal": self.buffer.journal_stats(),
            },
            "unrouted": dict(self._unrouted),
            "tasks": {name: health.as_dict() for name, health in self.tasks.items()},
            "plc_acks": self.acks.status(),
            **({} if (lineage := self.lineage.status()) is None else {"lineage": lineage}),
        }

    def key_figures(self) -> dict[str, Any]:
        """The few numbers central monitoring needs, for the MQTT status heartbeat (a compact /status)."""
        status = self.status()
        buffer = status["buffer"]
        return {
            "uptime_seconds": status["agent"]["uptime_seconds"],
            "sources": {name: source["state"] for name, source in status["sources"].items()},
            "sinks": {
                name: {
                    "state": sink["state"],
                    "depth": sink["depth"],
                    "oldest_age_seconds": max([lane["oldest_age_seconds"] for lane in lanes], default=0),
                    "drain_seconds": _slowest(lane["drain_seconds"] for lane in lanes),
                    "dead_letters": sink["dead_letters"]["count"],
                }
                for name, sink in status["sinks"].items()
                for lanes in [list(sink["lanes"].values())]
            },
            "dead_letters": buffer["dead_letters"],
            "refusing_writes": buffer["refusing_writes"],
            "headroom_bytes": buffer["headroom_bytes"],
        }

    def _headroom(self) -> dict[str, int]:
        """Room left: to ``max_size_mb`` and on the buffer's file system (whichever ends first)."""
        free = disk_free_bytes(self.buffer.path)
        to_cap = max(0, self.buffer.max_size_bytes - self.buffer.size_bytes)
        return {
            "max_size_bytes": self.buffer.max_size_bytes,
            "disk_free_bytes": free,
            "headroom_bytes": min(to_cap, free),
        }

    async def wait_started(self) -> None:
        """Returns once every source and sink task has been started."""
        await self._started.wait()


class _SourceInlet:
    """Where one source hands what it read: rules, then the buffer; returns after the commit.

    Back-pressure is here: while the buffer refuses writes the source waits, and
    with it its peer (an OPC UA server keeps the notifications, a webhook caller
    waits for its 202).
    """

    def __init__(self, agent: Agent, source: Source):
        self._agent = agent
        self._name = source.name

    async def readings(self, batch: Sequence[Reading]) -> None:
        agent = self._agent
        await self._writable()
        out = agent.rules.process(self._name, batch)
        agent.acks.observe(self._name)
        try:
            future = agent.accept(self._name, out)
        except BufferError as exc:  # the buffer is closing (the agent stops)
            raise BufferUnavailable(str(exc)) from exc
        await self._committed(future)

    async def events(self, batch: Sequence[CloudEvent], *, state: Mapping[str, str | None] | None = None) -> None:
        agent = self._agent
        await self._writable()
        try:
            future = agent.accept(self._name, agent.rules.accept_events(self._name, batch))
            for key, value in (state or {}).items():
                # Queued after the events: the same group commit, so both or neither are durable.
                future = agent.buffer.save_state(f"source/{self._name}/{key}", value)
        except BufferError as exc:  # the buffer is closing (the agent stops)
            raise BufferUnavailable(str(exc)) from exc
        await self._committed(future)

    def tag_value(self, tag: str) -> Reading | None:
        return self._agent.rules.current.get(tag)

    def refusing(self) -> str | None:
        return self._agent.buffer.refusing_writes

    async def load_state(self, key: str) -> str | None:
        return await self._agent.buffer.load_state(f"source/{self._name}/{key}")

    async def save_state(self, key: str, value: str | None) -> None:
        try:
            await asyncio.shield(self._agent.buffer.save_state(f"source/{self._name}/{key}", value))
        except BufferError as exc:
            raise BufferUnavailable(str(exc)) from exc

    async def _writable(self) -> None:
        try:
            await self._agent.buffer.wait_writable()
        except BufferError as exc:
            self._agent.metrics.source_batch_retried(self._name)
            raise BufferUnavailable(str(exc)) from exc

    async def _committed(self, future: asyncio.Future[None] | None) -> None:
        if future is None:
            return
        try:
            await asyncio.shield(future)
        except BufferError as exc:
            # The source keeps the batch (an OPC UA server its notifications) and offers it again.
            self._agent.metrics.source_batch_retried(self._name)
            raise BufferUnavailable(str(exc)) from exc


def _replay_reason(letters: Sequence[DeadLetter]) -> str:
    """The ``--reason`` text that selects ``letters`` for a replay (they are all item mapping problems)."""
    for text in ("obsolete", "not in [mappings.items]"):
        if all(text in letter.reason for letter in letters):
            return text
    return "item code"


def _status_of(status: Any) -> dict[str, Any]:
    return {
        "kind": status.kind,
        "state": status.state,
        "since": datetime.fromtimestamp(status.since, UTC).isoformat(),
        "last_error": status.last_error,
        "degraded": dict(status.degraded),
        **({"info": dict(status.info)} if status.info else {}),
    }


def _slowest(estimates: Iterable[float | None]) -> float | None:
    """The longest drain estimate; None (stalled) wins."""
    longest = 0.0
    for estimate in estimates:
        if estimate is None:
            return None
        longest = max(longest, estimate)
    return longest


def disk_free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    try:
        stat = os.statvfs(path.parent)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _settle_memory() -> None:
    """After start-up: move what imports and config built out of the collector's way, return freed heap.

    Everything alive now (modules, classes, config) lives as long as the process, so
    freezing it keeps every later full collection from walking it again; trimming gives
    the start-up garbage back to the OS (glibc only).
    """
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
