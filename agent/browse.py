"""``plantgate browse opc.tcp://...``: an OPC UA server's address space as a tree, to find node ids.

Each variable shows its node id as the config writes it (``node = "..."``), its data
type and its access level (``read``, ``read/write``), so a site engineer can copy
tags into ``[[sources.opcua.tags]]`` and see at once which can be an ``ack``. The
standard namespace-0 nodes (the Server object and its diagnostics) are left out
below the start node. Browsing is bounded by depth and node count and only reads.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

if TYPE_CHECKING:
    from asyncua import Client, ua

_READ = 1 << 0  # AccessLevel bit 0: CurrentRead
_WRITE = 1 << 1  # AccessLevel bit 1: CurrentWrite
_BATCH = 500  # attributes per Read request (servers limit MaxNodesPerRead, often 1000)


class BrowseError(Exception):
    """The server could not be reached or browsed: the message says why, in one line."""


class BrowseNode(msgspec.Struct, omit_defaults=True):
    """One node of the tree; ``data_type`` and the access levels only for variables."""

    node_id: str
    browse_name: str
    node_class: str
    display_name: str = ""
    data_type: str | None = None
    access: str | None = None
    user_access: str | None = None
    children: list[BrowseNode] = msgspec.field(default_factory=list)


class BrowseTree(msgspec.Struct):
    """What ``browse`` found: the endpoint, the server's namespaces (index = list position) and the tree."""

    endpoint: str
    namespaces: list[str]
    root: BrowseNode
    truncated: bool = False
    """True when ``max_nodes`` stopped the walk before the whole tree was seen."""


def access_text(level: int | None) -> str | None:
    """An AccessLevel byte as ``read``, ``read/write``, ``write`` or ``none``."""
    if level is None:
        return None
    readable, writable = bool(level & _READ), bool(level & _WRITE)
    if readable and writable:
        return "read/write"
    return "read" if readable else ("write" if writable else "none")


async def browse(
    endpoint: str,
    *,
    start: str = "i=85",
    depth: int = 8,
    max_nodes: int = 5000,
    username: str | None = None,
    password: str | None = None,
    request_timeout: float = 10.0,
    client: Client | None = None,
) -> BrowseTree:
    """Connect to ``endpoint`` (security None, or ``client`` made for it), walk from ``start``, return the tree.

    ``client``: an unconnected client set up by the caller (a configured source's
    security and identity). Raises ``ValueError`` for an endpoint or start node that is
    not well formed and ``BrowseError`` when the server cannot be reached, refuses the
    session or does not know ``start``.
    """
    from asyncua import Client, ua

    from protocols.opcua import node_key

    node_key(start)  # ValueError with the config's hint
    parts = urlsplit(endpoint)
    if parts.scheme != "opc.tcp" or not parts.hostname:
        raise ValueError(f"{endpoint!r} is not an OPC UA endpoint; write it as opc.tcp://host:port")
    if client is None:
        client = Client(endpoint, timeout=request_timeout)
        client.name = "plantgate browse"
        client.application_uri = "urn:plantgate:browse"
        if username is not None:
            client.set_user(username)
            if password is not None:
                client.set_password(password)
    try:
        async with asyncio.timeout(request_timeout + 5):
            await client.connect()
    except Exception as exc:
        raise BrowseError(f"cannot connect to {endpoint}: {_describe(exc)}") from exc
    try:
        namespaces = await client.get_namespace_array()
        start_id = ua.NodeId.from_string(start)
        if isinstance(start_id, ua.ExpandedNodeId) and start_id.NamespaceUri:
            if start_id.NamespaceUri not in namespaces:
                raise BrowseError(f"the server has no namespace {start_id.NamespaceUri!r}")
            index = ua.Int16(namespaces.index(start_id.NamespaceUri))
            start_id = ua.NodeId(start_id.Identifier, index, start_id.NodeIdType)
        walker = _Walker(client, max_nodes)
        root = await walker.root(start_id)
        await walker.walk(root, start_id, depth)
        await walker.fill_variables()
        return BrowseTree(endpoint=endpoint, namespaces=list(namespaces), root=root, truncated=walker.truncated)
    except BrowseError:
        raise
    except Exception as exc:
        raise BrowseError(f"browsing {endpoint} failed: {_describe(exc)}") from exc
    finally:
        try:
            async with asyncio.timeout(request_timeout):
                await client.disconnect()
        except Exception:  # the tree is read; a failed goodbye changes nothing
            pass


class _Walker:
    """Depth-first walk over hierarchical references, variables' attributes read in batches afterwards."""

    def __init__(self, client: Client, max_nodes: int):
        self.client = client
        self.max_nodes = max_nodes
        self.seen: set[str] = set()
        self.variables: list[tuple[BrowseNode, ua.NodeId]] = []
        self.truncated = False

    async def root(self, node_id: ua.NodeId) -> BrowseNode:
        from asyncua import ua

        node = self.client.get_node(node_id)
        values = await node.read_attributes(
            [ua.AttributeIds.BrowseName, ua.AttributeIds.NodeClass, ua.AttributeIds.DisplayName]
        )
        status = values[0].StatusCode
        if status is not None and not status.is_good():
            raise BrowseError(f"the server does not know {node_id.to_string()} ({status.name})")
        browse_name = values[0].Value.Value if values[0].Value is not None else None
        node_class = values[1].Value.Value if values[1].Value is not None else 0
        display = values[2].Value.Value if values[2].Value is not None else None
        found = BrowseNode(
            node_id=node_id.to_string(),
            browse_name=browse_name.Name if browse_name is not None else node_id.to_string(),
            node_class=ua.NodeClass(node_class).name,
            display_name=(display.Text or "") if display is not None else "",
        )
        self.seen.add(found.node_id)
        if found.node_class == "Variable":
            self.variables.append((found, node_id))
        return found

    async def walk(self, parent: BrowseNode, parent_id: ua.NodeId, depth: int) -> None:
        from asyncua import ua

        if depth <= 0:
            return
        references = await self.client.get_node(parent_id).get_children_descriptions()
        objects = ua.NodeId(ua.Int32(ua.ObjectIds.ObjectsFolder))
        for ref in references:
            child_id = ua.NodeId(ref.NodeId.Identifier, ref.NodeId.NamespaceIndex, ref.NodeId.NodeIdType)
            if child_id.NamespaceIndex == 0 and parent_id == objects:
                continue  # the Server object and other standard nodes under Objects: not tags
            text = child_id.to_string()
            if text in self.seen:
                continue
            if len(self.seen) >= self.max_nodes:
                self.truncated = True
                return
            self.seen.add(text)
            child = BrowseNode(
                node_id=text,
                browse_name=ref.BrowseName.Name or text,
                node_class=ua.NodeClass(ref.NodeClass).name,
                display_name=ref.DisplayName.Text or "",
            )
            parent.children.append(child)
            if child.node_class == "Variable":
                self.variables.append((child, child_id))
            if child.node_class in ("Object", "Variable", "View"):
                await self.walk(child, child_id, depth - 1)

    async def fill_variables(self) -> None:
        from asyncua import ua

        for first in range(0, len(self.variables), _BATCH):
            batch = self.variables[first : first + _BATCH]
            nodes = [self.client.get_node(node_id) for _, node_id in batch]
            types = await self.client.read_attributes(nodes, ua.AttributeIds.DataType)
            access = await self.client.read_attributes(nodes, ua.AttributeIds.AccessLevel)
            user = await self.client.read_attributes(nodes, ua.AttributeIds.UserAccessLevel)
            names = await data_type_names(self.client, [_value(v) for v in types])
            for (node, _), type_id, level, user_level in zip(batch, types, access, user, strict=True):
                type_node = _value(type_id)
                node.data_type = names.get(type_node.to_string()) if type_node is not None else None
                node.access = access_text(_value(level))
                node.user_access = access_text(_value(user_level))


def _value(data_value: ua.DataValue) -> Any:
    status = data_value.StatusCode
    if status is not None and not status.is_good():
        return None
    return data_value.Value.Value if data_value.Value is not None else None


async def data_type_names(client: Client, type_ids: list[ua.NodeId | None]) -> dict[str, str]:
    """Data type node id -> its name: ``Double`` for the built-in types, the browse name for a vendor's type."""
    from asyncua import ua

    names: dict[str, str] = {}
    custom: dict[str, ua.NodeId] = {}
    for type_id in type_ids:
        if type_id is None:
            continue
        key = type_id.to_string()
        identifier = type_id.Identifier
        if type_id.NamespaceIndex == 0 and isinstance(identifier, int) and identifier in ua.ObjectIdNames:
            names[key] = ua.ObjectIdNames[identifier]
        else:
            custom[key] = type_id
    if custom:
        keys = list(custom)
        read = await client.read_attributes([client.get_node(custom[k]) for k in keys], ua.AttributeIds.BrowseName)
        for key, value in zip(keys, read, strict=True):
            name = _value(value)
            names[key] = name.Name if name is not None else key
    return names


def _describe(exc: BaseException) -> str:
    from asyncua import ua

    if isinstance(exc, ua.UaStatusCodeError):
        return f"{ua.StatusCode(exc.code).name}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def print_tree(tree: BrowseTree) -> None:
    """The tree as text: one node a line, indented; variables with node id, data type and access."""
    print(f"{tree.endpoint}")
    for index, uri in enumerate(tree.namespaces):
        print(f"  ns={index}  {uri}")
    print()

    def show(node: BrowseNode, indent: int) -> None:
        pad = "  " * indent
        if node.node_class == "Variable":
            access = node.access or "?"
            if node.user_access is not None and node.user_access != node.access:
                access += f" (this user: {node.user_access})"
            print(f"{pad}{node.browse_name}  {node.node_id}  {node.data_type or '?'}  {access}")
        else:
            print(f"{pad}{node.browse_name}  {node.node_id}  [{node.node_class}]")
        for child in node.children:
            show(child, indent + 1)

    show(tree.root, 0)
    if tree.truncated:
        print("(stopped at --max-nodes; browse from a deeper --node to see the rest)")
