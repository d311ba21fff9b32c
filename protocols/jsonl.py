"""JSON Lines file sink: every event as one line, for debugging in the field and for the demo.

It is a real sink with the same contract as MQTT or HTTPS: an event leaves the
buffer for this sink only once its line is written (and, with ``fsync``, on disk).
The "peer" is the file: when it cannot be opened or written (a full disk, a
directory that went away) every event of the batch is retried later, and the
status says ``disconnected``. If the file is moved or deleted behind the sink's
back (an external logrotate), the next batch goes to a new file at ``path``.
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
    fsync: bool = Field(False, description="fsync after each batch (slower; only for forensic use)")
    max_size_mb: float = Field(
        100, gt=0, description="Rotate to <path>.1 (one old file kept) when the file grows past this"
    )

    def describe(self, context: BuildContext) -> list[str]:
        """The file and the lanes."""
        return [f"{self.name} {context.resolve(self.path)} lanes={','.join(self.lanes)}"]

    def build(self, context: BuildContext) -> JsonlSink:
        """The sink this entry describes."""
        return JsonlSink(self, data_dir=context.data_dir)


class JsonlSink:
    """Writes structured-mode CloudEvents, one per line, exactly as the buffer holds them."""

    batch_max = 1000
    """Events per ``deliver``: one write (and with ``fsync`` one sync) per thousand lines."""

    def __init__(self, config: JsonlSinkConfig, *, data_dir: Path):
        self.config = config
        self.name = config.name
        self.lanes: frozenset[Lane] = frozenset(config.lanes)
        self.path = config.path if config.path.is_absolute() else data_dir / config.path
        self.status = ComponentStatus(name=config.name, kind="jsonl")
        self._file: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self.written = 0

    async def run(self) -> None:
        """Open the file and hold it until cancelled; then close it."""
        try:
            self._open()
            await asyncio.Event().wait()
        finally:
            self._close()
            self.status.set_state("stopped")

    def _open(self) -> None:
        try:
            # Plant data, nobody else's to read: a new directory 0700, a new file 0600.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            handle = os.fdopen(fd, "ab", buffering=1024 * 1024)
        except OSError as exc:
            self.status.set_state("disconnected", f"cannot open {self.path}: {exc.strerror}")
            log.warning(
                "Cannot open JSON Lines file", extra={"sink": self.name, "path": str(self.path), "error": str(exc)}
            )
            self._file = None
            return
        stat = os.fstat(handle.fileno())
        self._file, self._identity = handle, (stat.st_dev, stat.st_ino)
        self.status.set_state("connected")

    def _close(self) -> None:
        handle = self._file
        self._file = None
        if handle is not None:
            handle.close()

    def _moved(self) -> bool:
        """True when ``path`` is no longer the open file (moved, deleted or replaced from outside)."""
        try:
            stat = self.path.stat()
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self._identity

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        """Write the batch as lines; ``ACKED`` once written (and synced), ``RETRY`` all if it cannot be."""
        if not batch:
            return []
        if self._file is not None and self._moved():
            self._close()
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
        """``path`` becomes ``path.1`` (replacing an older one); new lines go to a fresh ``path``."""
        self._close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._open()
