"""Operator actions on a buffer: stats, dead letters, replay, purge.

One ``BufferAdmin`` serves both ways of reaching a buffer:

- a stopped agent's file: ``open_admin(path, ...)`` opens it read-write, taking the
  file lock, so it never runs against a live agent's file (``BufferLocked`` says
  "agent is running: ..."); ``plantgate buffer replay|purge`` use it;
- a running agent: the agent wraps its open ``Buffer`` in a ``BufferAdmin`` and
  serves the same methods over HTTP (``handle`` maps the four endpoints, bodies
  and answers are plain JSON values):

  ======  ==========================  ===================================  ===============================
  method  path                        request                              answer (200)
  ======  ==========================  ===================================  ===============================
  GET     /v1/buffer/stats            -                                    ``BufferStats`` (contract shape)
  GET     /v1/buffer/dead-letters     ``?sink=NAME`` (optional)            ``[DeadLetterEntry, ...]``
  POST    /v1/buffer/replay           ``ReplayRequest`` (JSON)             ``ReplayResult``
  POST    /v1/buffer/purge            ``PurgeRequest`` (JSON)              ``PurgeResult``
  ======  ==========================  ===================================  ===============================

  A request that cannot be decoded or selects nothing is a 400 with ``{"error": ...}``.

Replay sends a dead letter back under its original ``id`` with a fresh sequence,
into its lane: every sink taking that lane gets it (a sink that had acknowledged
it before gets it again under the same id, which the cloud dedupes). It passes
through ``remap`` (the config's mappings) and envelope validation first; one that
fails stays a dead letter with the new reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from agent.events import CloudEvent, Lane, decode_event
from buffer.store import Buffer, BufferError, BufferStats, DeadLetter, event_lane

Remap = Callable[[dict[str, Any]], "dict[str, Any] | str"]
"""Takes a dead letter's decoded CloudEvent; returns the event to send again, or a reason
it fails again (raising ``ValueError`` says the same)."""


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Which dead letters to replay: ``all``, or any of ``ids`` / ``sink`` / ``reason`` (all given must match)."""

    all: bool = False
    ids: list[str] = msgspec.field(default_factory=list)
    sink: str | None = None
    reason: str | None = None
    """A dead letter matches when its reason contains this text."""

    def check(self) -> None:
        if not (self.all or self.ids or self.sink is not None or self.reason is not None):
            raise ValueError("say which dead letters: all, ids, sink or reason")

    def matches(self, letter: DeadLetter) -> bool:
        if self.ids and letter.id not in self.ids:
            return False
        if self.sink is not None and letter.sink != self.sink:
            return False
        return self.reason is None or self.reason in letter.reason


class ReplayResult(msgspec.Struct):
    replayed: int
    failed: int


class PurgeRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``sink``: drop that sink's backlog; ``dead_letters``: delete dead letters (of ``sink`` when given)."""

    sink: str | None = None
    dead_letters: bool = False

    def check(self) -> None:
        if self.sink is None and not self.dead_letters:
            raise ValueError("say what to purge: sink or dead_letters")


class PurgeResult(msgspec.Struct):
    """What a purge removed: the sink's backlog per lane and in all, and dead letters."""

    sink: str | None
    events: int
    lanes: dict[str, int]
    dead_letters: int


class DeadLetterEntry(msgspec.Struct, omit_defaults=True):
    """One dead letter as listed (``time``: Unix seconds when it became one).

    ``context``: where it came from (``source``, ``rule``, the raw ``values`` the
    rule read); left out when not known (see ``DeadLetter``), so a listing of
    letters without one keeps exactly its earlier keys.
    """

    id: str
    type: str
    subject: str | None
    sink: str
    reason: str
    time: float
    context: dict[str, Any] | None = None


_locks: weakref.WeakKeyDictionary[Buffer, asyncio.Lock] = weakref.WeakKeyDictionary()


class BufferAdmin:
    """Operator actions on an open ``Buffer`` (see the module docstring).

    ``sinks`` (name -> lanes of the current config) decides what stats call
    orphaned and which lanes a replay may go into; ``remap`` is applied to every
    replayed event (the config's item and unit mappings).
    """

    def __init__(
        self,
        buffer: Buffer,
        *,
        sinks: Mapping[str, Iterable[Lane]] | None = None,
        remap: Remap | None = None,
    ):
        self.buffer = buffer
        self.sinks = {name: frozenset(lanes) for name, lanes in sinks.items()} if sinks is not None else None
        self.remap = remap
        self._lock = _locks.setdefault(buffer, asyncio.Lock())  # one operator action at a time per buffer

    async def stats(self) -> BufferStats:
        return await self.buffer.stats(self.sinks)

    async def dead_letters(self, sink: str | None = None) -> list[DeadLetterEntry]:
        return [
            DeadLetterEntry(
                id=d.id, type=d.type, subject=d.subject, sink=d.sink, reason=d.reason, time=d.time, context=d.context
            )
            for d in await self.buffer.dead_letters(sink)
        ]

    async def replay(self, selection: ReplayRequest, remap: Remap | None = None) -> ReplayResult:
        """Replay the selected dead letters; each either goes back into delivery or fails again."""
        selection.check()
        remap = remap or self.remap
        taken: set[str] | None = None
        if self.sinks is not None:
            taken = {lane for lanes in self.sinks.values() for lane in lanes}
        async with self._lock:
            replayed: list[tuple[int, dict[str, Any]]] = []
            failed: list[tuple[int, str]] = []
            for n, letter in await self.buffer.dead_letter_rows():
                if not selection.matches(letter):
                    continue
                try:
                    replayed.append((n, _prepare(letter, remap, taken)))
                except (ValueError, TypeError, KeyError, msgspec.MsgspecError) as exc:
                    failed.append((n, str(exc) or type(exc).__name__))
            if replayed or failed:
                await self.buffer.requeue(replayed, failed)
        return ReplayResult(replayed=len(replayed), failed=len(failed))

    async def purge(self, request: PurgeRequest) -> PurgeResult:
        """Drop a sink's backlog, or delete dead letters; says what was removed."""
        request.check()
        async with self._lock:
            if request.dead_letters:
                count = await self.buffer.purge_dead_letters(request.sink)
                return PurgeResult(sink=request.sink, events=0, lanes={}, dead_letters=count)
            assert request.sink is not None
            lanes = await self.buffer.purge_sink(request.sink)
        removed = {str(lane): n for lane, n in lanes.items()}
        return PurgeResult(sink=request.sink, events=sum(removed.values()), lanes=removed, dead_letters=0)

    async def handle(self, method: str, path: str, query: Mapping[str, str], body: bytes) -> tuple[int, Any]:
        """One admin HTTP request -> (status, JSON-able answer); the caller checks the bearer token."""
        try:
            if path == "/v1/buffer/stats" and method in ("GET", "HEAD"):
                return 200, msgspec.to_builtins(await self.stats())
            if path == "/v1/buffer/dead-letters" and method in ("GET", "HEAD"):
                return 200, msgspec.to_builtins(await self.dead_letters(query.get("sink")))
            if path == "/v1/buffer/replay" and method == "POST":
                replay = msgspec.json.decode(body or b"{}", type=ReplayRequest)
                return 200, msgspec.to_builtins(await self.replay(replay))
            if path == "/v1/buffer/purge" and method == "POST":
                purge = msgspec.json.decode(body or b"{}", type=PurgeRequest)
                return 200, msgspec.to_builtins(await self.purge(purge))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return 400, {"error": str(exc)}
        except BufferError as exc:
            return 503, {"error": str(exc)}
        known = {"/v1/buffer/stats", "/v1/buffer/dead-letters", "/v1/buffer/replay", "/v1/buffer/purge"}
        return (405, {"error": f"{method} not allowed"}) if path in known else (404, {"error": "not found"})


def _prepare(letter: DeadLetter, remap: Remap | None, taken: set[str] | None) -> dict[str, Any]:
    """The event to send again: decoded, remapped, validated, under the dead letter's id."""
    event = decode_event(letter.body)
    if not isinstance(event, dict):
        raise ValueError("the dead letter's body is not a CloudEvent")
    if remap is not None:
        result = remap(event)
        if isinstance(result, str):
            raise ValueError(result)
        event = result
    event = {**event, "id": letter.id}
    event.pop("sequence", None)  # a fresh one is assigned
    lane = event_lane(event)
    event["lane"] = lane
    msgspec.convert(event, CloudEvent)  # a valid envelope (raises ValidationError naming the field)
    if taken is not None and lane not in taken:
        raise ValueError(f"replay: no configured sink takes the {lane} lane")
    return event


@contextlib.asynccontextmanager
async def open_admin(
    path: Path,
    *,
    sinks: Mapping[str, Iterable[Lane]] | None = None,
    remap: Remap | None = None,
    **options: Any,
) -> AsyncIterator[BufferAdmin]:
    """A ``BufferAdmin`` on a stopped agent's buffer file (``BufferLocked`` if an agent has it open).

    The buffer is configured with ``sinks`` as the agent would be at its next start
    (cursors of sinks and lanes no longer configured become orphaned, a new sink's
    cursor starts at the head).
    """
    if not await asyncio.to_thread(path.exists):
        raise FileNotFoundError(path)
    buffer = Buffer(path, sinks=sinks, **options)
    await buffer.open()
    try:
        for name, lanes in (sinks or {}).items():
            # As the agent does at start: a sink new to this file starts at the head, so it must be
            # there before a replay, or it would start past what the replay puts in.
            buffer.cursor(name, lanes)
        yield BufferAdmin(buffer, sinks=sinks, remap=remap)
    finally:
        await buffer.close()
