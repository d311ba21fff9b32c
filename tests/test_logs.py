"""Log output: JSON lines with extras, redaction of secrets, rate limiting of repeats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.logs import (
    MASK,
    NOISY_LOGGERS,
    JsonFormatter,
    KeyValueFormatter,
    RateLimitFilter,
    redact_text,
    setup_logging,
)


class Clock:
    """A clock the test advances by hand, handed to RateLimitFilter (injected, not patched)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_logger(
    name: str, formatter: logging.Formatter, *filters: logging.Filter
) -> tuple[logging.Logger, io.StringIO]:
    """A logger of its own writing through a real StreamHandler into a StringIO."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    for item in filters:
        handler.addFilter(item)
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture
def restore_root() -> Iterator[None]:
    """setup_logging changes the root and third-party loggers: put them back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers = handlers
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


def test_json_line_has_time_level_logger_message_and_every_extra() -> None:
    log, out = make_logger("plantgate.test.json", JsonFormatter())
    before = datetime.now(UTC).replace(microsecond=0)
    log.warning(
        "Sink unreachable after %d attempts",
        3,
        extra={"sink": "cloud", "event_id": "e-1", "correlationid": "c-9", "error": "connection refused"},
    )
    [line] = lines(out)
    assert line["level"] == "WARNING"
    assert line["logger"] == "plantgate.test.json"
    assert line["message"] == "Sink unreachable after 3 attempts"
    assert line["sink"] == "cloud"
    assert line["event_id"] == "e-1"
    assert line["correlationid"] == "c-9"
    assert line["error"] == "connection refused"
    assert line["time"].endswith("Z")
    stamp = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert stamp.tzinfo is not None
    assert before <= stamp <= datetime.now(UTC)
    assert "exc" not in line
    # nothing but the documented fields: no LogRecord internals leak into the line
    assert set(line) == {"time", "level", "logger", "message", "sink", "event_id", "correlationid", "error"}


def test_json_line_carries_the_traceback_as_a_string() -> None:
    log, out = make_logger("plantgate.test.exc", JsonFormatter())
    try:
        raise ValueError("bad register 40001")
    except ValueError:
        log.exception("Poll failed", extra={"source": "filler2"})
    [line] = lines(out)
    assert line["message"] == "Poll failed"
    assert line["source"] == "filler2"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad register 40001" in line["exc"]


def test_values_json_cannot_encode_are_written_as_text() -> None:
    log, out = make_logger("plantgate.test.types", JsonFormatter())
    moment = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    log.info("Event stored", extra={"at": moment, "cause": OSError("disk full"), "count": 2})
    [line] = lines(out)
    assert line["at"] == "2024-05-01T12:00:00.250Z"
    assert line["cause"] == "OSError: disk full"
    assert line["count"] == 2


def test_secrets_are_masked_in_extras_nested_values_urls_and_messages() -> None:
    log, out = make_logger("plantgate.test.secrets", JsonFormatter())
    log.error(
        "Connect to mqtts://gw:hunter2@broker.example.com:8883 failed",
        extra={
            "password": "hunter2",
            "mqtt_password": "hunter2",
            "client_secret": "s3cr3t",
            "ingest_token": "tok-123",
            "password_file": "/run/credentials/plantgate.service/mqtt-password",
            "settings": {"username": "gw", "token": "tok-123", "nested": [{"api_key": "k-1"}]},
            "error": "401 for Authorization: Bearer tok-123",
        },
    )
    raw = out.getvalue()
    for secret in ("hunter2", "s3cr3t", "tok-123", "k-1"):
        assert secret not in raw
    [line] = lines(out)
    assert line["password"] == MASK
    assert line["mqtt_password"] == MASK
    assert line["client_secret"] == MASK
    assert line["ingest_token"] == MASK
    # the *_file form is a path, not the secret: kept so an operator can find it
    assert line["password_file"] == "/run/credentials/plantgate.service/mqtt-password"
    assert line["settings"] == {"username": "gw", "token": MASK, "nested": [{"api_key": MASK}]}
    assert line["message"] == f"Connect to mqtts://gw:{MASK}@broker.example.com:8883 failed"
    assert line["error"] == f"401 for Authorization: Bearer {MASK}"


def test_redact_text_leaves_ordinary_text_alone() -> None:
    for text in (
        "opc.tcp://10.1.3.7:4840",
        "user@example.com wrote",
        "bypass valve open",
        "ns=2;s=Press7.State",
    ):
        assert redact_text(text) == text


def test_key_value_line_for_people() -> None:
    log, out = make_logger("plantgate.test.kv", KeyValueFormatter())
    log.warning("Sink unreachable", extra={"sink": "cloud", "error": "connection refused", "password": "hunter2"})
    text = out.getvalue()
    assert text.count("\n") == 1
    assert ' WARNING plantgate.test.kv: Sink unreachable sink=cloud error="connection refused" password=***' in text
    assert "hunter2" not in text


def test_repeats_are_rate_limited_and_the_next_line_counts_them() -> None:
    clock = Clock()
    log, out = make_logger("plantgate.test.rate", JsonFormatter(), RateLimitFilter(30.0, clock=clock))
    for attempt in range(5):
        log.error("Sink unreachable", extra={"sink": "cloud", "error": f"attempt {attempt}"})
    assert [line["error"] for line in lines(out)] == ["attempt 0"]

    clock.now += 29.9
    log.error("Sink unreachable", extra={"sink": "cloud", "error": "attempt 5"})
    assert len(lines(out)) == 1

    clock.now += 0.2  # 30.1 s after the line that was shown
    log.error("Sink unreachable", extra={"sink": "cloud", "error": "attempt 6"})
    shown = lines(out)
    assert len(shown) == 2
    assert shown[1]["error"] == "attempt 6"
    assert shown[1]["suppressed"] == 5
    assert "suppressed" not in shown[0]

    clock.now += 31
    log.error("Sink unreachable", extra={"sink": "cloud", "error": "attempt 7"})
    assert "suppressed" not in lines(out)[2]  # nothing was dropped in between


def test_rate_limit_keeps_components_and_messages_apart() -> None:
    clock = Clock()
    log, out = make_logger("plantgate.test.apart", JsonFormatter(), RateLimitFilter(60.0, clock=clock))
    log.error("Sink unreachable", extra={"sink": "cloud"})
    log.error("Sink unreachable", extra={"sink": "erp"})  # another sink: not a repeat
    log.error("Sink unauthorized", extra={"sink": "erp"})  # another message: not a repeat
    log.error("Bad node", extra={"source": "press7", "ratelimit_key": "ns=2;s=A"})
    log.error("Bad node", extra={"source": "press7", "ratelimit_key": "ns=2;s=B"})
    log.error("Bad node", extra={"source": "press7", "ratelimit_key": "ns=2;s=A"})  # a repeat
    log.info("Connected", extra={"sink": "cloud"})
    log.info("Connected", extra={"sink": "cloud"})  # below WARNING: never limited
    messages = [(line["message"], line.get("sink") or line.get("ratelimit_key")) for line in lines(out)]
    assert messages == [
        ("Sink unreachable", "cloud"),
        ("Sink unreachable", "erp"),
        ("Sink unauthorized", "erp"),
        ("Bad node", "ns=2;s=A"),
        ("Bad node", "ns=2;s=B"),
        ("Connected", "cloud"),
        ("Connected", "cloud"),
    ]


def test_rate_limit_memory_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimitFilter(10.0, clock=clock, max_keys=4)
    log, out = make_logger("plantgate.test.bounded", JsonFormatter(), limiter)
    for n in range(50):
        log.error("Bad node", extra={"ratelimit_key": n})
    assert len(lines(out)) == 50
    assert len(limiter._seen) <= 4


def test_setup_logging_writes_json_when_not_a_terminal(restore_root: None) -> None:
    out = io.StringIO()  # not a TTY, like journald or docker logs
    setup_logging("INFO", stream=out)
    logging.getLogger("plantgate.test.setup").info("Agent started", extra={"site": "plant-01"})
    logging.getLogger("plantgate.test.setup").debug("Not shown at INFO")
    [line] = lines(out)
    assert line["message"] == "Agent started"
    assert line["site"] == "plant-01"
    for name, level in NOISY_LOGGERS.items():
        assert logging.getLogger(name).getEffectiveLevel() >= level
    logging.getLogger("asyncua.client.ua_client").info("Publish callback")  # quieted third party
    assert len(lines(out)) == 1


def test_setup_logging_forced_key_value_and_replaces_its_own_handler(restore_root: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("DEBUG", json_output=True, stream=first)
    handler = setup_logging("DEBUG", json_output=False, stream=second)
    root = logging.getLogger()
    assert handler in root.handlers
    assert sum(1 for h in root.handlers if isinstance(h.formatter, JsonFormatter | KeyValueFormatter)) == 1
    logging.getLogger("plantgate.test.setup").debug("Polling", extra={"source": "filler2"})
    assert first.getvalue() == ""
    assert "DEBUG   plantgate.test.setup: Polling source=filler2" in second.getvalue()


def test_setup_logging_rejects_an_unknown_level(restore_root: None) -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        setup_logging("LOUD", stream=io.StringIO())
