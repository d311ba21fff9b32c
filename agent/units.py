"""Units of measure: UN/ECE Recommendation 20 codes and exact conversion within a dimension.

A rule's ``uom`` is the unit its source counts in; ``uom_to`` the unit the ERP
books in. Each code below has a factor to its dimension's base unit, as an exact
decimal, so ``1250 GRM`` becomes ``1.25 KGM`` without a binary float in between.
A conversion that multiplies (or divides into a finite decimal) is exact; one
whose quotient never ends (``1 SEC`` in ``HUR``) is rounded half-even to
``ROUND_DECIMALS`` decimal places.

Pure: no I/O.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact
from typing import NamedTuple

ROUND_DECIMALS = 12
"""Decimal places kept when a conversion's quotient has no finite decimal form."""


class Unit(NamedTuple):
    """A UN/ECE Rec 20 code's dimension and its factor to the dimension's base unit."""

    dimension: str
    factor: Decimal


UNITS: dict[str, Unit] = {
    # mass, base gram
    "GRM": Unit("mass", Decimal(1)),
    "KGM": Unit("mass", Decimal(1000)),
    "TNE": Unit("mass", Decimal(1_000_000)),
    "LBR": Unit("mass", Decimal("453.59237")),
    # length, base millimetre
    "MMT": Unit("length", Decimal(1)),
    "CMT": Unit("length", Decimal(10)),
    "MTR": Unit("length", Decimal(1000)),
    # volume, base millilitre
    "MLT": Unit("volume", Decimal(1)),
    "LTR": Unit("volume", Decimal(1000)),
    "MTQ": Unit("volume", Decimal(1_000_000)),
    # time, base second
    "SEC": Unit("time", Decimal(1)),
    "MIN": Unit("time", Decimal(60)),
    "HUR": Unit("time", Decimal(3600)),
    # count: "each", "one" and "piece" are the same count
    "EA": Unit("count", Decimal(1)),
    "C62": Unit("count", Decimal(1)),
    "PCE": Unit("count", Decimal(1)),
}
"""Convertible codes; a code outside this table still passes as a unit, it just cannot be converted."""

_CONTEXT = Context(prec=60, traps=[])  # wide enough that every product and finite quotient here is exact
_STEP = Decimal(1).scaleb(-ROUND_DECIMALS)


class Conversion(NamedTuple):
    """``value * numerator / denominator``: from one code to another of the same dimension."""

    source: str
    target: str
    numerator: Decimal
    denominator: Decimal

    def apply(self, value: Decimal) -> Decimal:
        """``value`` (in ``source``) in ``target``: exact when the quotient is finite, else rounded."""
        if self.numerator == self.denominator:
            return value
        context = _CONTEXT.copy()
        product = context.multiply(value, self.numerator)
        context.clear_flags()
        result = context.divide(product, self.denominator)
        if context.flags[Inexact]:
            result = context.divide(product, self.denominator).quantize(_STEP, rounding=ROUND_HALF_EVEN)
        return result


def conversion(source: str, target: str) -> Conversion:
    """The conversion between two codes; ``ValueError`` names why there is none."""
    known = ", ".join(sorted(UNITS))
    if source not in UNITS:
        raise ValueError(f"unit {source!r} has no conversion; convertible codes: {known}")
    if target not in UNITS:
        raise ValueError(f"unit {target!r} has no conversion; convertible codes: {known}")
    have, want = UNITS[source], UNITS[target]
    if have.dimension != want.dimension:
        raise ValueError(f"cannot convert {source} ({have.dimension}) to {target} ({want.dimension})")
    return Conversion(source, target, have.factor, want.factor)
