"""Business outcome and reconciliation, on top of the buffer's delivery journal.

The agent builds one ``Lineage``: its routes join the agent's HTTP server, ``run``
is a supervised task (the periodic reconciliation summary), ``status`` is the
``lineage`` section of ``/status``, ``refresh_metrics`` runs before a scrape.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from agent.pipeline import Agent


class Lineage:
    """Outcomes reported by the middleware and the reconciliation of what was delivered."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def routes(self) -> list[BaseRoute]:
        """HTTP routes this part adds to the agent's server."""
        return []

    async def run(self) -> None:
        """Periodic work until cancelled."""
        await asyncio.Event().wait()

    def status(self) -> dict[str, Any] | None:
        """The ``lineage`` section of ``/status`` (None: left out)."""
        return None

    async def refresh_metrics(self) -> None:
        """Fresh gauges before a ``/metrics`` scrape."""
