"""Cutting a scanner's byte stream into scans: a terminator, a maximum length, bounded memory."""

from __future__ import annotations

from typing import NamedTuple

_SURROUNDING = b" \t\r\n"
_KEPT_OF_OVERLONG = 64  # bytes of an over-long frame kept to show in its rejection


class Frame(NamedTuple):
    """One scan as cut from the stream; ``problem`` says why it is not a scan when it is not one."""

    data: bytes
    problem: str | None = None


class Framer:
    """Splits one connection's bytes at ``terminator``; never holds more than ``max_length`` bytes.

    A frame longer than ``max_length`` comes out as a ``Frame`` with a ``problem``
    (its first bytes kept), and what follows is skipped up to the next terminator, so
    the next scan is read cleanly. Spaces, tabs, CR and LF around a frame are
    stripped (a CRLF scanner on a CR terminator works); a frame that is empty then
    is counted in ``empty`` and not returned.
    """

    def __init__(self, terminator: bytes, max_length: int):
        if not terminator:
            raise ValueError("a terminator needs at least one byte")
        self._terminator = terminator
        self._max_length = max_length
        self._pending = bytearray()
        self._skipping = False  # inside an over-long frame, waiting for its terminator
        self.empty = 0

    def feed(self, data: bytes) -> list[Frame]:
        """The frames ``data`` completes, in order."""
        pending = self._pending
        pending += data
        frames: list[Frame] = []
        terminator = self._terminator
        start = 0
        while True:
            end = pending.find(terminator, start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._emit(bytes(pending[start:end]), frames)
            start = end + len(terminator)
        del pending[:start]
        if len(pending) > self._max_length:
            # Keep the bytes that may begin a terminator split across two reads.
            keep = len(terminator) - 1
            if not self._skipping:
                shown = bytes(pending[:_KEPT_OF_OVERLONG])
                frames.append(Frame(shown, f"longer than max_length {self._max_length} bytes (first bytes kept)"))
                self._skipping = True
            del pending[: len(pending) - keep]
        return frames

    def close(self) -> list[Frame]:
        """What is left when the stream ends: a frame without its terminator is a problem, not a scan."""
        rest, self._pending = bytes(self._pending), bytearray()
        skipping, self._skipping = self._skipping, False
        if skipping:
            return []
        data = rest.strip(_SURROUNDING)
        return [Frame(data, "the connection ended before the terminator")] if data else []

    def _emit(self, frame: bytes, frames: list[Frame]) -> None:
        data = frame.strip(_SURROUNDING)
        if not data:
            self.empty += 1
        elif len(data) > self._max_length:
            frames.append(
                Frame(data[:_KEPT_OF_OVERLONG], f"longer than max_length {self._max_length} bytes (first bytes kept)")
            )
        else:
            frames.append(Frame(data))
