"""Supervision: every long-running task of the agent runs under ``supervise``.

A task that raises is logged once (with the error), shown in its component's
status and in ``/status``, counted, and started again after a capped, jittered
backoff. It never ends the agent's TaskGroup: one broken part must not stop the
pipeline or drop what the others are doing. Cancellation (the agent stopping)
passes straight through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from agent.backoff import Backoff
from agent.health import ComponentStatus, ConnectionState

log = logging.getLogger(__name__)

TaskState = Literal["running", "restarting", "stopped"]


class TaskHealth:
    """What ``/status`` shows about one supervised task."""

    def __init__(self, name: str, component: str, owner: str):
        self.name = name
        self.component = component  # "source", "sink", "delivery", "agent"
        self.owner = owner  # the source or sink name, or "agent"
        self.state: TaskState = "running"
        self.restarts = 0
        self.last_error: str | None = None
        self.last_failure: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "owner": self.owner,
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_failure": self.last_failure,
        }


async def supervise(
    health: TaskHealth,
    run: Callable[[], Awaitable[None]],
    *,
    stopping: asyncio.Event,
    status: ComponentStatus | None = None,
    state_on_crash: ConnectionState | None = None,
    on_restart: Callable[[], None] | None = None,
    backoff: Backoff | None = None,
    healthy_after: float = 30.0,
) -> None:
    """Run ``run()`` until it returns or the task is cancelled; restart it whenever it raises.

    ``status`` (the component's own) gets ``last_error`` and, with ``state_on_crash``, that
    state. ``on_restart`` is called once per crash (a metric). A run that lasted
    ``healthy_after`` seconds counts as a success: the backoff starts again from its base.
    """
    backoff = backoff or Backoff(base=0.5, cap=30.0)
    previous: str | None = None
    while True:
        started = time.monotonic()
        health.state = "running"
        try:
            await run()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - started >= healthy_after:
                backoff.reset()
                previous = None
            health.state = "restarting"
            health.restarts += 1
            health.last_error = error
            health.last_failure = time.time()
            if status is not None:
                if state_on_crash is not None:
                    status.set_state(state_on_crash, f"{health.name} crashed: {error}")
                else:
                    status.last_error = f"{health.name} crashed: {error}"
            if on_restart is not None:
                try:
                    on_restart()
                except Exception:  # counting must never be what stops the restart
                    log.exception("Could not count a task restart", extra={"task": health.name})
            extra = {
                "task": health.name,
                "component": health.component,
                "owner": health.owner,
                "error": error,
                "restarts": health.restarts,
            }
            # The traceback once per distinct error; a crash loop repeats one line, not pages.
            log.error("Task crashed; restarting it", extra=extra, exc_info=exc if error != previous else None)
            previous = error
            if stopping.is_set() or await backoff.wait(stopping):
                health.state = "stopped"
                return
            continue
        health.state = "stopped"
        return
