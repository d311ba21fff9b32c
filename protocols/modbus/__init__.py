"""Modbus TCP and RTU devices, polled."""

from __future__ import annotations

from agent.source import SourceConfig

__all__ = ["ModbusSourceConfig"]


class ModbusSourceConfig(SourceConfig):
    """One `[[sources.modbus]]` entry."""
