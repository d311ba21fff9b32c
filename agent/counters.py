"""Production counters: increments that survive wrap-around and resets, never negative.

A PLC counts good parts in a 16- or 32-bit register. Between two readings it
either moved forward, wrapped past its maximum, or was reset (at a shift change, a
new order, a power cycle). The rule, on the raw register value (before scale and
offset), with ``M = 2**bits``:

- ``current >= previous``: the increment is ``current - previous``;
- ``current == 0`` below ``previous``: a reset; the increment is 0;
- ``0 < current < previous`` and the counter could have wrapped, i.e. its width
  is known and the forward distance ``M - previous + current`` is at most
  ``M / 8`` (8192 counts on 16 bits): a wrap-around, a continuation by that distance;
- any other drop: a reset after which the counter already counted ``current``;
  the increment is ``current``.

A counter whose width is unknown (an OPC UA variable) never wraps: every drop is
a reset. Signed types are taken as their two's-complement bit pattern, so an int16
going from 32767 to -32768 moved forward by one.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal, NamedTuple

WRAP_WINDOW_FRACTION = 8
"""A drop is a wrap-around only when the forward distance is at most ``2**bits / 8``."""


class CounterSpec(NamedTuple):
    """How a counter tag's values relate to its register: width (None: unknown) and value = raw * scale + offset."""

    bits: int | None = None
    scale: float = 1.0
    offset: float = 0.0


Step = Literal["forward", "wrap", "reset"]


def classify(previous: int, current: int, bits: int | None) -> tuple[int, Step]:
    """The count between two raw readings of one counter and what happened, per the module's rule."""
    if bits is not None:
        modulus = 1 << bits
        previous %= modulus
        current %= modulus
    if current >= previous:
        return current - previous, "forward"
    if current <= 0:
        return 0, "reset"
    if bits is not None:
        forward = (1 << bits) - previous + current
        if forward <= (1 << bits) // WRAP_WINDOW_FRACTION:
            return forward, "wrap"
    return current, "reset"


def raw_increment(previous: int, current: int, bits: int | None) -> int:
    """The count between two raw readings of one counter, per the module's rule; never negative."""
    return classify(previous, current, bits)[0]


class CounterTracker:
    """The running total of one counter since the first reading: fed every reading, in order.

    ``total`` is in raw counts; ``value_of`` turns a number of counts into the tag's
    units (``counts * scale``; the offset cancels in a difference).
    """

    def __init__(self, spec: CounterSpec | None = None):
        self.spec = spec or CounterSpec()
        self.total = 0
        """Counts since the first reading (0 at the first reading)."""
        self._previous: int | None = None
        self.wraps = 0
        self.resets = 0

    def raw(self, value: object) -> int | None:
        """The raw register value behind a reading's value, or None for a value that is not a number."""
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            return None
        spec = self.spec
        if spec.scale == 1.0 and spec.offset == 0.0 and isinstance(value, int):
            return value
        try:
            return round((float(value) - spec.offset) / spec.scale)
        except (ValueError, OverflowError):  # NaN, infinity
            return None

    @property
    def previous(self) -> int | None:
        """The raw value of the last reading (None before the first)."""
        return self._previous

    def restore(self, previous: int | None, total: int) -> None:
        """Carry on from a saved ``previous`` raw value and ``total`` (an agent restart): the
        first reading after it counts from ``previous``, so what the PLC counted meanwhile is
        neither lost nor counted twice."""
        self._previous = previous
        self.total = total

    def update(self, value: object) -> int:
        """Feed the next reading's value; returns the increment it adds to ``total`` (0 for non-numbers)."""
        raw = self.raw(value)
        if raw is None:
            return 0
        previous, self._previous = self._previous, raw
        if previous is None:
            return 0
        step, what = classify(previous, raw, self.spec.bits)
        if what == "wrap":
            self.wraps += 1
        elif what == "reset":
            self.resets += 1
        self.total += step
        return step

    def value_of(self, counts: int) -> int | float:
        """``counts`` in the tag's units: an int when exact, else the nearest float."""
        scale = self.spec.scale
        if scale == 1.0:
            return counts
        exact = Decimal(repr(scale)) * counts
        return int(exact) if exact == exact.to_integral_value() else float(exact)
