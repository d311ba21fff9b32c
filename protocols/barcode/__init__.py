"""Barcode scanners over TCP or a serial port."""

from __future__ import annotations

from agent.source import SourceConfig

__all__ = ["BarcodeSourceConfig"]


class BarcodeSourceConfig(SourceConfig):
    """One `[[sources.barcode]]` entry."""
