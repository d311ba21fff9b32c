"""The MQTT pre-flight: connect with the configured TLS and credentials, wait for the CONNACK.

The check uses its own client id (``<client_id>-check``): connecting with the agent's
own id would take over the running agent's session. It publishes nothing (no
``online`` status) and disconnects cleanly.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any

from agent.config_types import BuildContext, read_secret
from agent.preflight import Finding, describe_error, error, ok

if TYPE_CHECKING:
    from protocols.mqtt import MqttSinkConfig


async def preflight(config: MqttSinkConfig, context: BuildContext) -> list[Finding]:
    """One finding: the broker accepted the connection, or why not (refused, TLS, unreachable)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    password = read_secret(
        context.resolve(config.password_file) if config.password_file is not None else None,
        config.password.get_secret_value() if config.password is not None else None,
        key="password",
    )
    client_id = f"{config.client_id or 'plantgate-' + context.agent_id}-check"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.connect_timeout = config.connect_timeout
    if config.username is not None:
        client.username_pw_set(config.username, password)
    if config.tls:
        try:
            tls = ssl.create_default_context(cafile=str(context.resolve(config.ca_file)) if config.ca_file else None)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            if config.cert_file is not None:
                key = str(context.resolve(config.key_file)) if config.key_file else None
                tls.load_cert_chain(str(context.resolve(config.cert_file)), key)
        except (OSError, ssl.SSLError) as exc:
            return [error(f"cannot load the TLS files: {describe_error(exc)}")]
        client.tls_set_context(tls)
    loop = asyncio.get_running_loop()
    connack: asyncio.Future[Any] = loop.create_future()

    def on_connect(_client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not connack.done():
            connack.set_result(reason)

    client.on_connect = on_connect
    where = f"{config.url}" + (f" as {config.username}" if config.username else "")
    try:
        # paho's connect (TCP and the TLS handshake) blocks; the sink runs it off the loop too.
        await asyncio.to_thread(client.connect, config.host, config.port, max(1, round(config.keepalive)))
    except (OSError, ValueError) as exc:
        return [error(f"cannot connect to {where}: {_tls_aware(exc)}")]
    sock = client.socket()
    if not isinstance(sock, socket.socket):
        return [error(f"cannot connect to {where}: no socket")]
    fd = sock.fileno()
    loop.add_reader(fd, client.loop_read)
    if client.want_write():
        loop.add_writer(fd, client.loop_write)
    try:
        done, _ = await asyncio.wait([connack], timeout=config.connect_timeout)
        if not done:
            return [error(f"{where}: no CONNACK within {config.connect_timeout:g} s")]
        reason = connack.result()
        if reason.is_failure:
            return [error(f"{where}: the broker refused the connection: {reason}")]
        return [ok(f"{where}: connected, CONNACK accepted (client id {client_id})")]
    finally:
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        client.disconnect()
        sock.close()


def _tls_aware(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return describe_error(exc)
