"""The Modbus pre-flight: reach the device, then read every tag's register(s) once.

One finding for the connection, one per tag: its decoded value (after word order
and scale), or the exception code the device answered (``exception 2 (illegal data
address)``: the register does not exist there), or no answer from that unit id.
Nothing is written; an ``ack`` tag's table was already checked to be writable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.config_types import BuildContext
from agent.preflight import Finding, describe_error, error, ok
from protocols.modbus.registers import BIT_TABLES, decode

if TYPE_CHECKING:
    from protocols.modbus import ModbusSourceConfig, ModbusTagConfig
    from protocols.modbus.source import ModbusClient


async def preflight(config: ModbusSourceConfig, context: BuildContext, ack_tags: frozenset[str]) -> list[Finding]:
    """Read each tag once over a line of its own (the running agent's line is not touched)."""
    from pymodbus.exceptions import ModbusException
    from pymodbus.pdu import ModbusPDU

    from protocols.modbus.source import ModbusLine, exception_text

    endpoint = config.parsed_endpoint
    line = ModbusLine(endpoint, timeout=config.timeout, retries=config.retries)
    line.attach()
    findings: list[Finding] = []
    try:
        for tag in config.tags:
            unit = tag.unit if tag.unit is not None else config.unit
            subject = f"tag {tag.tag} ({tag.register_text} unit {unit})"

            async def read(client: ModbusClient, tag: ModbusTagConfig = tag, unit: int = unit) -> ModbusPDU:
                return await _read(client, tag, unit)

            try:
                response = await line.execute(read)
            except ConnectionError as exc:
                return [error(f"cannot connect to {endpoint}: {describe_error(exc)}")]
            except (ModbusException, TimeoutError) as exc:
                findings.append(error(f"no valid answer from unit {unit} ({describe_error(exc)})", subject))
                continue
            if response.isError():
                hint = " (no such register on this device?)" if response.exception_code == 2 else ""
                findings.append(error(f"the device answered {exception_text(response.exception_code)}{hint}", subject))
                continue
            findings.append(ok(_shown(tag, response), subject))
    finally:
        line.detach()
    return [ok(f"connected to {endpoint}"), *findings]


async def _read(client: ModbusClient, tag: ModbusTagConfig, unit: int) -> Any:
    table, address = tag.location
    count = 1 if table in BIT_TABLES else tag.value_type.registers
    if table == "holding":
        return await client.read_holding_registers(address, count=count, device_id=unit)
    if table == "input":
        return await client.read_input_registers(address, count=count, device_id=unit)
    if table == "coil":
        return await client.read_coils(address, count=count, device_id=unit)
    return await client.read_discrete_inputs(address, count=count, device_id=unit)


def _shown(tag: ModbusTagConfig, response: Any) -> str:
    """``uint32 = 1234`` (scaled), and whether the agent may write it."""
    vtype = tag.value_type
    if tag.location[0] in BIT_TABLES:
        value: Any = bool(response.bits[0])
    else:
        value = decode(response.registers, vtype, byte_order=tag.byte_order, word_order=tag.word_order)
        if not isinstance(value, bool | str) and (tag.scale != 1.0 or tag.offset != 0.0):
            value = value * tag.scale + tag.offset
    access = "read/write" if tag.writable else "read"
    return f"{vtype.name} = {value!r}, {access}"
