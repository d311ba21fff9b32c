"""``plantgate run`` under a notify socket as systemd gives it: READY, watchdog pings, their absence, STOPPING.

The agent is a child process; the test owns the AF_UNIX datagram socket systemd would.
SIGSTOP freezes the child's event loop for real: no ping may arrive while it is frozen,
so systemd would restart a wedged agent; SIGCONT lets the pings resume.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="sd_notify needs AF_UNIX")

CONFIG = """
[agent]
site = "plant-sd"
id = "gw-sd"
data_dir = "{data_dir}"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def receive(sock: socket.socket, wanted: bytes, timeout: float) -> list[bytes]:
    """Datagrams until one contains ``wanted`` (returned last); AssertionError after ``timeout``."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} within {timeout} s; got {got}"
        sock.settimeout(left)
        try:
            datagram = sock.recv(4096)
        except TimeoutError:
            continue
        got.append(datagram)
        if wanted in datagram:
            return got


def drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(4096)
    except BlockingIOError:
        pass


def test_ready_pings_no_ping_while_frozen_then_stopping(tmp_path: Path) -> None:
    config = tmp_path / "plantgate.toml"
    config.write_text(CONFIG.format(data_dir=tmp_path / "data"), encoding="utf-8")
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
        env.pop("WATCHDOG_PID", None)
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / "plantgate"), "run", "-c", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            receive(sock, b"READY=1", 20)
            receive(sock, b"WATCHDOG=1", 5)

            agent.send_signal(signal.SIGSTOP)  # the event loop cannot turn
            drain(sock)  # what it sent before it froze
            frozen = time.monotonic()
            sock.settimeout(1.0)  # ten ping intervals
            with pytest.raises(TimeoutError):
                while time.monotonic() - frozen < 1.0:
                    datagram = sock.recv(4096)
                    assert b"WATCHDOG=1" not in datagram, "a ping from a frozen agent"
            agent.send_signal(signal.SIGCONT)
            receive(sock, b"WATCHDOG=1", 5)

            agent.send_signal(signal.SIGTERM)
            receive(sock, b"STOPPING=1", 10)
            assert agent.wait(30) == 0
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGCONT)
                agent.kill()
                agent.wait(10)
