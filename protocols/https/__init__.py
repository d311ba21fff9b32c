"""HTTPS sink: batches of CloudEvents to the ERP-facing middleware."""

from __future__ import annotations

from agent.sink import SinkConfig

__all__ = ["HttpsSinkConfig"]


class HttpsSinkConfig(SinkConfig):
    """One `[[sinks.https]]` entry."""
