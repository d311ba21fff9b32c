"""What a scan says: GS1 element strings read with biip, plain codes kept as they are.

How a frame is read (``read_scan``):

1. Only printable ASCII and GS (0x1D, the FNC1 separator) may occur; any other
   byte makes the scan garbled.
2. With an AIM symbology identifier (``]C1``, ``]e0``, ``]d2``, ``]Q3``, ``]J1``: GS1
   symbologies) the rest must be a valid GS1 element string (or, for DataMatrix and
   QR, a GS1 Digital Link URI); ``]E0``, ``]E3``, ``]E4``, ``]I1`` must be a valid
   GTIN. Any other known identifier (``]C0`` Code 128, ``]A0`` Code 39, ``]Q1`` QR,
   ...) is a plain code. An unknown identifier is garbled.
3. Without one: a code holding GS, or starting with ``(`` (the printed form
   ``(01)...(10)...``), must be GS1; 8, 12, 13 or 14 digits with a valid check digit
   are a GTIN; a code biip reads cleanly as GS1 starting with AI 00, 01 or 02 (or a
   GS1 Digital Link URI) is GS1; anything else is a plain code.

GS1 (and GTIN) codes must pass biip's checks (check digits, dates, AI formats).
"""

from __future__ import annotations

from dataclasses import dataclass

from biip import ParseError
from biip.gs1_digital_link_uris import GS1DigitalLinkURI
from biip.gs1_element_strings import GS1ElementStrings
from biip.gs1_messages import GS1Message
from biip.gtin import Gtin
from biip.symbology import GS1Symbology, SymbologyIdentifier

from agent.events import Quantity, decimal_string

__all__ = ["Garbled", "ScanContent", "escape_raw", "read_scan"]

_GS = "\x1d"
_ALLOWED = frozenset([0x1D, *range(0x20, 0x7F)])
_GS1_MESSAGE_SYMBOLOGIES = frozenset(GS1Symbology.with_gs1_messages())
_DIGITAL_LINK_SYMBOLOGIES = frozenset(GS1Symbology.with_gs1_digital_link_uri())
_GTIN_SYMBOLOGIES = frozenset(GS1Symbology.with_gtin())
_COUNT_AIS = ("37", "30")  # count of trade items (37 inside a logistic unit), variable count (30)
# Variable measure AIs (the 4th digit is the decimal point position) -> UN/ECE Rec 20 unit.
_MEASURE_UNITS = {"310": "KGM", "311": "MTR", "314": "MTK", "315": "LTR", "316": "MTQ"}
_LEADING_AIS = ("00", "01", "02")

_ESCAPED = [chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in range(256)]
_ESCAPED[0x5C] = "\\\\"


class Garbled(ValueError):
    """The scan cannot be read; the message is the reason given in ``barcode.rejected``."""


@dataclass(frozen=True, slots=True)
class ScanContent:
    """What one scan carries; ``gs1`` False for a plain (non-GS1) code, which has only its text."""

    text: str
    gs1: bool = False
    gtin: str | None = None
    lot: str | None = None
    serial: str | None = None
    expiry: str | None = None
    quantity: Quantity | None = None
    sscc: str | None = None


def escape_raw(data: bytes) -> str:
    """Bytes as text that shows each of them: printable ASCII as is, ``\\`` doubled, others ``\\xNN``."""
    return "".join([_ESCAPED[b] for b in data])


def read_scan(data: bytes) -> ScanContent:
    """Read one frame (terminator and surrounding spaces already removed); ``Garbled`` when it cannot be."""
    for offset, byte in enumerate(data):
        if byte not in _ALLOWED:
            raise Garbled(f"byte 0x{byte:02x} at offset {offset} is neither printable ASCII nor GS")
    text = data.decode("ascii")
    if text.startswith("]"):
        return _with_symbology(text)
    if _GS in text:
        return _gs1(text, _message(text.strip(_GS)))
    if text.startswith("("):
        try:
            message = GS1Message.parse_hri(text)
        except (ParseError, ValueError, IndexError) as exc:
            raise Garbled(f"not a GS1 element string in (AI) form: {exc}") from exc
        return _gs1(text, message.element_strings)
    if text.isdigit() and len(text) in (8, 12, 13, 14):
        try:
            return ScanContent(text, gs1=True, gtin=Gtin.parse(text).as_gtin_14())
        except ParseError:
            pass  # not a GTIN: maybe an element string, else a plain number
    if text.startswith(("http://", "https://")):
        try:
            return _gs1(text, GS1DigitalLinkURI.parse(text).element_strings)
        except (ParseError, ValueError, IndexError, Garbled):
            return ScanContent(text)
    if text.startswith(_LEADING_AIS):
        try:
            return _gs1(text, _message(text))
        except Garbled:
            pass  # digits that only look like AIs: a plain code
    return ScanContent(text)


def _with_symbology(text: str) -> ScanContent:
    try:
        if len(text) < 3:
            raise ParseError("too short")
        identifier = SymbologyIdentifier.extract(text)
    except (ParseError, ValueError, IndexError) as exc:
        raise Garbled(f"unknown AIM symbology identifier {text[:3]!r}") from exc
    body = text[len(identifier.value) :]
    symbology = identifier.gs1_symbology
    if symbology in _DIGITAL_LINK_SYMBOLOGIES and body.startswith(("http://", "https://")):
        try:
            return _gs1(text, GS1DigitalLinkURI.parse(body).element_strings)
        except (ParseError, ValueError, IndexError) as exc:
            raise Garbled(f"{identifier.value} GS1 Digital Link URI: {exc}") from exc
    if symbology in _GS1_MESSAGE_SYMBOLOGIES:
        try:
            return _gs1(text, _message(body.strip(_GS)))
        except Garbled as exc:
            raise Garbled(f"{identifier.value} is a GS1 symbology: {exc}") from exc
    if symbology in _GTIN_SYMBOLOGIES:
        # EAN-13 with an add-on carries it after the 13 digits; the GTIN is the first 13.
        digits = body[:13] if len(body) > 13 and symbology is GS1Symbology.EAN_13_WITH_ADD_ON else body
        try:
            return ScanContent(text, gs1=True, gtin=Gtin.parse(digits).as_gtin_14())
        except (ParseError, ValueError) as exc:
            raise Garbled(f"{identifier.value} carries a GTIN: {exc}") from exc
    if not body:
        raise Garbled(f"nothing after the AIM symbology identifier {identifier.value}")
    return ScanContent(text)


def _message(body: str) -> GS1ElementStrings:
    if not body:
        raise Garbled("no GS1 element string")
    try:
        return GS1Message.parse(body).element_strings
    except (ParseError, ValueError, IndexError) as exc:
        raise Garbled(str(exc)) from exc


def _gs1(text: str, elements: GS1ElementStrings) -> ScanContent:
    """The fields plantgate carries, from element strings biip parsed; check-digit errors are garbled."""
    if not elements:
        raise Garbled("no GS1 element string")
    fields: dict[str, str] = {}
    measure: Quantity | None = None
    count: Quantity | None = None
    for element in elements:
        error = element.gtin_error or element.sscc_error or element.gln_error
        if error:
            raise Garbled(error)
        ai = element.ai.ai
        if ai in ("01", "02"):
            fields.setdefault(ai, element.value)
        elif ai == "00":
            fields["sscc"] = element.value
        elif ai == "10":
            fields["lot"] = element.value
        elif ai == "21":
            fields["serial"] = element.value
        elif ai == "17" and element.date is not None:
            fields["expiry"] = element.date.isoformat()
        elif ai in _COUNT_AIS and count is None:
            count = Quantity(value=decimal_string(element.value), uom="EA")
        elif ai[:3] in _MEASURE_UNITS and measure is None and element.decimal is not None:
            measure = Quantity(value=decimal_string(element.decimal), uom=_MEASURE_UNITS[ai[:3]])
    return ScanContent(
        text,
        gs1=True,
        gtin=fields.get("01") or fields.get("02"),
        lot=fields.get("lot"),
        serial=fields.get("serial"),
        expiry=fields.get("expiry"),
        quantity=count or measure,
        sscc=fields.get("sscc"),
    )
