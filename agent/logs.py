"""Logging set-up: JSON lines for journald/containers, key=value lines for people.

Code logs with ``logging.getLogger(__name__)``, a capitalised constant message and
its context as ``extra``::

    log.warning("Sink unreachable", extra={"sink": "cloud", "error": str(exc)})

The message stays constant so lines can be grouped and rate-limited; what varies
goes into named fields. Secrets never reach the output: extras whose key looks
like a password, token or secret are masked, and so are passwords inside URLs and
bearer tokens in any text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

NOISY_LOGGERS: dict[str, int] = {
    "asyncua": logging.WARNING,  # logs every subscription and keep-alive at INFO
    "aiosqlite": logging.WARNING,  # logs every executed call at DEBUG
    "httpx": logging.WARNING,  # one INFO line per request: a flood at delivery rate
    "httpcore": logging.WARNING,
    "h2": logging.WARNING,  # the HTTP/2 state machine, per frame
    "hpack": logging.WARNING,  # logs every header it encodes at DEBUG: the Authorization header too
    "pymodbus": logging.WARNING,
}
"""Third-party loggers held at this level whatever the agent's level, so they cannot flood the log."""

MASK = "***"

# Any key containing one of these words is a secret (password, mqtt_password, api_key, ...),
# except the *_file form, which holds the path to a secret, not the secret.
_SECRET_KEY = re.compile(
    r"password|passwd|passphrase|(?:^|[_-])pass(?:$|[_-])|secret|token|api[_-]?key|authorization|credential"
    r"|private[_-]?key",
    re.I,
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@", re.I)
_BEARER = re.compile(r"(?P<head>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+", re.I)

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # 3.12+
    "suppressed",  # added by RateLimitFilter, written explicitly below
    "ratelimit",  # extra={"ratelimit": False}: never held back (an outage's start and end)
}

_HANDLER_MARK = "_plantgate_handler"


def is_secret_key(key: str) -> bool:
    """Whether a field named ``key`` holds a secret (``password``, ``mqtt_token``; not ``password_file``)."""
    return bool(_SECRET_KEY.search(key)) and not key.lower().endswith(("_file", "_path"))


def _secret(key: object) -> bool:
    return isinstance(key, str) and is_secret_key(key)


def redact_text(text: str) -> str:
    """Mask the password of ``scheme://user:password@host`` and ``Bearer <token>`` inside ``text``."""
    if "@" in text:
        text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    if " " in text:
        text = _BEARER.sub(rf"\g<head>{MASK}", text)
    return text


def redact(value: Any, _depth: int = 0) -> Any:
    """``value`` with secret-named keys masked, recursively through dicts and lists, and
    secrets in strings masked by ``redact_text``."""
    if isinstance(value, str):
        return redact_text(value)
    if _depth > 8:  # a self-referencing structure must not hang the logger
        return value
    if isinstance(value, dict):
        return {k: MASK if _secret(k) else redact(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, _depth + 1) for v in value]
    return value


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra={...}`` fields a caller attached to ``record``, secrets masked."""
    extras: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _RECORD_FIELDS or key.startswith("_"):
            continue
        extras[key] = MASK if is_secret_key(key) else redact(value)
    return extras


def _plain(value: Any) -> Any:
    """A JSON-friendly stand-in for values json cannot encode (datetimes, exceptions, paths)."""
    if isinstance(value, datetime):
        return _rfc3339(value)
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}" if str(value) else type(value).__name__
    return str(value)


def _rfc3339(moment: datetime) -> str:
    moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339 UTC, ms), ``level``, ``logger``,
    ``message``, every ``extra`` field, ``suppressed`` (from ``RateLimitFilter``),
    and ``exc``/``stack`` as strings when present. ASCII-only, so any stderr encoding works."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as a single JSON line."""
        doc: dict[str, Any] = {
            "time": _rfc3339(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        for key, value in record_extras(record).items():
            doc.setdefault(key, value)  # an extra named "message" must not overwrite the message
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            doc["suppressed"] = suppressed
        if record.exc_info:
            doc["exc"] = redact_text(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exc"] = redact_text(record.exc_text)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=_plain)


class KeyValueFormatter(logging.Formatter):
    """``2024-05-01 12:00:00.123 WARNING agent.pipeline: Sink unreachable sink=cloud error="..."``

    For a person at a terminal: local time, the fields after the message, quoted only
    when needed, a traceback on the following lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as one line (plus traceback lines when there is one)."""
        moment = datetime.fromtimestamp(record.created)
        parts = [
            moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}",
            f"{record.levelname:<7}",
            f"{record.name}:",
            redact_text(record.getMessage()),
        ]
        fields = record_extras(record)
        parts.extend(f"{key}={self._value(value)}" for key, value in fields.items())
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            parts.append(f"(repeated {suppressed} times since the last line shown)")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + redact_text(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    @staticmethod
    def _value(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, default=_plain)
        if not text or any(c in text for c in ' "=\n\t'):
            return json.dumps(text)
        return text


class RateLimitFilter(logging.Filter):
    """Lets a repeated warning or error through at most once per ``interval`` seconds.

    Two records repeat each other when logger, level and message template (the
    format string before ``%`` arguments) are the same and so are their
    ``source``/``sink`` extras, so one sink's errors do not hide another's. A
    caller may set ``extra={"ratelimit_key": ...}`` to choose the key instead.
    The first record after a quiet interval carries ``suppressed=N``: how many
    repeats were dropped since the last one shown. Records below ``level`` always
    pass, and so do records logged with ``extra={"ratelimit": False}``: the start
    and end of an outage are never hidden behind an earlier one's repeats.
    Thread-safe: paho-mqtt logs from its own thread.
    """

    KEY_EXTRAS = ("source", "sink")

    def __init__(
        self,
        interval: float = 60.0,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.level = level
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [time the last record was let through, repeats suppressed since]
        self._seen: dict[tuple[Any, ...], list[Any]] = {}

    def _key(self, record: logging.LogRecord) -> tuple[Any, ...]:
        explicit = getattr(record, "ratelimit_key", None)
        if explicit is not None:
            return (record.name, record.levelno, str(record.msg), str(explicit))
        return (
            record.name,
            record.levelno,
            str(record.msg),
            *(str(getattr(record, name, "")) for name in self.KEY_EXTRAS),
        )

    def filter(self, record: logging.LogRecord) -> bool:
        """True to emit ``record``; False while a repeat is inside its interval."""
        if record.levelno < self.level or self.interval <= 0 or getattr(record, "ratelimit", True) is False:
            return True
        key = self._key(record)
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False
            if entry is not None and entry[1]:
                record.suppressed = entry[1]
            if entry is None and len(self._seen) >= self._max_keys:
                self._forget_quiet(now)
            self._seen[key] = [now, 0]
        return True

    def _forget_quiet(self, now: float) -> None:
        # Bound memory: drop keys whose interval is over. Their pending count (if any)
        # is lost; only when every key is busy do we drop the oldest outright.
        for key in [k for k, (last, _) in self._seen.items() if now - last >= self.interval]:
            del self._seen[key]
        if len(self._seen) >= self._max_keys:
            del self._seen[min(self._seen, key=lambda k: self._seen[k][0])]


def setup_logging(
    level: str = "INFO",
    json_output: bool | None = None,
    *,
    stream: TextIO | None = None,
    rate_limit_seconds: float = 60.0,
) -> logging.Handler:
    """Configure the root logger for the agent and return the handler it installed.

    ``json_output=None`` picks JSON lines when ``stream`` (default stderr) is not a
    terminal (journald, docker) and key=value lines on a terminal; True/False force
    one. Warnings and errors repeating within ``rate_limit_seconds`` are dropped and
    counted. Calling it again replaces the handler it installed before (and leaves
    any other handler alone); noisy third-party loggers are held at WARNING.
    Raises ``ValueError`` for an unknown level name.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    out = stream if stream is not None else sys.stderr
    if json_output is None:
        json_output = not _isatty(out)

    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if json_output else KeyValueFormatter())
    handler.addFilter(RateLimitFilter(rate_limit_seconds))
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, noisy_level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(noisy_level, numeric))
    return handler


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
