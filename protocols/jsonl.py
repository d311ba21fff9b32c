"""JSON Lines file sink: every event as one line, for debugging in the field and for the demo.

It is a real sink with the same contract as MQTT or HTTPS: an event leaves the
buffer for this sink only once its line is written (and, with ``fsync``, on disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from pydantic import Field

from agent.config_types import BuildContext
from agent.events import Lane
from agent.health import ComponentStatus
from agent.sink import ACKED, RETRY, BufferedEvent, Outcome, SinkConfig

log = logging.getLogger(__name__)


class JsonlSinkConfig(SinkConfig):
    """``[[sinks.jsonl]]``: append every event as a JSON line to a file."""

    path: Path = Field(
        Path("events.jsonl"), description="File to append to; relative paths resolve against agent.data_dir"
    )
    def describe(self, context: BuildContext) -> list[str]:
        """The file and the lanes."""
        return [f"{self.name} {context.resolve(self.path)} lanes={','.join(self.lanes)}"]

    def build(self, context: BuildContext) -> JsonlSink:
        """The sink this entry describes."""
        return JsonlSink(self, data_dir=context.data_dir)

    fsync: bool = Field(False, description="fsync after each batch (slower; only for forensic use)")
    max_size_mb: float = Field(
        100, gt=0, description="Rotate to <path>.1 (one old file kept) when the file grows past this"
    )


class JsonlSink:
    """Writes structured-mode CloudEvents, one per line, exactly as the buffer holds them."""

    def __init__(self, config: JsonlSinkConfig, *, data_dir: Path):
        self.config = config
        self.name = config.name
        self.lanes: frozenset[Lane] = frozenset(config.lanes)
        self.path = config.path if config.path.is_absolute() else data_dir / config.path
        self.status = ComponentStatus(name=config.name, kind="jsonl")
        self.batch_max = 1000
        self._file: BinaryIO | None = None
        self.written = 0

    async def run(self) -> None:
        """Open the file and hold it until cancelled."""
        try:
            self._open()
            await asyncio.Event().wait()
        finally:
            self._close()
            self.status.set_state("stopped")

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab", buffering=1024 * 1024)
        except OSError as exc:
            self.status.set_state("disconnected", f"cannot open {self.path}: {exc.strerror}")
            log.warning(
                "Cannot open JSON Lines file", extra={"sink": self.name, "path": str(self.path), "error": str(exc)}
            )
            self._file = None
            return
        self.status.set_state("connected")

    def _close(self) -> None:
        handle = self._file
        self._file = None
        if handle is not None:
            handle.close()

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        """Write the batch as lines; RETRY all of it if the file cannot be written."""
        if self._file is None:
            self._open()
            if self._file is None:
                return [RETRY] * len(batch)
        handle = self._file
        try:
            handle.write(b"".join(event.body + b"\n" for event in batch))
            handle.flush()
            if self.config.fsync:
                os.fsync(handle.fileno())
            if handle.tell() > self.config.max_size_mb * 1024 * 1024:
                self._rotate()
        except OSError as exc:
            self.status.set_state("disconnected", f"write failed: {exc.strerror}")
            log.warning("JSON Lines write failed", extra={"sink": self.name, "path": str(self.path), "error": str(exc)})
            self._close()
            return [RETRY] * len(batch)
        self.written += len(batch)
        self.status.set_state("connected")
        return [ACKED] * len(batch)

    def _rotate(self) -> None:
        self._close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._open()
