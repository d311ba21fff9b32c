"""An operator's view of each sink's outages: when it started, how long it lasted, how the backlog drained.

Maintenance calls ``observe`` once a second with each sink's state, backlog and
delivered count. The lines it logs are never held back by the log's repeat
limiter: a second outage a minute after the first is as visible as the first.

* ``Sink outage started`` (WARNING) when a sink is seen out of ``connected``, with its
  state, error and backlog (the sink's own log has the moment it lost its peer);
* ``Sink outage ended`` (INFO) when it is connected again, with the outage's length and
  the backlog it left;
* ``Draining backlog`` (INFO) every 30 s while that backlog drains, with what is left and
  the rate;
* ``Backlog drained`` (INFO): "drained N events in S s".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROGRESS_EVERY = 30.0
"""Seconds between two "Draining backlog" lines of one sink."""


@dataclass
class _Outage:
    down_since: float | None = None
    delivered_then: int = 0  # the sink's delivered count at that look (nothing is delivered while down)
    drain_since: float | None = None
    drain_from: int = 0
    drained_before: int = 0  # delivered count when the drain started
    progress_at: float = 0.0


class SinkOutageLog:
    """Tracks each sink's outages from its state and backlog; logs their start, end and drain."""

    def __init__(self) -> None:
        self._sinks: dict[str, _Outage] = {}

    def observe(
        self, sink: str, state: str, since: float, depth: int, delivered: int, rate: float, error: str | None = None
    ) -> None:
        """One look at ``sink``: its ``state`` and when it entered it (Unix time), backlog ``depth``,
        events ``delivered`` since start and the delivery rate."""
        now = time.time()
        outage = self._sinks.setdefault(sink, _Outage())
        if state not in ("connected", "starting", "stopped"):
            if outage.down_since is None:
                outage.down_since = since
                outage.drain_since = None
                log.warning(
                    "Sink outage started",
                    extra={"sink": sink, "state": state, "error": error, "backlog": depth, "ratelimit": False},
                )
            outage.delivered_then = delivered
            return
        if state != "connected":
            return
        if outage.down_since is not None:
            # What was delivered since the last look that saw it down went out after the reconnect.
            backlog = depth + (delivered - outage.delivered_then)
            log.info(
                "Sink outage ended",
                extra={
                    "sink": sink,
                    "outage_seconds": round(max(0.0, since - outage.down_since), 1),
                    "backlog": backlog,
                    "ratelimit": False,
                },
            )
            outage.down_since = None
            if backlog > 0:
                outage.drain_since, outage.drain_from = since, backlog
                outage.drained_before, outage.progress_at = outage.delivered_then, now
        if outage.drain_since is None:
            return
        if depth <= max(10, outage.drain_from // 100):  # live events in flight are not backlog
            seconds = now - outage.drain_since
            drained = delivered - outage.drained_before
            log.info(
                "Backlog drained",
                extra={
                    "sink": sink,
                    "drained": drained,
                    "seconds": round(seconds, 1),
                    "summary": f"drained {drained} events in {seconds:.1f} s",
                    "ratelimit": False,
                },
            )
            outage.drain_since = None
        elif now - outage.progress_at >= PROGRESS_EVERY:
            outage.progress_at = now
            eta = depth / rate if rate > 0.01 else None
            log.info(
                "Draining backlog",
                extra={
                    "sink": sink,
                    "remaining": depth,
                    "rate_per_second": round(rate, 1),
                    "drain_seconds": None if eta is None else round(eta, 1),
                },
            )
