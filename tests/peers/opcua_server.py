"""OPC UA peers for tests: a real asyncua server and a node-opcua server on free loopback ports
(fixtures), certificates for secure endpoints, and an OPC UA source run in a child process
(``python -m tests.peers.opcua_server run-source``) that commits to SQLite, for kill -9 tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.simulator import PressSimulator


@contextlib.asynccontextmanager
async def started_press() -> AsyncIterator[PressSimulator]:
    """A started press simulator (no security) on a free port, stopped on exit."""
    simulator = PressSimulator(port=0)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


@pytest.fixture
async def press_server() -> AsyncIterator[PressSimulator]:
    """A started press simulator (no security) on a free port, stopped at teardown."""
    async with started_press() as simulator:
        yield simulator


def make_certificate(
    directory: Path, name: str, application_uri: str, *, server: bool, pem: bool = False
) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate and its private key, written to ``directory``.

    The certificate carries ``application_uri`` and this host's name as subject alternative
    names, as OPC UA peers check. It is written as DER (``<name>.der``), or PEM with
    ``pem=True`` (``<name>.crt``: the content, not the extension, says PEM); the key is PEM.
    Returns ``(certificate_path, key_path)``.
    """
    key = cert_gen.generate_private_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    certificate = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {},
        [x509.UniformResourceIdentifier(application_uri), x509.DNSName(socket.gethostname())],
        [usage],
        days=2,
    )
    cert_path = directory / (f"{name}.crt" if pem else f"{name}.der")
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER))
    key_path = directory / f"{name}.key"
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


# --- node-opcua: a server that supports TransferSubscriptions ----------------------------------

NODE_PEER_DIR = Path(__file__).parent / "node_opcua"


def node_opcua_missing() -> str | None:
    """Why the node-opcua test server cannot run here (None: it can)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_PEER_DIR / "node_modules" / "node-opcua-server").is_dir():
        return f"node-opcua is not installed: run `make node-peers` (npm ci in {NODE_PEER_DIR})"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NodeOpcUaServer:
    """``tests/peers/node_opcua/server.js`` in a child process: ns=1;s=Counter (+1 every period), ns=1;s=Running."""

    counter_node = "ns=1;s=Counter"
    running_node = "ns=1;s=Running"

    def __init__(self, *, period_ms: int = 100) -> None:
        self.port = free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}"
        self.period_ms = period_ms
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a deadline with a message
        self.process = await asyncio.create_subprocess_exec(
            "node",
            "server.js",
            str(self.port),
            str(self.period_ms),
            cwd=NODE_PEER_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        output = []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.process.stdout.readline()).decode(errors="replace")
                output.append(line)
                if line.startswith("ready "):
                    break
                if not line:
                    raise AssertionError(f"node-opcua server exited: {''.join(output)[-2000:]}")

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        os.kill(process.pid, signal.SIGKILL)  # by its PID; its state is of no interest
        await process.wait()


@pytest.fixture
async def node_server() -> AsyncIterator[NodeOpcUaServer]:
    """A started node-opcua server on a free port (skipped when node-opcua is not installed)."""
    missing = node_opcua_missing()
    if missing:
        pytest.skip(missing)
    server = NodeOpcUaServer(period_ms=250)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


# --- an OPC UA source in a child process, committing to SQLite (killed with SIGKILL in tests) ----


class SqliteOutput:
    """A ``SourceOutput`` that commits every batch and every state change to a SQLite file, as the buffer does."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS readings (run INTEGER, tag TEXT, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT)")
        self.run = int(time.time() * 1000)

    async def readings(self, batch: Sequence[Any]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT INTO readings VALUES (?, ?, ?)", [(self.run, r.tag, json.dumps(r.value)) for r in batch]
            )

    async def events(self, batch: Sequence[Any]) -> None:
        raise NotImplementedError

    async def load_state(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    async def save_state(self, key: str, value: str | None) -> None:
        with self.db:
            if value is None:
                self.db.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))


def committed_values(path: Path, tag: str) -> list[tuple[int, Any]]:
    """(run, value) of every reading of ``tag`` committed by child sources to ``path``, in commit order."""
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT run, value FROM readings WHERE tag = ? ORDER BY rowid", (tag,)).fetchall()
    except sqlite3.OperationalError:  # the child has not created the table yet
        return []
    finally:
        db.close()
    return [(run, json.loads(value)) for run, value in rows]


async def _run_source(config_json: str, db_path: str) -> None:
    from agent.config_types import BuildContext
    from agent.logs import KeyValueFormatter
    from protocols.opcua import OpcUaSourceConfig

    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    config = OpcUaSourceConfig.model_validate_json(config_json)
    source = config.build(BuildContext(agent_id="t", site="t", version="0", data_dir=Path(db_path).parent))
    output = SqliteOutput(Path(db_path))
    task = asyncio.create_task(source.run(output))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(json.dumps(source.status.info), flush=True)


if __name__ == "__main__":
    # python -m tests.peers.opcua_server run-source CONFIG_JSON DB_PATH
    if len(sys.argv) == 4 and sys.argv[1] == "run-source":
        asyncio.run(_run_source(sys.argv[2], sys.argv[3]))
    else:
        sys.exit("usage: python -m tests.peers.opcua_server run-source CONFIG_JSON DB_PATH")
