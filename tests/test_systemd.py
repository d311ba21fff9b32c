"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import systemd

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="sd_notify needs AF_UNIX")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def notify_socket(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket bound to a path, announced in NOTIFY_SOCKET: what systemd gives a Type=notify unit."""
    directory = tmp_path
    if len(os.fsencode(directory / "notify.sock")) >= 100:  # sun_path is 108 bytes; deep tmp dirs do not fit
        directory = Path(tempfile.mkdtemp(prefix="pg-"))
    path = directory / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)  # a receive waits for the datagram, with a deadline
    clean_env.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        if directory != tmp_path:
            directory.rmdir()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_nothing_queued(sock: socket.socket) -> None:
    # notify() sends synchronously: once it returned, a datagram would already be queued.
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(5)


def test_ready_stopping_and_status_reach_the_socket(notify_socket: socket.socket) -> None:
    assert systemd.ready() is True
    assert receive(notify_socket) == "READY=1"
    assert systemd.ready("buffer open, 3 sources, 2 sinks") is True
    assert receive(notify_socket) == "READY=1\nSTATUS=buffer open, 3 sources, 2 sinks"
    assert systemd.status("draining\n1200 events") is True  # a newline must not start a new assignment
    assert receive(notify_socket) == "STATUS=draining 1200 events"
    assert systemd.stopping() is True
    assert receive(notify_socket) == "STOPPING=1"


def test_abstract_namespace_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"plantgate-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        assert receive(sock) == "READY=1"


def test_without_notify_socket_nothing_is_sent(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog_interval() is None
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a transport we do not speak
    assert systemd.notify("READY=1") is False


def test_a_vanished_socket_is_reported_not_raised(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.notify("WATCHDOG=1") is False


def test_watchdog_interval_is_half_of_watchdog_usec(
    notify_socket: socket.socket, clean_env: pytest.MonkeyPatch
) -> None:
    assert systemd.watchdog_interval() is None  # no WATCHDOG_USEC: no watchdog
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    clean_env.setenv("WATCHDOG_USEC", "not-a-number")
    assert systemd.watchdog_interval() is None
    clean_env.setenv("WATCHDOG_USEC", "0")
    assert systemd.watchdog_interval() is None


async def test_watchdog_loop_pings_until_stopped(notify_socket: socket.socket, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a ping every 50 ms
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    loop = asyncio.get_running_loop()
    notify_socket.setblocking(False)
    stop = asyncio.Event()
    task = asyncio.create_task(systemd.watchdog_loop(stop))
    try:
        for _ in range(3):
            datagram = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 5)
            assert datagram == b"WATCHDOG=1"
    finally:
        stop.set()
    await asyncio.wait_for(task, 5)  # returns promptly once stop is set
    assert task.done()
    assert task.exception() is None


async def test_watchdog_waits_for_alive(notify_socket: socket.socket, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "40000")
    loop = asyncio.get_running_loop()
    notify_socket.setblocking(False)
    answers = iter([False, False, True])
    asked = 0

    def alive() -> bool:
        nonlocal asked
        asked += 1
        return next(answers, True)

    stop = asyncio.Event()
    task = asyncio.create_task(systemd.watchdog_loop(stop, alive=alive))
    try:
        datagram = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 5)
        assert datagram == b"WATCHDOG=1"
        assert asked == 3  # no ping while the pipeline said it was stuck
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_watchdog_of_another_process_is_left_alone(
    notify_socket: socket.socket, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("WATCHDOG_USEC", "100000")
    clean_env.setenv("WATCHDOG_PID", str(os.getppid()))  # the watchdog belongs to our parent
    assert systemd.watchdog_interval() is None
    await asyncio.wait_for(systemd.watchdog_loop(asyncio.Event()), 5)  # returns at once, never set
    assert_nothing_queued(notify_socket)
    assert systemd.notify("READY=1") is True  # the notify socket itself still works
    assert receive(notify_socket) == "READY=1"
