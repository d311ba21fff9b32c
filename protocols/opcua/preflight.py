"""The OPC UA pre-flight: connect as the source would, then check every tag's node once.

For each tag: the node exists (its namespace URI too, for ``nsu=`` ids), is a
Variable the agent may read, has a data type that fits the tag's ``kind``
(a counter needs an integer, a deadband or aggregate a number) and, for a tag a
rule writes as its ``ack``, is a Boolean the session may write (AccessLevel and
UserAccessLevel both with CurrentWrite). Nothing is written.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from agent.browse import access_text, data_type_names
from agent.config_types import BuildContext
from agent.preflight import Finding, describe_error, error, ok, warning

if TYPE_CHECKING:
    from asyncua import Client, ua

    from protocols.opcua import OpcUaSourceConfig, OpcUaTagConfig

_READ = 1 << 0  # AccessLevel bit 0: CurrentRead
_WRITE = 1 << 1  # AccessLevel bit 1: CurrentWrite

# Built-in data types (namespace 0 ids) by what the agent can do with them.
_INTEGERS = frozenset({2, 3, 4, 5, 6, 7, 8, 9, 27, 28})  # SByte..UInt64, Integer, UInteger
_NUMBERS = _INTEGERS | {10, 11, 26, 50}  # Float, Double, Number, Decimal
_BOOLEAN = 1
_STRING = 12
_ENUMERATION = 29


async def preflight(config: OpcUaSourceConfig, context: BuildContext, ack_tags: frozenset[str]) -> list[Finding]:
    """Connect with the configured security and identity; one finding for the session, one per tag."""
    from asyncua import ua

    from protocols.opcua.source import parse_node_id  # loads asyncua

    try:
        client = await configured_client(config, context)
        async with asyncio.timeout(config.timeout + 2):
            await client.connect()
    except Exception as exc:
        return [error(f"cannot open a session on {config.endpoint}: {_describe(exc)}")]
    findings = [
        ok(f"session open on {config.endpoint} (security {config.security_policy}/{config.security_mode}, "
           f"{'user ' + config.username if config.username else 'anonymous'})")
    ]
    try:
        namespaces = await client.get_namespace_array()
        resolved: list[ua.NodeId | None] = []
        for tag in config.tags:
            node_id = parse_node_id(tag.node)
            if isinstance(node_id, ua.ExpandedNodeId) and node_id.NamespaceUri:
                if node_id.NamespaceUri not in namespaces:
                    resolved.append(None)
                    continue
                index = ua.Int16(namespaces.index(node_id.NamespaceUri))
                node_id = ua.NodeId(node_id.Identifier, index, node_id.NodeIdType)
            resolved.append(node_id)
        known = [node_id for node_id in resolved if node_id is not None]
        nodes = [client.get_node(node_id) for node_id in known]
        classes = await client.read_attributes(nodes, ua.AttributeIds.NodeClass)
        types = await client.read_attributes(nodes, ua.AttributeIds.DataType)
        access = await client.read_attributes(nodes, ua.AttributeIds.AccessLevel)
        user = await client.read_attributes(nodes, ua.AttributeIds.UserAccessLevel)
        names = await data_type_names(client, [_value(v) for v in types])
        answers = iter(zip(classes, types, access, user, strict=True))
        for tag, found in zip(config.tags, resolved, strict=True):
            subject = f"tag {tag.tag} ({tag.node})"
            if found is None:
                findings.append(error("the server has no such namespace URI (nsu=)", subject))
                continue
            answer = next(answers)
            findings.append(_check_tag(tag, tag.tag in ack_tags, *answer, names=names, subject=subject))
    finally:
        try:
            async with asyncio.timeout(config.timeout):
                await client.disconnect()
        except Exception:  # the checks are done; a failed goodbye changes nothing
            pass
    return findings


async def configured_client(config: OpcUaSourceConfig, context: BuildContext) -> Client:
    """An unconnected asyncua client with the source's settings: identity, application URI, security.

    Reads the password and certificate files (``ValueError`` naming the key when one cannot be read).
    """
    return await config.build(context).configured_client()


def _check_tag(
    tag: OpcUaTagConfig,
    is_ack: bool,
    node_class: ua.DataValue,
    type_value: ua.DataValue,
    level_value: ua.DataValue,
    user_value: ua.DataValue,
    *,
    names: dict[str, str],
    subject: str,
) -> Finding:
    from asyncua import ua

    status = node_class.StatusCode
    if status is not None and not status.is_good():
        return error(f"the server does not know this node ({status.name})", subject)
    if _value(node_class) != ua.NodeClass.Variable:
        kind = ua.NodeClass(_value(node_class)).name if _value(node_class) is not None else "unknown"
        return error(f"the node is an {kind}, not a Variable; pick one of its variables (plantgate browse)", subject)
    type_id = _value(type_value)
    type_name = names.get(type_id.to_string(), "?") if type_id is not None else "?"
    level = _value(level_value) or 0
    user_level = _value(user_value)
    user_level = level if user_level is None else user_level
    shown = f"{type_name}, {access_text(level)}"
    if not level & _READ or not user_level & _READ:
        return error(f"{shown}: the agent's session may not read it", subject)
    builtin = type_id.Identifier if type_id is not None and type_id.NamespaceIndex == 0 else None
    if is_ack:
        if builtin != _BOOLEAN and builtin not in _INTEGERS:
            return error(f"{shown}: an ack tag is written true, so it must be Boolean, not {type_name}", subject)
        if not level & _WRITE:
            return error(f"{shown}: an ack tag must be writable; the server marks it read-only", subject)
        if not user_level & _WRITE:
            return error(f"{shown}: an ack tag must be writable; this session's user may not write it", subject)
        if builtin != _BOOLEAN:
            return warning(f"{shown}: an ack tag is written true, which this {type_name} node stores as 1", subject)
    if tag.kind == "counter" and builtin not in _INTEGERS:
        return error(f"{shown}: a counter needs an integer data type, not {type_name}", subject)
    numeric_only = tag.kind == "telemetry" and (tag.deadband is not None or tag.aggregate is not None)
    if numeric_only and builtin not in _NUMBERS:
        return error(f"{shown}: deadband and aggregate need a number, not {type_name}", subject)
    if tag.kind == "state" and builtin not in (_INTEGERS | {_BOOLEAN, _STRING, _ENUMERATION}) and builtin is not None:
        return warning(f"{shown}: a state is usually an integer, Boolean, enumeration or string", subject)
    return ok(shown, subject)


def _value(data_value: ua.DataValue) -> Any:
    status = data_value.StatusCode
    if status is not None and not status.is_good():
        return None
    return data_value.Value.Value if data_value.Value is not None else None


def _describe(exc: BaseException) -> str:
    from asyncua import ua

    if isinstance(exc, ua.UaStatusCodeError):
        return ua.StatusCode(exc.code).name
    return describe_error(exc)
