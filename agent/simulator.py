"""A simulated press: a real OPC UA server on loopback, for ``plantgate demo`` and the tests.

``PressSimulator`` runs an asyncua server whose address space looks like a small
press PLC (namespace index 2, string node ids ``ns=2;s=Press7.<Name>``)::

    Press7.Temperature  Double   process temperature
    Press7.State        Int32    0 stopped, 1 running, 2 fault
    Press7.CycleDone    Boolean  true when a cycle completed (the transaction trigger)
    Press7.CycleAck     Boolean  written true by a client once the completion is stored
    Press7.WorkOrder    String   work order of the last cycle
    Press7.Item         String   item produced in the last cycle
    Press7.BatchQty     Double   quantity produced in the last cycle

``stop()`` really stops listening and drops every connection; ``start()`` again
brings up a fresh server (empty sessions, initial values) on the same port, the way
a PLC comes back after a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import traceback
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

logger = logging.getLogger(__name__)

NAMESPACE_URI = "urn:plantgate:simulator:press7"
APPLICATION_URI = "urn:plantgate:simulator"
"""The simulator's OPC UA application URI; a server certificate for it must carry this URI."""

PRESS = "Press7"

# name -> (variant type, initial value, writable by clients)
_VARIABLES: dict[str, tuple[ua.VariantType, Any, bool]] = {
    "Temperature": (ua.VariantType.Double, 20.0, False),
    "State": (ua.VariantType.Int32, 0, False),
    "CycleDone": (ua.VariantType.Boolean, False, False),
    "CycleAck": (ua.VariantType.Boolean, False, True),
    "WorkOrder": (ua.VariantType.String, "", False),
    "Item": (ua.VariantType.String, "", False),
    "BatchQty": (ua.VariantType.Double, 0.0, False),
}

STOPPED, RUNNING, FAULT = 0, 1, 2


class _Users(UserManager):
    """asyncua user manager: a fixed username/password table, nobody else."""

    def __init__(self, users: Mapping[str, str]):
        self._users = dict(users)

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


def _free_port(host: str) -> int:
    # asyncua advertises the port of its configured endpoint URL, so the port has to be
    # known before the server starts; the kernel hands out a free one here.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class _GoneClientPublish(logging.Filter):
    """Drops the reports of a publish answer written to a client connection that has just closed.

    Under uvloop a write to a closed transport raises (asyncio's own loop only counts
    it), so each time a client disconnects with a publish request pending the asyncua
    server logs the same RuntimeError three times (the subscription loop, stopping the
    subscription, and the task's exception never retrieved). The client is gone; there
    is nothing to report.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, RuntimeError) or "handler is closed" not in str(exc):
            return True
        frames = traceback.extract_tb(exc.__traceback__)
        return not any("asyncua/server" in frame.filename.replace("\\", "/") for frame in frames)


_GONE_CLIENT_PUBLISH = _GoneClientPublish()


def _quiet_asyncua() -> None:
    # The asyncua server logs every session, channel and request at INFO. Only its own
    # loggers are touched, and only when nobody configured them.
    for name in ("asyncua.server", "asyncua.server.binary_server_asyncio", "asyncua.server.uaprocessor"):
        log = logging.getLogger(name)
        if log.level == logging.NOTSET:
            log.setLevel(logging.WARNING)
    for name in ("asyncua.server.internal_subscription", "asyncua.server.subscription_service", "asyncio"):
        log = logging.getLogger(name)
        if _GONE_CLIENT_PUBLISH not in log.filters:
            log.addFilter(_GONE_CLIENT_PUBLISH)


class PressSimulator:
    """A press PLC as a real OPC UA server on ``host`` (default loopback).

    ``port=0`` picks a free port at the first ``start()`` and keeps it for restarts.
    Security is optional: with ``certificate`` and ``private_key`` (DER or PEM files,
    or their bytes) the server offers ``security_policies`` (names of
    ``asyncua.ua.SecurityPolicyType`` members such as ``"Basic256Sha256_SignAndEncrypt"``;
    default: every policy asyncua supports plus ``NoSecurity``); with ``users`` only
    those username/password pairs may open a session.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        certificate: Path | bytes | None = None,
        private_key: Path | bytes | None = None,
        security_policies: Sequence[str | ua.SecurityPolicyType] | None = None,
        users: Mapping[str, str] | None = None,
    ):
        if (certificate is None) != (private_key is None):
            raise ValueError("certificate and private_key go together")
        self.host = host
        self.port = port
        self._certificate = certificate
        self._private_key = private_key
        self._policies = [
            p if isinstance(p, ua.SecurityPolicyType) else ua.SecurityPolicyType[p] for p in security_policies or ()
        ]
        if self._policies and certificate is None:
            secure = [p for p in self._policies if p is not ua.SecurityPolicyType.NoSecurity]
            if secure:
                raise ValueError(f"security policies {[p.name for p in secure]} need a certificate and private_key")
        self._users = dict(users) if users else None
        self._server: Server | None = None
        self._extra: dict[str, tuple[ua.VariantType | None, Any]] = {}
        self._ack = asyncio.Event()
        self.acknowledged: list[tuple[str, str, float]] = []
        """``(work_order, item, qty)`` of every cycle a client acknowledged in time, in order."""

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``opc.tcp://host:port`` (the port is known once ``start()`` ran when it was 0)."""
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Start listening: a fresh address space with initial values, on the same port as before."""
        if self._server is not None:
            return
        _quiet_asyncua()
        if self.port == 0:
            self.port = _free_port(self.host)
        server = Server(user_manager=_Users(self._users) if self._users is not None else None)
        await server.init()
        # The clock task updates ServerStatus.CurrentTime every second and makes stop()
        # wait up to a second for it; a simulator does not need it.
        server.disable_clock()
        server.set_endpoint(self.endpoint)
        server.set_server_name("plantgate press simulator")
        await server.set_application_uri(APPLICATION_URI)
        if self._certificate is not None and self._private_key is not None:
            cert, cert_format = _cert_source(self._certificate)
            await server.load_certificate(cert, cert_format)
            key, key_format = _cert_source(self._private_key)
            await server.load_private_key(key, None, key_format)
            server.set_security_policy(self._policies or list(ua.SecurityPolicyType))
        else:
            server.set_security_policy(self._policies or [ua.SecurityPolicyType.NoSecurity])
        if self._users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        idx = await server.register_namespace(NAMESPACE_URI)
        if idx != 2:  # the contract (and the example config) say ns=2
            raise RuntimeError(f"simulator namespace got index {idx}, expected 2")
        press = await server.nodes.objects.add_object(_node(PRESS), ua.QualifiedName(PRESS, idx))
        for name, (vtype, initial, writable) in _VARIABLES.items():
            node = await press.add_variable(
                _node(f"{PRESS}.{name}"), ua.QualifiedName(name, idx), initial, varianttype=vtype
            )
            if writable:
                await node.set_writable()
        for name, (extra_vtype, value) in self._extra.items():
            await press.add_variable(
                _node(f"{PRESS}.{name}"), ua.QualifiedName(name, idx), value, varianttype=extra_vtype
            )
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_client_write)
        await server.start()
        self._server = server
        logger.debug("Press simulator started", extra={"endpoint": self.endpoint})

    async def stop(self) -> None:
        """Stop listening and drop every client connection (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop()
        logger.debug("Press simulator stopped", extra={"endpoint": self.endpoint})

    def freeze(self) -> None:
        """Stop answering on every open connection without closing it (a hung PLC, a pulled cable).

        New connections are still accepted and served; ``stop()`` ends the frozen ones.
        """
        for transport in self._require().iserver.asyncio_transports:
            transport.pause_reading()

    async def __aenter__(self) -> PressSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- values ------------------------------------------------------------------------------

    @staticmethod
    def node_id(name: str) -> str:
        """The node id string of a press variable: ``"Temperature"`` -> ``"ns=2;s=Press7.Temperature"``."""
        return f"ns=2;s={PRESS}.{name}"

    def value(self, name: str) -> Any:
        """The current value of a press variable, read inside the server."""
        dv = self._require().read_attribute_value(_node(f"{PRESS}.{name}"))
        return dv.Value.Value if dv.Value is not None else None

    async def write(
        self, name: str, value: Any, *, status: int = ua.StatusCodes.Good, source_time: datetime | None = None
    ) -> None:
        """Set a press variable as the PLC would: with a source timestamp (default now) and a status.

        A Bad status writes no value (``status=ua.StatusCodes.BadSensorFailure``, say).
        """
        server = self._require()
        nodeid = _node(f"{PRESS}.{name}")
        vtype = _VARIABLES[name][0] if name in _VARIABLES else self._extra.get(name, (None, None))[0]
        if vtype is None:
            current = server.read_attribute_value(nodeid)
            vtype = current.Value.VariantType if current.Value is not None else None
        now = ua.DateTime.now(UTC)
        stamp = now if source_time is None else ua.DateTime.fromisoformat(source_time.isoformat())
        if status >> 30 >= 2:  # a Bad status carries no value
            variant = ua.Variant(None)
        else:
            variant = ua.Variant(value, vtype) if vtype is not None else ua.Variant(value)
        await server.write_attribute_value(
            nodeid,
            ua.DataValue(
                variant, StatusCode=ua.StatusCode(ua.UInt32(status)), SourceTimestamp=stamp, ServerTimestamp=now
            ),
        )

    async def add_variable(self, name: str, value: Any, varianttype: ua.VariantType | None = None) -> str:
        """Add ``Press7.<name>`` (kept across restarts); returns its node id string."""
        self._extra[name] = (varianttype, value)
        server = self._require()
        press = server.get_node(_node(PRESS))
        await press.add_variable(_node(f"{PRESS}.{name}"), ua.QualifiedName(name, 2), value, varianttype)
        return self.node_id(name)

    async def set_writable(self, name: str, writable: bool = True) -> None:
        """Let clients write ``Press7.<name>``, or refuse their writes (BadNotWritable) as a locked PLC does."""
        node = self._require().get_node(_node(f"{PRESS}.{name}"))
        if writable:
            await node.set_writable()
        else:
            await node.set_read_only()

    async def set_temperature(self, value: float) -> None:
        await self.write("Temperature", float(value))

    async def set_state(self, state: int) -> None:
        await self.write("State", int(state))

    async def complete_cycle(
        self, work_order: str, item: str, qty: float, *, wait_ack: float | None = None
    ) -> bool:
        """Finish a press cycle the way the PLC program does.

        Writes work order, item and quantity, then ``CycleDone = true`` with a fresh
        source timestamp. With ``wait_ack`` it waits up to that many seconds for a
        client to write ``CycleAck = true`` and returns whether one did. Then it resets
        ``CycleAck`` and ``CycleDone`` for the next cycle.
        """
        await self.write("WorkOrder", work_order)
        await self.write("Item", item)
        await self.write("BatchQty", float(qty))
        self._ack.clear()
        await self.write("CycleDone", True)
        acked = False
        if wait_ack:
            try:
                await asyncio.wait_for(self._ack.wait(), wait_ack)
                acked = True
            except TimeoutError:
                acked = False
        if acked:
            self.acknowledged.append((work_order, item, float(qty)))
        if self._server is None:  # stopped while waiting: nothing left to reset
            return acked
        await self.write("CycleAck", False)
        await self.write("CycleDone", False)
        return acked

    async def _on_client_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        # Event-driven handshake: a client's write of CycleAck=true wakes complete_cycle.
        if not event.is_external:
            return
        ack_node = _node(f"{PRESS}.CycleAck")
        for write, result in zip(event.request_params.NodesToWrite, event.response_params or (), strict=False):
            if write.NodeId == ack_node and result.is_good() and write.Value.Value.Value is True:
                self._ack.set()

    def _require(self) -> Server:
        if self._server is None:
            raise RuntimeError("the press simulator is not running")
        return self._server

    # --- demo --------------------------------------------------------------------------------

    async def run_demo(self, stop: asyncio.Event) -> None:
        """Animate the press until ``stop`` is set (for ``plantgate demo``).

        Temperature drifts a few times a second; the press runs, now and then stops or
        faults for a moment; while running it completes a cycle about every two seconds
        (work orders ``WO-4711``, ``WO-4712``, ..., mostly item ``FILL-500``, now and then
        the obsolete ``P-100-OLD`` so the demo shows a dead letter) and waits briefly for
        the agent's ``CycleAck``.
        """
        await self.start()
        rng = random.Random()
        await self.set_state(RUNNING)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._demo_process(stop, rng), name="press-process")
            tasks.create_task(self._demo_cycles(stop, rng), name="press-cycles")

    async def _demo_process(self, stop: asyncio.Event, rng: random.Random) -> None:
        temperature = 180.0
        next_state_change = rng.uniform(8, 15)
        elapsed = 0.0
        tick = 0.25
        while not await _stopped(stop, tick):
            elapsed += tick
            temperature += rng.gauss(0, 0.6) + (185.0 - temperature) * 0.05
            await self.set_temperature(round(temperature, 2))
            if elapsed >= next_state_change:
                elapsed = 0.0
                if self.value("State") == RUNNING:
                    await self.set_state(FAULT if rng.random() < 0.3 else STOPPED)
                    next_state_change = rng.uniform(2, 4)
                else:
                    await self.set_state(RUNNING)
                    next_state_change = rng.uniform(8, 15)

    async def _demo_cycles(self, stop: asyncio.Event, rng: random.Random) -> None:
        orders = (f"WO-{n}" for n in itertools.count(4711))
        work_order = next(orders)
        cycles = 0
        while not await _stopped(stop, rng.uniform(1.6, 2.4)):
            if self.value("State") != RUNNING:
                continue
            cycles += 1
            if cycles % 5 == 0:
                work_order = next(orders)
            item = "P-100-OLD" if cycles % 11 == 0 else "FILL-500"
            await self.complete_cycle(work_order, item, rng.choice((12, 12, 12, 10, 6)), wait_ack=1.0)


def _node(identifier: str) -> ua.NodeId:
    return ua.NodeId.from_string(f"ns=2;s={identifier}")


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    """Wait ``delay`` seconds, or less when ``stop`` is set; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return False
    return True


def _cert_source(source: Path | bytes) -> tuple[Path | bytes, str]:
    # asyncua tells PEM from DER by the file extension only; look at the content instead.
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return data, ("pem" if data.lstrip().startswith(b"-----BEGIN") else "der")
