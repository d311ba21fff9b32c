"""Classification and transactions: readings in, canonical events out.

Per source batch: telemetry beyond its deadband (absolute and/or percent of the
last forwarded value; with ``min_interval``, at most one sample per interval, the
latest held back to the interval's end) or its aggregation window goes into one
``telemetry.samples`` event, state changes become
``machine.state.changed``, and ``[[transactions]]`` rules fire on their trigger
tag's edge (``on``: rising, falling, change, or a counter's increment), while
their ``condition`` holds, with fields filled from the values of other tags at the
trigger's source time, from literals and from templates; a field naming a
``counter`` tag takes what the counter counted since that rule last fired
(wrap-around and resets handled by ``agent.counters``); quantities are converted
from ``uom`` to ``uom_to`` exactly (``agent.units``).
Rules with ``when_event`` fire on each event of that type a source hands over
(a scan, an MES event; ``accept_events``), with fields also from the event's data,
under an id derived from the rule and the triggering event's id.
Rules with ``every`` fire from ``flush_due`` at each wall-clock window boundary
(multiples of ``every`` since the epoch, UTC), their counter fields taking what
was counted since the rule last fired, under an id derived from the rule and the
window's end, so a restart inside a window does not fire it twice.
Item codes, units and plant / line / work-center ids are mapped by ``map_data``
(``_map`` for the rules' own quantities); mapping problems become dead letters
(sink ``-``), never drops.

Pure and synchronous: no I/O, no awaits, so it is cheap per batch and easy to
test with data-driven cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import msgspec

from agent.config_types import TagConfig
from agent.counters import CounterTracker
from agent.events import (
    TYPE_PREFIX,
    Aggregate,
    CloudEvent,
    MachineStateChanged,
    Quantity,
    Reading,
    Sample,
    TelemetryAggregates,
    TelemetrySamples,
    decimal_string,
    encode_event,
    identifier_string,
    make_event,
    stable_id,
    traceparent_for,
)
from agent.settings import (
    EVENT_PLACEHOLDER,
    TEMPLATE_PLACEHOLDER,
    FieldEvent,
    FieldLiteral,
    FieldValue,
    ItemMapping,
    MappingsSection,
    RuleCondition,
    Settings,
    TransactionRule,
    field_value_tags,
    rule_conversion,
)
from agent.units import Conversion
from agent.units import conversion as unit_conversion
from buffer import NO_SINK, DeadLetter

MAX_SAMPLES_PER_EVENT = 1000
"""Bounds one telemetry row: a busy source still costs one row per ~1000 changes."""

IDENTIFIER_FIELDS = frozenset({"work_order", "item", "lot", "serial", "station"})

COUNTER_STATE_PREFIX = "rules/counter/"
"""Buffer state keys of counter tags: ``rules/counter/<tag>``."""

WINDOW_STATE_PREFIX = "rules/window/"
"""Buffer state keys of window rules: ``rules/window/<rule>`` holds the end of the last window closed."""


class _CounterState(msgspec.Struct):
    raw: int | None  # the last raw reading
    total: int  # counts since the counter was first read (across restarts)
    fired: list[tuple[str, str, int]] = []  # (rule, field, total at that rule's last firing)


_counter_state_encoder = msgspec.json.Encoder()
_counter_state_decoder = msgspec.json.Decoder(_CounterState)


class PlcAck(NamedTuple):
    """A PLC handshake to write once the cycle's event (or its dead letter) is committed."""

    tag: str
    event_id: str | None = None  # the event the cycle produced, for the log line


@dataclass
class RuleOutput:
    """What one batch produced: events to buffer, dead letters, PLC acks to write after commit."""

    events: list[CloudEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    acks: list[PlcAck] = field(default_factory=list)  # ack tags to write True once committed
    suppressed: int = 0  # telemetry changes inside the deadband
    unmet: int = 0  # trigger edges of rules whose condition did not hold (no event, by the site's config)
    state: dict[str, str] = field(default_factory=dict)
    """Counter state to save durably in the same commit as ``events`` (``Rules.restore`` takes it back)."""
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Event id -> what triggered a rule's event (source, rule, the raw values it read), for lineage."""

    def extend(self, other: RuleOutput) -> None:
        self.events.extend(other.events)
        self.contexts.update(other.contexts)
        self.dead_letters.extend(other.dead_letters)
        self.acks.extend(other.acks)
        self.suppressed += other.suppressed
        self.unmet += other.unmet
        self.state.update(other.state)


class LastFired(NamedTuple):
    """The last event a rule produced (for the console's tag and rule view)."""

    id: str
    type: str
    subject: str | None
    time: str  # the event's source time, ISO 8601
    committed_at: float  # when the rule made it (Unix time)


@dataclass
class _Window:
    start: datetime
    end: datetime
    count: int = 0
    low: float = math.inf
    high: float = -math.inf
    total: float = 0.0
    last: float = 0.0


@dataclass
class _TagState:
    config: TagConfig
    source: str
    forwarded: Any = None  # last value forwarded as a sample (deadband reference)
    forwarded_quality: str | None = None
    has_forwarded: bool = False
    state_name: str | None = None
    state_since: datetime | None = None
    window: _Window | None = None
    pending: Reading | None = None  # min_interval: the latest change held back to the interval's end
    next_at: datetime | None = None  # min_interval: when the current interval ends (source time)
    triggers: list[TransactionRule] = field(default_factory=list)
    trigger_value: Any = None
    trigger_known: bool = False
    trigger_total: int | None = None  # a counter trigger's running total at its last reading (``increment``)
    fired_time: datetime | None = None
    counter: CounterTracker | None = None  # kind "counter": running total for transaction fields


class Rules:
    """The classification and transaction rules of one agent (see the module docstring)."""

    def __init__(self, settings: Settings):
        self.site = settings.agent.site
        self.agent_id = settings.agent.id
        self.mappings = settings.mappings
        self._tags: dict[str, _TagState] = {}
        for source in settings.source_configs():
            for tag in source.tag_configs():
                state = _TagState(config=tag, source=source.name)
                if tag.kind == "counter":
                    state.counter = CounterTracker(tag.counter_spec())
                self._tags[tag.tag] = state
        self._event_rules: dict[str, list[TransactionRule]] = {}
        """Event type (without prefix) -> the rules it fires (``when_event``)."""
        for rule in settings.transactions:
            if rule.when_event is not None:
                self._event_rules.setdefault(rule.when_event, []).append(rule)
            elif rule.every is not None:
                pass  # fired by flush_due on the clock
            else:
                self._tags[rule.when].triggers.append(rule)
        self.current: dict[str, Reading] = {}
        """The latest good reading of every tag: rules fill their fields from it."""
        self.last_fired: dict[str, LastFired] = {}
        """Rule name -> the last event it produced (dead letters not counted)."""
        self._last_bad: dict[str, Reading] = {}  # the latest bad reading of a tag (rules never read those)
        # Tags whose readings are kept per batch: each trigger reads them as they were at its own source time.
        self._field_tags = frozenset(
            {tag for rule in settings.transactions for tag in rule.read_tags()}
            | {rule.when for rule in settings.transactions if rule.on == "increment"}
        )
        self._counter_fields: dict[str, list[tuple[str, str]]] = {}
        """Counter tag -> the (rule, field) pairs that take what it counted."""
        for rule in settings.transactions:
            for key, value in rule.fields.items():
                if isinstance(value, str) and self._tags[value].counter is not None:
                    self._counter_fields.setdefault(value, []).append((rule.name, key))
        self._rules = {rule.name: rule for rule in settings.transactions}
        self._conversions: dict[str, Conversion | None] = {
            rule.name: rule_conversion(rule, settings.mappings) for rule in settings.transactions
        }
        self._batch_fields: dict[str, list[Reading]] = {}
        self._before_batch: dict[str, Reading | None] = {}
        # Counter fields: the running total at each reading of the batch, and the count at each rule's last firing.
        self._batch_totals: dict[str, list[int]] = {}
        self._before_totals: dict[str, int] = {}
        self._fired_totals: dict[tuple[str, str], int] = {}
        self._touched: set[str] = set()  # counter tags whose state changed in this batch
        self._source_uri = {name: self.source_uri(name) for name in {s.source for s in self._tags.values()}}
        self._window_rules = [rule for rule in settings.transactions if rule.every is not None]
        # Settings checked that a window rule's counters share one source: its events come from it.
        self._window_source = {
            rule.name: self._tags[next(iter(self._counter_tags(rule).values()))].source for rule in self._window_rules
        }
        self._window_ends: dict[str, datetime] = {}
        """Window rule -> end of the last window it closed (restored at start)."""
        self._flushes = bool(self._window_rules) or any(
            state.config.aggregate is not None or state.config.min_interval is not None for state in self._tags.values()
        )

    def latest_readings(self) -> dict[str, Reading]:
        """Tag -> its latest reading whatever its quality (for the console; rules use ``current``).

        A bad reading is shown when it is at least as recent (source time) as the last good one.
        """
        latest = dict(self.current)
        for tag, bad in self._last_bad.items():
            good = latest.get(tag)
            if good is None or bad.time >= good.time:
                latest[tag] = bad
        return latest

    def use_mappings(self, mappings: MappingsSection) -> None:
        """Take new ``[mappings]`` (a reload): the next batch maps with them; ``ValueError`` leaves the old ones.

        Rules' unit conversions follow the new ``[mappings.uom]``.
        """
        conversions = {name: rule_conversion(rule, mappings) for name, rule in self._rules.items()}
        self.mappings = mappings
        self._conversions = conversions

    def source_uri(self, source: str) -> str:
        """The CloudEvents ``source`` of events from ``source``."""
        return f"plantgate/{self.site}/{self.agent_id}/{source}"

    # --- per batch ------------------------------------------------------------------------------

    def process(self, source: str, batch: Sequence[Reading]) -> RuleOutput:
        """Classify one batch of readings of ``source``; see the module docstring."""
        out = RuleOutput()
        samples: list[Sample] = []
        aggregates: list[Aggregate] = []
        triggered: list[tuple[_TagState, Reading]] = []
        tags = self._tags
        field_tags = self._field_tags
        current = self.current
        self._batch_fields.clear()
        self._before_batch.clear()
        self._batch_totals.clear()
        for reading in batch:
            state = tags.get(reading.tag)
            if state is None:
                continue
            if reading.quality != "bad":
                if reading.tag in field_tags:
                    # Kept per batch: each trigger takes the values current at its own source time.
                    seen = self._batch_fields.setdefault(reading.tag, [])
                    if not seen:
                        self._before_batch[reading.tag] = current.get(reading.tag)
                    seen.append(reading)
                    if state.counter is not None:
                        self._count(state.counter, reading)
                current[reading.tag] = reading
            else:
                self._last_bad[reading.tag] = reading
            if state.triggers:
                triggered.append((state, reading))
            kind = state.config.kind
            if kind == "telemetry":
                if state.config.aggregate is not None:
                    done = self._aggregate(state, reading)
                    if done is not None:
                        aggregates.append(done)
                    continue
                if state.config.min_interval is not None:
                    self._throttle(state, reading, samples, out)
                elif self._beyond_deadband(state, reading):
                    samples.append(Sample(reading.tag, reading.time, _sample_value(reading.value), reading.quality))
                else:
                    out.suppressed += 1
            elif kind == "state":
                self._state_change(state, reading, out)
                if self._changed(state, reading):
                    samples.append(Sample(reading.tag, reading.time, _sample_value(reading.value), reading.quality))
            elif (kind == "counter" or state.config.forward) and self._changed(state, reading):
                samples.append(Sample(reading.tag, reading.time, _sample_value(reading.value), reading.quality))
        # Triggers after every value of the batch is current: a PLC sets work order and quantity
        # and then the cycle bit, and one publish may carry them in any order.
        for state, reading in triggered:
            self._trigger(state, reading, out)
        if self._touched:
            out.state = {COUNTER_STATE_PREFIX + tag: self._counter_state(tag) for tag in self._touched}
            self._touched.clear()
        if samples:
            out.events.extend(self._samples_events(source, samples))
        if aggregates:
            out.events.append(self._aggregates_event(source, aggregates))
        return out

    def flush_due(self, now: datetime, grace: float = 1.0) -> RuleOutput:
        """Close aggregation windows whose end passed ``grace`` seconds ago (values stopped changing).

        Also sends the samples ``min_interval`` held back whose interval ended by
        ``now`` (no grace: the value is known, only its turn was awaited).
        """
        out = RuleOutput()
        by_source: dict[str, list[Aggregate]] = {}
        held: dict[str, list[Sample]] = {}
        limit = now - timedelta(seconds=grace)
        for tag, state in self._tags.items():
            window = state.window
            if window is not None and window.end <= limit:
                by_source.setdefault(state.source, []).append(_aggregate_of(tag, window))
                state.window = None
            if state.pending is not None and state.next_at is not None and state.next_at <= now:
                held.setdefault(state.source, []).append(self._send_pending(state))
        for source, aggregates in by_source.items():
            out.events.append(self._aggregates_event(source, aggregates))
        for source, samples in held.items():
            out.events.extend(self._samples_events(source, samples))
        for rule in self._window_rules:
            self._close_window(rule, limit, out)
        if self._touched:
            out.state.update({COUNTER_STATE_PREFIX + tag: self._counter_state(tag) for tag in self._touched})
            self._touched.clear()
        return out

    def _counter_tags(self, rule: TransactionRule) -> dict[str, str]:
        """Field key -> counter tag, for the fields of ``rule`` that name a counter."""
        return {
            key: value
            for key, value in rule.fields.items()
            if isinstance(value, str) and value in self._tags and self._tags[value].counter is not None
        }

    def _counter_read(self, tag: str) -> bool:
        """Whether a counter has a raw value, read in this run or restored from the last."""
        counter = self._tags[tag].counter
        return counter is not None and counter.previous is not None

    def _close_window(self, rule: TransactionRule, limit: datetime, out: RuleOutput) -> None:
        """Fire a window rule once when a boundary passed since its last window (``grace`` before ``now``).

        After a stop across one or more boundaries it fires once, at the latest
        boundary, with everything counted since it last fired. On the very first
        start (nothing saved) the window in progress is where it starts: its first
        event carries everything counted since the counter's first reading.
        """
        assert rule.every is not None
        width = rule.every
        end = datetime.fromtimestamp(math.floor(limit.timestamp() / width) * width, UTC)
        last = self._window_ends.get(rule.name)
        if last is not None and end <= last:
            return
        self._window_ends[rule.name] = end
        out.state[WINDOW_STATE_PREFIX + rule.name] = end.isoformat()
        if last is None:
            return
        # Everything read up to this tick counts (a reading polled just after the boundary
        # goes with this window); no per-batch source-time choice applies between batches.
        self._batch_fields.clear()
        counters = self._counter_tags(rule)
        if not all(self._counter_read(tag) for tag in counters.values()):
            return  # a counter not read yet counted nothing: the next window takes it from its first reading
        if rule.condition is not None and not self._holds(rule.condition, end):
            return  # not fired: what was counted goes into the next window that fires
        counted = [
            self._total_at(tag, end) - self._fired_totals.get((rule.name, key), 0) for key, tag in counters.items()
        ]
        if rule.skip_zero is not False and not any(counted):
            return
        source = self._window_source[rule.name]
        uri = self._source_uri[source]
        problems: list[str] = []
        data = self._fill(rule, end, None, problems)
        subject = _subject(data, next(iter(counters.values())))
        event = self._transaction(rule, stable_id(uri, rule.name, end.isoformat()), uri, end, subject, data, problems)
        self._emit(
            event,
            problems,
            out,
            lambda: {
                "source": source,
                "rule": rule.name,
                "window_end": end.isoformat(),
                "values": self._raw_values(rule, end, []),
            },
        )

    @property
    def aggregating(self) -> bool:
        """True when some tag aggregates or holds samples back (the agent then calls ``flush_due`` periodically)."""
        return self._flushes

    # --- telemetry ------------------------------------------------------------------------------

    @staticmethod
    def _changed(state: _TagState, reading: Reading) -> bool:
        if state.has_forwarded and reading.value == state.forwarded and reading.quality == state.forwarded_quality:
            return False
        state.forwarded, state.forwarded_quality, state.has_forwarded = reading.value, reading.quality, True
        return True

    @staticmethod
    def _beyond_deadband(state: _TagState, reading: Reading) -> bool:
        if _inside_band(state, reading):
            return False
        state.forwarded, state.forwarded_quality, state.has_forwarded = reading.value, reading.quality, True
        return True

    def _throttle(self, state: _TagState, reading: Reading, samples: list[Sample], out: RuleOutput) -> None:
        """``min_interval``: forward a change when its tag's interval is over, else hold it as the interval's latest."""
        if state.pending is not None and state.next_at is not None and reading.time >= state.next_at:
            # The interval ended before this reading (no flush came between): its held value goes first.
            samples.append(self._send_pending(state))
        if _inside_band(state, reading):
            if state.pending is not None:
                # Back inside the band of what was last sent: the held change is no longer news.
                state.pending = None
                out.suppressed += 1
            out.suppressed += 1
            return
        if state.next_at is None or reading.time >= state.next_at:
            state.forwarded, state.forwarded_quality, state.has_forwarded = reading.value, reading.quality, True
            state.next_at = reading.time + timedelta(seconds=state.config.min_interval or 0.0)
            samples.append(Sample(reading.tag, reading.time, _sample_value(reading.value), reading.quality))
            return
        pending = state.pending
        if pending is not None:
            out.suppressed += 1
            if reading.value == pending.value and reading.quality == pending.quality:
                return  # a poll reading the held value again: the change happened at the held reading's time
        state.pending = reading  # a later value of the same interval replaces the held one

    @staticmethod
    def _send_pending(state: _TagState) -> Sample:
        """The held sample of an ended interval; the next interval starts where that one ended."""
        reading = state.pending
        assert reading is not None and state.next_at is not None
        state.pending = None
        state.forwarded, state.forwarded_quality, state.has_forwarded = reading.value, reading.quality, True
        state.next_at += timedelta(seconds=state.config.min_interval or 0.0)
        return Sample(reading.tag, reading.time, _sample_value(reading.value), reading.quality)

    @staticmethod
    def _aggregate(state: _TagState, reading: Reading) -> Aggregate | None:
        value = reading.value
        if reading.quality == "bad" or not isinstance(value, int | float):
            return None
        number = float(value)
        window = state.window
        finished: Aggregate | None = None
        if window is not None and reading.time >= window.end:
            finished = _aggregate_of(state.config.tag, window)
            window = None
        if window is None:
            width = state.config.aggregate or 1.0
            start = datetime.fromtimestamp(math.floor(reading.time.timestamp() / width) * width, UTC)
            window = state.window = _Window(start=start, end=start + timedelta(seconds=width))
        window.count += 1
        window.low = min(window.low, number)
        window.high = max(window.high, number)
        window.total += number
        window.last = number
        return finished

    def _samples_events(self, source: str, samples: list[Sample]) -> Iterable[CloudEvent]:
        uri = self._source_uri[source]
        for start in range(0, len(samples), MAX_SAMPLES_PER_EVENT):
            chunk = samples[start : start + MAX_SAMPLES_PER_EVENT]
            first = chunk[0]
            single = all(sample.tag == first.tag for sample in chunk)
            yield make_event(
                "telemetry.samples",
                id=stable_id(uri, first.tag, first.time.isoformat(), len(chunk), chunk[-1].tag),
                source=uri,
                time=first.time,
                site=self.site,
                subject=first.tag if single else source,
                partitionkey=source,
                data=TelemetrySamples(samples=chunk),
            )

    def _aggregates_event(self, source: str, aggregates: list[Aggregate]) -> CloudEvent:
        uri = self._source_uri[source]
        first = aggregates[0]
        return make_event(
            "telemetry.aggregates",
            id=stable_id(uri, "aggregates", first.tag, first.start.isoformat(), len(aggregates)),
            source=uri,
            time=max(agg.end for agg in aggregates),
            site=self.site,
            subject=first.tag if len(aggregates) == 1 else source,
            partitionkey=source,
            data=TelemetryAggregates(aggregates=aggregates),
        )

    # --- machine state --------------------------------------------------------------------------

    def _state_change(self, state: _TagState, reading: Reading, out: RuleOutput) -> None:
        if reading.quality == "bad":
            return
        names = state.config.states or {}
        key = identifier_string(reading.value)
        name = names.get(key, f"unknown:{key}")
        if name == state.state_name:
            return
        previous, since = state.state_name, state.state_since
        data = MachineStateChanged(tag=reading.tag, state=name, previous=previous, value=_sample_value(reading.value))
        if previous is not None and since is not None:
            data.previous_duration_s = round(max(0.0, (reading.time - since).total_seconds()), 3)
        state.state_name, state.state_since = name, reading.time
        uri = self._source_uri[state.source]
        out.events.append(
            make_event(
                "machine.state.changed",
                id=stable_id(uri, reading.tag, reading.time.isoformat(), name),
                source=uri,
                time=reading.time,
                site=self.site,
                subject=reading.tag,
                partitionkey=reading.tag,
                data=data,
            )
        )

    # --- transactions ---------------------------------------------------------------------------

    def _trigger(self, state: _TagState, reading: Reading, out: RuleOutput) -> None:
        if reading.quality == "bad":
            return
        value = reading.value
        known, previous = state.trigger_known, state.trigger_value
        state.trigger_value, state.trigger_known = value, True
        if state.counter is not None and reading.tag in self._field_tags:
            # A counter grew when its running total (wrap- and reset-aware) did, not when its register did.
            total = self._total_at(reading.tag, reading.time)
            grew = state.trigger_total is not None and total > state.trigger_total
            state.trigger_total = total
        else:
            grew = known and _is_number(value) and _is_number(previous) and value > previous
        if state.fired_time == reading.time:
            # Same source timestamp as the cycle we already fired: a reconnect replaying the value.
            return
        edge = False
        for rule in state.triggers:
            if not _edge(rule.on, value, previous, known, grew):
                continue
            edge = True
            if not known and rule.ack is not None:
                ack = self.current.get(rule.ack)
                if ack is not None and ack.value is True:
                    # Start-up with the cycle already acknowledged: the PLC has not reset it yet.
                    continue
            if rule.condition is not None and not self._holds(rule.condition, reading.time):
                out.unmet += 1
                if rule.ack is not None:
                    # The cycle was seen and decided (no transaction by the site's own rule): the line goes on.
                    out.acks.append(PlcAck(rule.ack))
                continue
            self._fire(rule, state, reading, out)
        if edge:
            state.fired_time = reading.time

    def _holds(self, condition: RuleCondition, at: datetime) -> bool:
        """Whether ``condition`` holds at source time ``at`` (a tag without a good value yet: it does not)."""
        reading = self._value_at(condition.tag, at)
        if reading is None:
            return False
        names = self._tags[condition.tag].config.states
        name = names.get(identifier_string(reading.value)) if names else None
        return any(
            (name is not None and wanted == name) or _same_value(wanted, reading.value) for wanted in condition.accepted
        )

    def _fire(self, rule: TransactionRule, trigger: _TagState, reading: Reading, out: RuleOutput) -> None:
        uri = self._source_uri[trigger.source]
        parts: list[object] = [uri, rule.name, reading.time.isoformat()]
        if not isinstance(reading.value, bool):
            parts.append(reading.value)
        event_id = stable_id(*parts)
        problems: list[str] = []
        data = self._fill(rule, reading.time, None, problems)
        subject = _subject(data, rule.when)
        event = self._transaction(rule, event_id, uri, reading.time, subject, data, problems)
        if rule.ack is not None:
            out.acks.append(PlcAck(rule.ack, event.id))
        self._emit(
            event,
            problems,
            out,
            lambda: {
                "source": trigger.source,
                "rule": rule.name,
                "values": self._raw_values(rule, reading.time, [reading.tag]),
            },
        )

    def _fire_on_event(
        self, rule: TransactionRule, source: str, trigger: CloudEvent, data: Any, out: RuleOutput
    ) -> None:
        """An event-triggered rule's own transaction; its id follows from the rule and the trigger's id."""
        event_data = data if isinstance(data, dict) else {}
        problems: list[str] = []
        fields = self._fill(rule, trigger.time, event_data, problems)
        subject = _subject(fields, trigger.subject or rule.when_event or rule.name)
        event_id = stable_id(trigger.source, rule.name, trigger.id)
        event = self._transaction(
            rule, event_id, trigger.source, trigger.time, subject, fields, problems, trigger.correlationid, event_data
        )
        self._emit(
            event,
            problems,
            out,
            lambda: {
                "source": source,
                "rule": rule.name,
                "trigger": trigger.id,
                "values": self._raw_values(rule, trigger.time, []),
            },
        )

    def _raw_values(self, rule: TransactionRule, at: datetime, first: list[str]) -> dict[str, Any]:
        """Tag -> ``{value, time, quality}`` of the readings ``rule`` read at ``at`` (None: no value yet)."""
        event = rule.when_event is not None
        tags = list(first)
        sources = [*rule.fields.values(), *([] if rule.partitionkey is None else [rule.partitionkey])]
        for source in sources:
            tags.extend(tag for tag in field_value_tags(source, event) if tag not in tags)
        values: dict[str, Any] = {}
        for tag in tags:
            reading = self._value_at(tag, at)
            values[tag] = (
                None
                if reading is None
                else {"value": _plain(reading.value), "time": reading.time.isoformat(), "quality": reading.quality}
            )
        return values

    def _transaction(
        self,
        rule: TransactionRule,
        event_id: str,
        uri: str,
        at: datetime,
        subject: str,
        data: dict[str, Any],
        problems: list[str],
        correlationid: str | None = None,
        event_data: dict[str, Any] | None = None,
    ) -> CloudEvent:
        partitionkey = str(data.get("work_order") or subject)
        if rule.partitionkey is not None:
            key_value = self._resolve(rule.partitionkey, at, "partitionkey", problems, event_data)
            if key_value is not None:
                partitionkey = identifier_string(key_value) or partitionkey
        return make_event(
            rule.type,
            id=event_id,
            source=uri,
            time=at,
            site=self.site,
            subject=subject,
            partitionkey=partitionkey,
            correlationid=correlationid,
            traceparent=traceparent_for(event_id),
            data=data,
        )

    def _emit(
        self, event: CloudEvent, problems: list[str], out: RuleOutput, context: Callable[[], dict[str, Any]]
    ) -> None:
        """The rule's event mapped, or its dead letter naming every problem (with ``context()``)."""
        if not problems:
            mapped = dict(event.data)
            problems = self._map(mapped)
            if not problems:
                event.data = mapped
        if problems:
            out.dead_letters.append(_dead_letter(event, "; ".join(problems), context()))
            return
        out.events.append(event)
        made = context()
        out.contexts[event.id] = made
        self.last_fired[made["rule"]] = LastFired(
            event.id, event.type, event.subject, event.time.isoformat(), datetime.now(UTC).timestamp()
        )

    def _fill(
        self, rule: TransactionRule, at: datetime, event_data: dict[str, Any] | None, problems: list[str]
    ) -> dict[str, Any]:
        """A rule's data: each field from its tag, literal, template or the triggering event's data."""
        data: dict[str, Any] = {}
        conversion = self._conversions.get(rule.name)
        for key, source in rule.fields.items():
            quantity = (event_data or {}).get(source.event) if isinstance(source, FieldEvent) else None
            if isinstance(quantity, dict) and (key == "quantity" or key.endswith("_quantity")):
                data[key] = self._event_quantity(key, quantity, rule, problems)
                continue
            if isinstance(source, str) and self._tags[source].counter is not None:
                # A window rule after a restart counts from the restored state before the first new reading.
                restored = rule.every is not None and self._counter_read(source)
                if self._value_at(source, at) is None and not restored:
                    problems.append(f"field {key}: tag {source} has no good value yet")
                    data[key] = None
                    continue
                # A counter field is what was counted since this rule last fired (wrap/reset-aware).
                counter = self._tags[source].counter
                assert counter is not None
                total = self._total_at(source, at)
                since = total - self._fired_totals.get((rule.name, key), 0)
                self._fired_totals[(rule.name, key)] = total
                self._touched.add(source)
                data[key] = _field_value(key, counter.value_of(since), rule, conversion, problems)
                continue
            value = self._resolve(source, at, f"field {key}", problems, event_data)
            data[key] = None if value is None else _field_value(key, value, rule, conversion, problems)
        return data

    def _event_quantity(self, key: str, value: dict[str, Any], rule: TransactionRule, problems: list[str]) -> Any:
        """A quantity taken from the event (``{"value", "uom"}``, as a scan carries it), converted by ``uom_to``."""
        unit = value.get("uom")
        try:
            if set(value) != {"value", "uom"} or not isinstance(unit, str):
                raise ValueError(f"{value!r} is not a quantity with a unit")
            text = decimal_string(value["value"])
            if rule.uom_to is None:
                return Quantity(value=text, uom=unit)
            uom = self.mappings.uom
            change = unit_conversion(uom.get(unit, unit), uom.get(rule.uom_to, rule.uom_to))
            return Quantity(value=decimal_string(change.apply(Decimal(text))), uom=change.target)
        except (ValueError, ArithmeticError) as exc:
            problems.append(f"field {key}: {exc}")
            return value

    def _resolve(
        self,
        source: FieldValue,
        at: datetime,
        where: str,
        problems: list[str],
        event_data: dict[str, Any] | None = None,
    ) -> Any:
        """A field value's raw value at source time ``at``; None (and a problem) when a tag has none yet.

        ``event_data``: the triggering event's data (event-triggered rules), for
        ``{ event = "key" }`` fields and ``{event.key}`` placeholders.
        """
        if isinstance(source, FieldLiteral):
            return source.literal
        if isinstance(source, FieldEvent):
            value = (event_data or {}).get(source.event)
            if value is None:
                problems.append(f"{where}: the event has no {source.event}")
            return value
        if isinstance(source, str):
            current = self._value_at(source, at)
            if current is None:
                problems.append(f"{where}: tag {source} has no good value yet")
                return None
            return current.value
        parts: list[str] = []
        missing = False
        for text, tag in _template_parts(source.template):
            parts.append(text)
            if tag is None:
                continue
            if event_data is not None and tag.startswith(EVENT_PLACEHOLDER):
                key = tag.removeprefix(EVENT_PLACEHOLDER)
                value = event_data.get(key)
                if value is None:
                    problems.append(f"{where}: the event has no {key}")
                    missing = True
                else:
                    parts.append(identifier_string(value))
                continue
            current = self._value_at(tag, at)
            if current is None or current.value is None:
                # A null would print as "None" inside an identifier: better held than posted wrong.
                what = "has no good value yet" if current is None else "is null"
                problems.append(f"{where}: tag {tag} {what}")
                missing = True
                continue
            parts.append(identifier_string(current.value))
        return None if missing else "".join(parts)

    def _value_at(self, tag: str, at: datetime) -> Reading | None:
        """The reading of ``tag`` current at source time ``at``.

        Within one batch (one OPC UA publish may carry several cycles) that is the
        latest reading not newer than the trigger; a reading with the same timestamp
        counts whatever its place in the batch, since a PLC writes the fields and the
        trigger in one scan.
        """
        seen = self._batch_fields.get(tag)
        if not seen:
            return self.current.get(tag)
        chosen = self._before_batch.get(tag)
        for candidate in seen:
            if candidate.time > at:
                break
            chosen = candidate
        return chosen

    def _count(self, counter: CounterTracker, reading: Reading) -> None:
        totals = self._batch_totals.setdefault(reading.tag, [])
        if not totals:
            self._before_totals[reading.tag] = counter.total
        previous = counter.previous
        counter.update(reading.value)
        totals.append(counter.total)
        if counter.previous != previous:
            self._touched.add(reading.tag)

    # --- counter state across restarts ----------------------------------------------------------

    def state_keys(self) -> list[str]:
        """The keys under which ``RuleOutput.state`` saves counter state (for ``restore`` at start)."""
        return [
            *(COUNTER_STATE_PREFIX + tag for tag in sorted(self._field_tags) if self._tags[tag].counter is not None),
            *(WINDOW_STATE_PREFIX + rule.name for rule in self._window_rules),
        ]

    def restore(self, key: str, value: str) -> bool:
        """Take back counter state saved under ``key``; False (and nothing changed) when it does not apply.

        The counter's last raw value and running total, and each rule's total at its
        last firing: the first reading after a restart counts from where the agent
        stopped, so what the PLC counted meanwhile is reported once, and what was
        already reported is not reported again.
        """
        if key.startswith(WINDOW_STATE_PREFIX):
            name = key.removeprefix(WINDOW_STATE_PREFIX)
            if name not in self._window_source:
                return False
            try:
                end = datetime.fromisoformat(value)
            except ValueError:
                return False
            self._window_ends[name] = end
            return True
        tag = key.removeprefix(COUNTER_STATE_PREFIX)
        state = self._tags.get(tag)
        if not key.startswith(COUNTER_STATE_PREFIX) or state is None or state.counter is None:
            return False
        try:
            saved = _counter_state_decoder.decode(value)
        except msgspec.DecodeError:
            return False
        state.counter.restore(saved.raw, saved.total)
        state.trigger_total = saved.total if saved.raw is not None else None
        for rule, field_key, total in saved.fired:
            self._fired_totals[(rule, field_key)] = total
        return True

    def _counter_state(self, tag: str) -> str:
        counter = self._tags[tag].counter
        assert counter is not None
        fired = [
            (rule, key, self._fired_totals[(rule, key)])
            for rule, key in self._counter_fields.get(tag, ())
            if (rule, key) in self._fired_totals
        ]
        saved = _CounterState(raw=counter.previous, total=counter.total, fired=fired)
        return _counter_state_encoder.encode(saved).decode()

    def _total_at(self, tag: str, at: datetime) -> int:
        """A counter's running total at source time ``at`` (the reading ``_value_at`` chooses)."""
        seen = self._batch_fields.get(tag)
        counter = self._tags[tag].counter
        total = counter.total if counter is not None else 0
        if not seen:
            return total
        totals = self._batch_totals[tag]
        total = self._before_totals[tag]
        for candidate, candidate_total in zip(seen, totals, strict=True):
            if candidate.time > at:
                break
            total = candidate_total
        return total

    def accept_events(self, source: str, events: Sequence[CloudEvent]) -> RuleOutput:
        """Canonical events a source built itself (MES, scans): ours to source, mapped, or dead letters.

        Each keeps its ``id``, ``type``, ``time``, ``data`` and ``correlationid``; its
        ``source`` becomes this agent's source URI and the original goes into
        ``originsource``. An item or unit that cannot be mapped makes it a dead letter
        (with sink ``-``), which is stored like an event: nothing is dropped.
        """
        out = RuleOutput()
        uri = self._source_uri.get(source) or self.source_uri(source)
        mappings = self.mappings
        canonical = canonical_items(mappings) if mappings.items else frozenset()
        event_rules = self._event_rules
        if event_rules:
            # Tag fields of event-triggered rules take the values current now, not a past batch's.
            self._batch_fields.clear()
            self._before_batch.clear()
            self._batch_totals.clear()
        for event in events:
            if event.source != uri:
                if event.originsource is None:
                    event.originsource = event.source
                event.source = uri
            event.site = self.site
            if event.traceparent is None and event.lane == "transaction":
                # A scan, or an MES event that came without one: the trace starts here.
                event.traceparent = traceparent_for(event.id)
            if event_rules:
                for rule in event_rules.get(event.type.removeprefix(TYPE_PREFIX), ()):
                    if rule.when_source is not None and rule.when_source != source:
                        continue
                    if rule.condition is not None and not self._holds(rule.condition, event.time):
                        out.unmet += 1
                        continue
                    # From the data as it came: the rule's transaction is mapped (or dead-lettered) on its own,
                    # so a trigger that becomes a dead letter still gives its transaction.
                    self._fire_on_event(rule, source, event, event.data, out)
            if isinstance(event.data, dict):
                try:
                    event.data = map_data(mappings, canonical, event.data)
                except ValueError as exc:
                    out.dead_letters.append(_dead_letter(event, str(exc), {"source": source}))
                    continue
            out.events.append(event)
        return out

    def _map(self, data: dict[str, Any]) -> list[str]:
        """Map item codes, plant/line/work-center ids and units in place; return what cannot be mapped."""
        problems: list[str] = []
        ids = maps_ids(self.mappings)
        for key, value in data.items():
            if ids:
                section = id_section(key)
                if section is not None:
                    data[key] = map_id(self.mappings, section, key, value, problems)
                    continue
            if (key == "item" or key.endswith("_item")) and isinstance(value, str):
                mapped = self.mappings.items.get(value)
                if isinstance(mapped, ItemMapping):
                    if mapped.obsolete:
                        problems.append(f"{key}: item code {value!r} is obsolete")
                elif mapped is not None:
                    data[key] = mapped
                elif self.mappings.unknown_items == "dead-letter":
                    problems.append(f"{key}: item code {value!r} is not in [mappings.items]")
            elif isinstance(value, Quantity):
                data[key] = Quantity(value=value.value, uom=self.mappings.uom.get(value.uom, value.uom))
        return problems


def _inside_band(state: _TagState, reading: Reading) -> bool:
    """Whether ``reading`` is no news against the last forwarded value: the same, or inside a deadband.

    With both ``deadband`` and ``deadband_percent`` a change must exceed both (either
    band suppresses it); the percent band is of the last forwarded value's magnitude,
    so around zero every change passes it. A change of quality is always news.
    """
    if not state.has_forwarded or reading.quality != state.forwarded_quality:
        return False
    value, forwarded = reading.value, state.forwarded
    if value == forwarded:
        return True
    config = state.config
    band, percent = config.deadband, config.deadband_percent
    if (
        (band or percent)
        and isinstance(value, int | float)
        and isinstance(forwarded, int | float)
        and not isinstance(value, bool)
    ):
        change = abs(value - forwarded)
        if band and change < band:
            return True
        if percent and change < abs(forwarded) * percent / 100:
            return True
    return False


def _field_value(
    key: str, value: Any, rule: TransactionRule, conversion: Conversion | None, problems: list[str]
) -> Any:
    if key == "quantity" or key.endswith("_quantity"):
        try:
            text = decimal_string(value)
            if conversion is None:
                return Quantity(value=text, uom=rule.uom or "")
            return Quantity(value=decimal_string(conversion.apply(Decimal(text))), uom=conversion.target)
        except (ValueError, ArithmeticError) as exc:
            problems.append(f"field {key}: {exc}")
            return identifier_string(value)
    if key in IDENTIFIER_FIELDS or key.endswith("_item"):
        return identifier_string(value)
    return _sample_value(value)


def _edge(on: str | None, value: Any, previous: Any, known: bool, grew: bool) -> bool:
    """Whether a trigger's new ``value`` (after ``previous``, if ``known``) is the edge ``on`` waits for."""
    if on is None:
        on = "rising" if isinstance(value, bool) else "change"
    if on == "rising":
        # Also the first reading after start: a cycle that completed while the agent was down.
        return _level(value) is True and (not known or _level(previous) is not True)
    if on == "falling":
        return known and _level(value) is False and _level(previous) is True
    if on == "change":
        return known and value != previous
    return grew


def _level(value: Any) -> bool | None:
    """A bool as itself, a number as non-zero; anything else has no level."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_value(wanted: object, value: Any) -> bool:
    """A condition's written value against a reading's: bools only as bools, numbers as numbers, else as text."""
    if isinstance(wanted, bool) or isinstance(value, bool):
        return isinstance(wanted, bool) and isinstance(value, bool) and wanted == value
    if _is_number(wanted) and _is_number(value):
        return bool(wanted == value)
    return identifier_string(wanted) == identifier_string(value)


def _template_parts(template: str) -> Iterator[tuple[str, str | None]]:
    """``(text, tag)`` pairs of a template (validated at config load): the text before each placeholder, its tag."""
    position = 0
    for match in TEMPLATE_PLACEHOLDER.finditer(template):
        text = template[position : match.start()]
        position = match.end()
        if match.group(0) in ("{{", "}}"):
            yield text + match.group(0)[0], None
        else:
            yield text, (match.group(1) or "").strip()
    yield template[position:], None


def _subject(data: dict[str, Any], tag: str) -> str:
    for key in ("work_order", "lot"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return tag


def _sample_value(value: Any) -> bool | int | float | str | None:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _aggregate_of(tag: str, window: _Window) -> Aggregate:
    return Aggregate(
        tag=tag,
        start=window.start,
        end=window.end,
        count=window.count,
        min=window.low,
        max=window.high,
        mean=window.total / window.count if window.count else 0.0,
        last=window.last,
    )


def _plain(value: Any) -> Any:
    """A raw value as JSON can hold it (a tag value of another kind as its text)."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _dead_letter(event: CloudEvent, reason: str, context: dict[str, Any]) -> DeadLetter:
    """A dead letter made before any sink: the event as made (unmapped), for replay, with where it came from."""
    return DeadLetter(
        id=event.id,
        sink=NO_SINK,
        reason=reason,
        type=event.type,
        subject=event.subject,
        lane=event.lane,
        time=datetime.now(UTC).timestamp(),
        body=encode_event(event),
        context=context,
    )


MAPPING_REASONS = (
    "is obsolete",
    "is not in [mappings.items]",
    "is not in [mappings.plants]",
    "is not in [mappings.lines]",
    "is not in [mappings.work_centers]",
)
"""How the reasons of dead letters made by ``[mappings]`` end (per problem, joined by "; ")."""

ID_SECTIONS = (("work_center", "work_centers"), ("plant", "plants"), ("line", "lines"))
"""Data key (or ``*_<key>`` suffix) -> the ``[mappings.<section>]`` that maps its identifiers."""

_ID_KINDS = {"plants": "plant", "lines": "line", "work_centers": "work-center"}


def id_section(key: str) -> str | None:
    """The ``[mappings]`` section mapping a data key: ``plant``/``*_plant`` -> plants, and so on; else None."""
    for name, section in ID_SECTIONS:
        if key == name or key.endswith("_" + name):
            return section
    return None


def maps_ids(mappings: MappingsSection) -> bool:
    """Whether plant/line/work-center ids need looking at (a mapping, or unknown ones make dead letters)."""
    return bool(mappings.plants or mappings.lines or mappings.work_centers or mappings.unknown_ids == "dead-letter")


def map_id(mappings: MappingsSection, section: str, key: str, value: Any, problems: list[str]) -> Any:
    """A plant, line or work-center code mapped through ``[mappings.<section>]``.

    A canonical id (a value of the mapping) passes; an unknown code passes or, with
    ``unknown_ids = "dead-letter"``, adds a problem naming the field and the code.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        return value
    table: dict[str, str] = getattr(mappings, section)
    code = identifier_string(value)
    target = table.get(code)
    if target is not None:
        return target
    if mappings.unknown_ids == "dead-letter" and code not in table.values():
        problems.append(f"{key}: {_ID_KINDS[section]} code {code!r} is not in [mappings.{section}]")
    return value


def mapping_caused(reason: str) -> bool:
    """Whether a pre-sink dead letter's ``reason`` is only mapping problems (a new mapping may fix it)."""
    return all(" code " in part and part.endswith(MAPPING_REASONS) for part in reason.split("; "))


def replayable(mappings: MappingsSection, letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    """The pre-sink dead letters a mapping caused that ``mappings`` now accepts (``plantgate buffer replay`` would).

    Each body goes through ``map_event`` as the replay runs it; nothing is changed.
    """
    found = []
    canonical = canonical_items(mappings)
    for letter in letters:
        if letter.sink != NO_SINK or not mapping_caused(letter.reason):
            continue
        try:
            event = msgspec.json.decode(letter.body)
        except msgspec.DecodeError:
            continue
        data = event.get("data") if isinstance(event, dict) else None
        if not isinstance(data, dict):
            continue
        try:
            map_data(mappings, canonical, data)
        except ValueError:
            continue
        found.append(letter)
    return found


def map_event(mappings: MappingsSection, event: dict[str, Any]) -> dict[str, Any]:
    """``[mappings]`` applied to a decoded CloudEvent (what ``plantgate buffer replay`` sends again).

    Item codes (``item`` and ``*_item`` fields of ``data``), plant / line /
    work-center ids (``plant``, ``line``, ``work_center`` and their ``*_`` forms) and
    the units of quantities (``{"value", "uom"}``) are mapped as the rules map them; a
    code that is already canonical (a value of its mapping) passes, so mapping twice
    is harmless. ``ValueError`` names what cannot be mapped (obsolete or unknown code).
    """
    data = event.get("data")
    if not isinstance(data, dict):
        return event
    return {**event, "data": map_data(mappings, canonical_items(mappings), data)}


def canonical_items(mappings: MappingsSection) -> frozenset[str]:
    """The canonical item codes of ``[mappings.items]`` (they pass the mapping unchanged)."""
    return frozenset(code for code in mappings.items.values() if isinstance(code, str))


def map_data(mappings: MappingsSection, canonical: frozenset[str], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with item codes, plant/line/work-center ids and units mapped (a copy when something changed).

    ``ValueError`` as ``map_event``, also for an unknown id with ``unknown_ids = "dead-letter"``.
    """
    mapped = data
    problems: list[str] = []
    items, uom = mappings.items, mappings.uom
    ids = maps_ids(mappings)
    for key, value in data.items():
        section = id_section(key) if ids else None
        if section is not None:
            target = map_id(mappings, section, key, value, problems)
            if target is not value:
                if mapped is data:
                    mapped = dict(data)
                mapped[key] = target
        elif (key == "item" or key.endswith("_item")) and isinstance(value, str):
            target = items.get(value)
            if isinstance(target, ItemMapping):
                if target.obsolete:
                    problems.append(f"{key}: item code {value!r} is obsolete")
            elif target is not None:
                if mapped is data:
                    mapped = dict(data)
                mapped[key] = target
            elif value not in canonical and mappings.unknown_items == "dead-letter":
                problems.append(f"{key}: item code {value!r} is not in [mappings.items]")
        elif isinstance(value, dict) and isinstance(value.get("uom"), str) and set(value) == {"value", "uom"}:
            unit = uom.get(value["uom"])
            if unit is not None:
                if mapped is data:
                    mapped = dict(data)
                mapped[key] = {**value, "uom": unit}
    if problems:
        raise ValueError("; ".join(problems))
    return mapped
