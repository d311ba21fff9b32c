"""The SQLite store-and-forward buffer and its dead letters; nothing else touches SQLite."""

from buffer.store import (
    NO_SINK,
    Buffer,
    BufferError,
    BufferStats,
    DeadLetter,
    DeliveryCursor,
    Eviction,
    Settlement,
    inspect_dead_letters,
    inspect_stats,
)

__all__ = [
    "NO_SINK",
    "Buffer",
    "BufferError",
    "BufferStats",
    "DeadLetter",
    "DeliveryCursor",
    "Eviction",
    "Settlement",
    "inspect_dead_letters",
    "inspect_stats",
]
