"""sd_notify(3) without libsystemd: readiness, stopping, watchdog and status to systemd.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). systemd
sets it only for ``Type=notify`` units; elsewhere every function here is one
environment lookup and returns False, so calling them unconditionally is fine.

Contract (DESIGN.md): ``READY=1`` once the buffer is open and every source and sink
task started; ``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` from the event loop when
``WATCHDOG_PID`` is unset or ours; ``STOPPING=1`` on SIGTERM, then exit 0 after the
drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


def _socket_address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address[0] == "@":
        return "\0" + address[1:]  # abstract namespace: a leading NUL instead of '@'
    if address[0] == "/":
        return address
    return None  # vsock:… and other transports: not for a plant-floor agent


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; True when a datagram was sent.

    False when not run by systemd with a notify socket. A send that fails is
    logged as a warning and returns False: telling systemd is never worth
    stopping the agent for (a missed watchdog ping makes systemd restart us,
    which is the point of it).
    """
    address = _socket_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("Cannot notify systemd", extra={"notify": message.split("\n", 1)[0], "error": str(exc)})
        return False
    return True


def ready(status: str | None = None) -> bool:
    """``READY=1``: start-up finished (buffer open, every source and sink task started)."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")


def stopping(status: str | None = None) -> bool:
    """``STOPPING=1``: shutdown began (SIGTERM); the drain follows."""
    return notify("STOPPING=1" if status is None else f"STOPPING=1\nSTATUS={_one_line(status)}")


def status(text: str) -> bool:
    """``STATUS=…``: one line shown by ``systemctl status plantgate``."""
    return notify(f"STATUS={_one_line(text)}")


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.splitlines())


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    None when there is no notify socket, no (valid) ``WATCHDOG_USEC``, or
    ``WATCHDOG_PID`` names another process (the watchdog is for our parent or a
    child then, not for us).
    """
    if _socket_address() is None:
        return None
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text and pid_text.strip() != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("Ignoring invalid WATCHDOG_USEC", extra={"value": usec_text})
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def watchdog_loop(stop: asyncio.Event, *, alive: Callable[[], bool] | None = None) -> None:
    """Send ``WATCHDOG=1`` every ``watchdog_interval()`` seconds until ``stop`` is set.

    Runs as a task on the agent's event loop, so a blocked or wedged loop stops
    the pings and systemd restarts the agent. ``alive`` (optional) is asked before
    each ping; while it returns False no ping is sent, so a pipeline that is
    stuck although the loop still turns gets restarted too. Returns at once when
    the watchdog is not enabled.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    log.debug("Watchdog enabled", extra={"interval_s": interval})
    while not stop.is_set():
        if alive is None or alive():
            notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            continue
