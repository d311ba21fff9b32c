"""The barcode pre-flight: reach the scanner (tcp-client), bind the listen port (tcp-server) or
open the serial device (serial), then let go at once. No scan is read."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from typing import TYPE_CHECKING

from agent.config_types import BuildContext
from agent.preflight import Finding, describe_error, error, ok, warning
from protocols.barcode import parse_address

if TYPE_CHECKING:
    from protocols.barcode import BarcodeSourceConfig


async def preflight(config: BarcodeSourceConfig, context: BuildContext) -> list[Finding]:
    """One finding for the scanner's connection, listen port or serial device."""
    if config.mode == "tcp-client":
        assert config.connect is not None
        host, port = parse_address(config.connect, key="connect")
        try:
            async with asyncio.timeout(config.connect_timeout):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            return [error(f"cannot connect to the scanner at {config.connect}: {describe_error(exc)}")]
        writer.close()
        # The scanner hanging up first changes nothing: the connection was made, which is what counts.
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return [ok(f"scanner at {config.connect} accepts a connection")]
    if config.mode == "tcp-server":
        assert config.listen is not None
        host, port = parse_address(config.listen, key="listen")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return [warning(f"{config.listen} is in use (the running agent, or another program)")]
                return [error(f"cannot listen on {config.listen}: {describe_error(exc)}")]
        return [ok(f"{config.listen} can be bound for the scanners")]
    import serial

    device = context.resolve(config.device) if config.device is not None else None
    try:
        port = serial.Serial(str(device), **config.serial_options(), timeout=0)
    except (serial.SerialException, OSError, ValueError) as exc:
        return [error(f"cannot open {device}: {describe_error(exc)}")]
    port.close()
    return [ok(f"{device} opens ({config.baudrate} baud)")]
