"""The MES: a webhook on the agent's HTTP server, or a polled REST endpoint."""

from __future__ import annotations

from agent.source import SourceConfig

__all__ = ["MesSourceConfig"]


class MesSourceConfig(SourceConfig):
    """One `[[sources.mes]]` entry."""
