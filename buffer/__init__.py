"""The SQLite store-and-forward buffer and its dead letters; nothing else touches SQLite."""

from buffer.store import (
    NO_SINK,
    Buffer,
    BufferError,
    BufferLocked,
    BufferStats,
    DeadLetter,
    DeliveryCursor,
    Eviction,
    Settlement,
    event_lane,
    inspect_dead_letters,
    inspect_stats,
    is_corruption,
)

__all__ = [
    "NO_SINK",
    "Buffer",
    "BufferError",
    "BufferLocked",
    "BufferStats",
    "DeadLetter",
    "DeliveryCursor",
    "Eviction",
    "Settlement",
    "event_lane",
    "inspect_dead_letters",
    "inspect_stats",
    "is_corruption",
]
