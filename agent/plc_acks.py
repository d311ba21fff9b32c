"""The PLC handshake: write the ``ack`` tag once the cycle's event is committed.

One queue and one writer per source, so a PLC that is away never delays the
acks of another. An ack waits for its commit (while the buffer refuses writes
the cycle is not committed, so no ack; once commits succeed again it goes out),
then is written; a failed write is retried with capped jittered backoff, across
reconnects, until it is written or the PLC has visibly moved on: the trigger tag
of the cycle changed since (it fell, or a later cycle rose). A stale ack written
after that could be taken by the PLC for its next cycle, so it is abandoned.
Either way it is logged. Acks of one source are written in cycle order.

A retry is only written while the source is connected and once news came in
from it after it (re)connected (the trigger's value again, or any batch: a
subscription delivers in order, so a later batch means an earlier change of the
trigger would have been seen): what the agent knew before a reconnect may be
old, and the PLC may have moved on meanwhile. A source that connects but delivers
nothing (a dead subscription) gets no ack that could belong to a past cycle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.backoff import Backoff
from agent.events import Reading
from agent.source import Source

if TYPE_CHECKING:
    from agent.rules import PlcAck

log = logging.getLogger(__name__)

MAX_PENDING = 1000
"""Acks waiting per source at most; beyond that the oldest is abandoned (logged)."""


class _Ack:
    __slots__ = ("attempts", "committed", "event_id", "queued", "tag", "trigger", "trigger_reading")

    def __init__(
        self,
        tag: str,
        committed: asyncio.Future[None],
        trigger: str | None,
        reading: Reading | None,
        event_id: str | None,
    ):
        self.tag = tag
        self.event_id = event_id
        self.committed = committed
        self.trigger = trigger
        self.trigger_reading = reading
        self.queued = time.monotonic()
        self.attempts = 0


class _SourceAcks:
    def __init__(self, source: Source):
        self.source = source
        self.queue: collections.deque[_Ack] = collections.deque()
        self.wake = asyncio.Event()
        self.seen = asyncio.Event()  # a batch from this source came through the rules
        self.batch_at = 0.0  # when (Unix time)
        self.idle = asyncio.Event()
        self.idle.set()
        self.written = 0
        self.abandoned = 0
        self.last_error: str | None = None


class PlcAckWriter:
    """Per-source queues of PLC acks; ``run(source_name)`` is that source's writer task."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        triggers: Mapping[str, str],
        current: Mapping[str, Reading],
        retry_cap: float = 5.0,
        max_pending: int = MAX_PENDING,
    ):
        """``triggers``: ack tag -> the ``when`` tag of its rule; ``current``: the rules' current readings."""
        self._triggers = dict(triggers)
        self._current = current
        self._retry_cap = retry_cap
        self._max_pending = max_pending
        self._owner: dict[str, _SourceAcks] = {}
        self._sources: dict[str, _SourceAcks] = {}
        for source in sources:
            owned = [tag for tag in source.tags() if tag in self._triggers and tag not in self._owner]
            if not owned:
                continue  # no handshake on this source: no queue, no task
            state = _SourceAcks(source)
            self._sources[source.name] = state
            for tag in owned:
                self._owner[tag] = state
        self._last_seen: dict[str, Reading | None] = {}
        self._arrived: dict[str, float] = {}  # trigger tag -> when a reading of it last came in (Unix time)
        self._triggers_of: dict[str, list[str]] = {
            name: sorted({self._triggers[tag] for tag, owner in self._owner.items() if owner is state})
            for name, state in self._sources.items()
        }
        self.on_written: Callable[[str, int], None] | None = None
        """Called with (source name, attempts) after each written ack (metrics, tests)."""

    @property
    def source_names(self) -> list[str]:
        return list(self._sources)

    def submit(self, committed: asyncio.Future[None], acks: Sequence[PlcAck]) -> None:
        """Queue ``acks`` to be written ``True`` once ``committed`` is done (called right after the rules)."""
        for tag, event_id in acks:
            state = self._owner.get(tag)
            if state is None:
                log.error("No source owns the PLC ack tag; ack not written", extra={"tag": tag})
                continue
            trigger = self._triggers.get(tag)
            reading = self._current.get(trigger) if trigger is not None else None
            queue = state.queue
            if len(queue) >= self._max_pending:
                dropped = queue.popleft()
                state.abandoned += 1
                log.error(
                    "Too many PLC acks waiting; the oldest is abandoned",
                    extra={"source": state.source.name, "tag": dropped.tag, "waiting": len(queue)},
                )
            queue.append(_Ack(tag, committed, trigger, reading, event_id))
            state.idle.clear()
            state.wake.set()

    def observe(self, source: str) -> None:
        """After the rules took a batch of ``source``: note that it came, and which trigger tags got a reading."""
        triggers = self._triggers_of.get(source)
        if not triggers:
            return
        current, last_seen = self._current, self._last_seen
        now = time.time()
        self._sources[source].batch_at = now
        for tag in triggers:
            reading = current.get(tag)
            if reading is not last_seen.get(tag):
                last_seen[tag] = reading
                self._arrived[tag] = now
        self._sources[source].seen.set()

    def pending(self, source: str | None = None) -> int:
        if source is not None:
            return len(self._sources[source].queue)
        return sum(len(state.queue) for state in self._sources.values())

    def status(self) -> dict[str, dict[str, Any]]:
        """Per source: acks waiting, written, abandoned, the last write error."""
        return {
            name: {
                "pending": len(state.queue),
                "written": state.written,
                "abandoned": state.abandoned,
                "last_error": state.last_error,
            }
            for name, state in self._sources.items()
        }

    async def run(self, source: str) -> None:
        """The writer of one source: its acks in order, each until written or moot. Runs until cancelled."""
        state = self._sources[source]
        queue = state.queue
        while True:
            while not queue:
                state.idle.set()
                state.wake.clear()
                await state.wake.wait()
            ack = queue[0]
            # Cancelled or crashed half-way, the ack stays at the head for the next run.
            await self._handle(state, ack)
            if queue and queue[0] is ack:
                queue.popleft()

    async def _handle(self, state: _SourceAcks, ack: _Ack) -> None:
        try:
            # Shielded: cancelling this writer must not cancel the buffer's commit future.
            await asyncio.shield(ack.committed)
            error = None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not ack.committed.cancelled() or (task is not None and task.cancelling()):
                raise  # this writer is being stopped
            error = "commit cancelled"
        except Exception as exc:
            error = str(exc)
        if error is not None:
            state.abandoned += 1
            log.error(
                "Cycle not committed; PLC ack withheld",
                extra={"source": state.source.name, "tag": ack.tag, "error": error},
            )
            return
        await self._write(state, ack)

    def _moved_on(self, ack: _Ack) -> bool:
        """The PLC went on since the cycle: its trigger has a newer value (fell, or rose again)."""
        if ack.trigger is None or ack.trigger_reading is None:
            return False
        now = self._current.get(ack.trigger)
        if now is None or now.quality == "bad":
            return False
        then = ack.trigger_reading
        return bool(now.value != then.value or now.time != then.time)

    def _fresh(self, state: _SourceAcks, ack: _Ack) -> bool:
        """Connected, and news came in after the (re)connect: ``_moved_on`` can be trusted."""
        status = state.source.status
        if status.state != "connected":
            return False
        if ack.trigger is None:
            return True
        return max(self._arrived.get(ack.trigger, 0.0), state.batch_at) >= status.since

    async def _write(self, state: _SourceAcks, ack: _Ack) -> None:
        source = state.source
        backoff = Backoff(base=0.1, cap=self._retry_cap)
        first_error: str | None = None
        while True:
            if self._moved_on(ack):
                state.abandoned += 1
                log.warning(
                    "PLC ack abandoned: the PLC moved on (its trigger changed)",
                    extra={
                        "source": source.name,
                        "tag": ack.tag,
                        "trigger": ack.trigger,
                        "attempts": ack.attempts,
                        "waited_s": round(time.monotonic() - ack.queued, 3),
                        "error": first_error,
                    },
                )
                return
            if first_error is not None and not self._fresh(state, ack):
                # Not connected, or nothing heard of the trigger since the reconnect: wait for news.
                state.seen.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.seen.wait(), 1.0)
                continue
            ack.attempts += 1
            try:
                await source.write(ack.tag, True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # SourceError, or a bug in one source: retried, never the writer's end
                error = f"{type(exc).__name__}: {exc}"
                state.last_error = error
                if first_error is None:
                    first_error = error
                    log.warning(
                        "PLC ack not written; retrying",
                        extra={"source": source.name, "tag": ack.tag, "error": error},
                    )
                # Stopping does not end the retries: acks are flushed while the sessions are still open.
                await asyncio.sleep(backoff.next_delay())
                continue
            state.written += 1
            log.info(
                "PLC ack written",
                extra={
                    "source": source.name,
                    "tag": ack.tag,
                    "event_id": ack.event_id,
                    "attempts": ack.attempts,
                    "waited_s": round(time.monotonic() - ack.queued, 3),
                },
            )
            if self.on_written is not None:
                self.on_written(source.name, ack.attempts)
            return

    async def flush(self, timeout: float) -> int:  # noqa: ASYNC109 - a bound on the stop, not a poll
        """Wait (at most ``timeout`` s) until every queue is empty; returns how many acks are left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for state in self._sources.values():
                    await state.idle.wait()
        left = self.pending()
        if left:
            log.error("PLC acks not written before stop", extra={"waiting": left, "per_source": self._waiting()})
        return left

    def _waiting(self) -> dict[str, int]:
        return {name: len(state.queue) for name, state in self._sources.items() if state.queue}
