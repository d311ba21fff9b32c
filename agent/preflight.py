"""``plantgate check --connect``: the pre-flight that talks to every configured peer once.

Validation sees the file; building reads the secret and certificate files; the
pre-flight goes further and asks each source and sink to reach its peer with the
configured addresses and credentials (``SourceConfig.preflight`` /
``SinkConfig.preflight``): an OPC UA server is connected and every node read
(exists, data type, writable for ``ack`` tags), a Modbus device answers a read of
every register, a broker sends its CONNACK, an HTTPS receiver completes the TLS
handshake. Each answer is one ``Finding``, printed as one line. Components are
checked concurrently, each within a deadline, and nothing is written to any peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from agent.settings import Settings

Level = Literal["ok", "warning", "error"]


class Finding(msgspec.Struct, frozen=True):
    """One result of a pre-flight: what was checked (``subject``, e.g. a tag and its node id) and how it went.

    ``component`` (``sources.opcua.press7``) is filled in by the runner.
    """

    level: Level
    message: str
    subject: str = ""
    component: str = ""

    def line(self) -> str:
        """``error   sources.opcua.press7 tag press7.x (ns=2;s=X): node does not exist (BadNodeIdUnknown)``."""
        where = " ".join(part for part in (self.component, self.subject) if part)
        return f"{self.level:<7} {where}: {self.message}"


def ok(message: str, subject: str = "") -> Finding:
    """A check that passed."""
    return Finding("ok", message, subject)


def warning(message: str, subject: str = "") -> Finding:
    """Works, but probably not as meant."""
    return Finding("warning", message, subject)


def error(message: str, subject: str = "") -> Finding:
    """Will not work as configured: ``plantgate check --connect`` exits 1."""
    return Finding("error", message, subject)


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description of what went wrong while reaching a peer."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_preflight(settings: Settings, *, per_component: float) -> list[Finding]:
    """Every source's and sink's findings, in config order; each component bounded by ``per_component`` seconds.

    A component that raises or overruns gives one ``error`` finding; the others are
    unaffected.
    """
    from agent.registry import SINKS, SOURCES, build_context

    context = build_context(settings)
    ack_tags = frozenset(rule.ack for rule in settings.transactions if rule.ack)
    jobs: list[tuple[str, Callable[[], Awaitable[list[Finding]]]]] = []
    for key in SOURCES:
        for source in getattr(settings.sources, key):
            run = partial(source.preflight, context, ack_tags=ack_tags)
            jobs.append((f"sources.{key}.{source.name}", run))
    for key in SINKS:
        for sink in getattr(settings.sinks, key):
            jobs.append((f"sinks.{key}.{sink.name}", partial(sink.preflight, context)))
    results = await asyncio.gather(*(_bounded(where, job, per_component) for where, job in jobs))
    return [finding for findings in results for finding in findings]


async def _bounded(where: str, job: Callable[[], Awaitable[list[Finding]]], limit: float) -> list[Finding]:
    try:
        async with asyncio.timeout(limit):
            findings = await job()
    except TimeoutError:
        findings = [error(f"no answer within {limit:g} s")]
    except Exception as exc:  # a peer's odd answer must end in a finding, not a traceback
        findings = [error(describe_error(exc))]
    return [msgspec.structs.replace(finding, component=where) for finding in findings]


def summary(findings: list[Finding]) -> str:
    """``pre-flight: 12 ok, 1 warning, 2 errors``."""
    counts = {level: sum(1 for f in findings if f.level == level) for level in ("ok", "warning", "error")}
    return (
        f"pre-flight: {counts['ok']} ok, {counts['warning']} warning{'s' if counts['warning'] != 1 else ''}, "
        f"{counts['error']} error{'s' if counts['error'] != 1 else ''}"
    )
