"""The site engineer's console: a page served by the agent at ``GET /``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from agent.pipeline import Agent


def console_routes(agent: Agent) -> list[BaseRoute]:
    """The console's page and the read-only JSON it polls."""
    return []
