"""A segment's stored form: the events of one lane's run, as MessagePack, compressed with Zstandard.

The buffer's lanes and the delivery journal keep segments in this form. Events of one
lane and source repeat their keys and most values, so a segment is 20-35 times
smaller than its events: the disk (WAL, then checkpoint) writes that much less.
Zstandard level 1 packs a segment about three times faster than zlib did, unpacks it
about twice as fast, and half as large (measured on the bench's transactions), and it
releases the GIL while it works, so SQLite's thread keeps going meanwhile.

Segments written before (zlib, or plain MessagePack at first) are read as they are.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import msgspec
import zstandard

from agent.sink import BufferedEvent

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a Zstandard frame's first bytes
_ZLIB_HEADER = 0x78  # a zlib stream's first byte
# Neither can start a MessagePack array, which is how a plain segment starts.

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[BufferedEvent])
_raw_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_event_decoder = msgspec.msgpack.Decoder(BufferedEvent)
_compressor = zstandard.ZstdCompressor(level=1)
_decompressor = zstandard.ZstdDecompressor()


def pack_segment(events: Sequence[BufferedEvent]) -> bytes:
    """One segment's stored form."""
    return _compressor.compress(_encoder.encode(events))


def pack_bytes(plain: bytes) -> bytes:
    """Any other value kept beside segments, compressed the same way."""
    return _compressor.compress(plain)


def unpack_bytes(blob: bytes) -> bytes:
    """What ``pack_bytes`` (or zlib) made, back; anything else as it is."""
    return _plain(blob)


def _plain(blob: bytes) -> bytes:
    if blob[:4] == _ZSTD_MAGIC:
        return _decompressor.decompress(blob)
    if blob and blob[0] == _ZLIB_HEADER:
        return zlib.decompress(blob)
    return blob


def unpack_segment(blob: bytes) -> list[BufferedEvent]:
    """The events of a stored segment (any form it was ever written in)."""
    return _decoder.decode(_plain(blob))


class LazySegment:
    """A stored segment's events, each decoded only when asked for (a trace needs a few of a thousand)."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, blob: bytes) -> None:
        self._raw = _raw_decoder.decode(_plain(blob))
        self._decoded: dict[int, BufferedEvent] = {}

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> BufferedEvent:
        event = self._decoded.get(index)
        if event is None:
            event = self._decoded[index] = _event_decoder.decode(self._raw[index])
        return event

    def __iter__(self) -> Iterator[BufferedEvent]:
        return (self[index] for index in range(len(self._raw)))
