"""OPC UA: the ``[[sources.opcua]]`` config model.

The source itself lives in ``protocols.opcua.source`` and the fast publish-response
decoder in ``protocols.opcua.publish``; both import asyncua, which is loaded only
when ``OpcUaSourceConfig.build`` is called, so a site without OPC UA never loads it
(nor cryptography).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.config_types import BuildContext, Duration, TagConfig, mask_secret
from agent.source import SourceConfig

if TYPE_CHECKING:
    from agent.preflight import Finding
    from protocols.opcua.source import OpcUaSource

__all__ = ["OpcUaSourceConfig", "OpcUaTagConfig", "node_key"]

SecurityPolicyName = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
SecurityModeName = Literal["None", "Sign", "SignAndEncrypt"]

# OPC UA Part 6, 5.3.1.10: [svr=<index>;][ns=<index>|nsu=<uri>;]<type>=<identifier>
_NODE_ID = re.compile(
    r"^(?:svr=(?P<svr>\d+);)?(?:ns=(?P<ns>\d+);|nsu=(?P<nsu>[^;]+);)?(?P<type>[isgb])=(?P<id>.*)$", re.S
)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def node_key(text: str) -> tuple[str, str, str]:
    """A node id string checked without asyncua, as a key that is equal for two spellings of one node.

    ``ns=2;s=Press7.Temperature``, ``i=2258`` (namespace 0), ``nsu=<uri>;s=X``, ``ns=3;g=<guid>``,
    ``ns=3;b=<base64>``. Raises ValueError with a hint for anything else.
    """
    value = text.strip()
    hint = "write it as \"ns=2;s=Name\", \"ns=3;i=1001\" or \"nsu=<uri>;s=Name\""
    match = _NODE_ID.match(value)
    if match is None:
        raise ValueError(f"{text!r} is not an OPC UA node id; {hint}")
    if match["svr"] is not None and int(match["svr"]):
        raise ValueError(f"{text!r} points to another server (svr=); only local node ids are supported")
    kind, identifier = match["type"], match["id"]
    if identifier == "":
        raise ValueError(f"{text!r} has an empty identifier")
    namespace = match["nsu"] if match["nsu"] is not None else str(int(match["ns"] or 0))
    if match["ns"] is not None and int(match["ns"]) > 0xFFFF:
        raise ValueError(f"{text!r} is not an OPC UA node id: namespace index above 65535; {hint}")
    if kind == "i":
        if not identifier.isdigit() or int(identifier) > 0xFFFFFFFF:
            raise ValueError(f"{text!r} is not an OPC UA node id: i= takes an integer up to 4294967295; {hint}")
        identifier = str(int(identifier))
    elif kind == "g":
        if not _GUID.match(identifier):
            raise ValueError(f"{text!r} is not an OPC UA node id: g= takes a GUID; {hint}")
        identifier = identifier.lower()
    elif kind == "b" and not _BASE64.match(identifier):
        raise ValueError(f"{text!r} is not an OPC UA node id: b= takes base64; {hint}")
    return namespace, kind, identifier


def _certificate_files(directory: Path) -> int:
    """Certificate files in a trust-list folder (counted by name: no cryptography loaded for check)."""
    try:
        return sum(1 for p in directory.iterdir() if p.suffix.lower() in (".der", ".pem", ".crt", ".cer"))
    except OSError:
        return 0


class OpcUaTagConfig(TagConfig):
    """One OPC UA variable read by subscription: the common tag settings plus its ``node``."""

    node: str = Field(
        ...,
        description="Node id of the variable, e.g. \"ns=2;s=Press7.Temperature\", \"ns=3;i=1001\" "
        "or \"nsu=urn:vendor:plc;s=Press7.Temperature\" (namespace by URI, resolved at every connect)",
        examples=["ns=2;s=Press7.Temperature"],
    )

    @field_validator("node")
    @classmethod
    def _valid_node(cls, value: str) -> str:
        node_key(value)
        return value.strip()


class OpcUaSourceConfig(SourceConfig):
    """``[[sources.opcua]]``: one OPC UA server (typically one PLC) and the variables read from it."""

    name: str = Field(..., min_length=1, description="Name of this source, used in events, /status and metrics")
    endpoint: str = Field(
        ...,
        description="Server endpoint URL, opc.tcp://host:port[/path]",
        examples=["opc.tcp://10.1.3.7:4840"],
    )
    security_policy: SecurityPolicyName = Field(
        "None", description="None | Basic256Sha256 | Aes128_Sha256_RsaOaep | Aes256_Sha256_RsaPss"
    )
    security_mode: SecurityModeName = Field(
        "None", description="None | Sign | SignAndEncrypt; None exactly when security_policy is None"
    )
    certificate: Path | None = Field(
        None,
        description="The agent's application instance certificate (DER or PEM) for a secure policy; "
        "its URI subject alternative name becomes the client's application URI. Without it (and "
        "private_key) one is generated on first start: pki/own/plantgate.der, URI urn:plantgate:<agent id>",
    )
    private_key: Path | None = Field(None, description="Private key (DER or PEM, unencrypted) of `certificate`")
    server_certificate: Path | None = Field(
        None,
        description="The server's certificate (DER or PEM) to pin; without it the certificate the server "
        "offers in its endpoint list is checked against trust_dir",
    )
    trust_dir: Path = Field(
        Path("pki/trusted"),
        description="Folder of trusted server certificates (DER or PEM), or of the CAs that issued them, read "
        "at every connect; when it holds any, a server certificate not among them is refused (its thumbprint "
        "named, the certificate saved to pki/untrusted/); when empty, the server's certificate is accepted unverified",
    )
    username: str | None = Field(None, min_length=1, description="User name for a username/password identity")
    password_file: Path | None = Field(None, description="File holding the password (e.g. a systemd credential)")
    password: SecretStr | None = Field(
        None, description="The password, from the environment; password_file wins when both are set"
    )
    publishing_interval: Duration = Field(
        0.1, gt=0, description="How often the server sends the changes it collected (one batch per publish)"
    )
    sampling_interval: Duration = Field(
        0.0, description="How often the server samples each variable; 0 = at the publishing interval"
    )
    queue_size: int = Field(
        100,
        ge=1,
        description="Values the server keeps per variable between two publishes (oldest dropped first, "
        "logged) so fast changes and short back-pressure lose nothing",
    )
    timeout: Duration = Field(4.0, gt=0, description="Timeout of each request to the server")
    watchdog_interval: Duration = Field(
        1.0,
        gt=0,
        description="How often the connection is probed; a server that stops answering is detected "
        "within about twice this (a closed connection at once)",
    )
    reconnect_max_backoff: Duration = Field(
        3.0,
        gt=0,
        description="Longest wait between reconnect attempts (exponential backoff with jitter), so a server "
        "that comes back is found within a few seconds",
    )
    subscription_lifetime: Duration = Field(
        300.0,
        gt=0,
        description="How long the server keeps the subscription, with the values the agent has not "
        "acknowledged, after the agent went away; a reconnect or restart within this takes them over",
    )
    fast_decoder: bool = Field(
        True,
        description="Decode publish responses with plantgate's fast decoder (checked against asyncua's at "
        "every connect, asyncua's decoder used when the check fails); false: always asyncua's",
    )
    bad_node_retry: Duration = Field(
        30.0,
        gt=0,
        description="How often a node the server refused (unknown node id, bad status) is tried again; "
        "the other tags keep flowing meanwhile",
    )
    tags: list[OpcUaTagConfig] = Field(..., min_length=1, description="The variables to subscribe to")

    @field_validator("endpoint")
    @classmethod
    def _valid_endpoint(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme != "opc.tcp":
            raise ValueError(f"{value!r} is not an OPC UA endpoint; write it as opc.tcp://host:port")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put credentials in username and password_file, not in the endpoint URL")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host; write it as opc.tcp://host:port")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r} has an invalid port") from exc
        if port is None:
            raise ValueError(f"{value!r} has no port; write it as opc.tcp://{parts.hostname}:4840")
        return value

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: list[OpcUaTagConfig]) -> list[OpcUaTagConfig]:
        names: set[str] = set()
        nodes: dict[tuple[str, str, str], str] = {}
        for tag in tags:
            if tag.tag in names:
                raise ValueError(f"tag {tag.tag!r} appears twice")
            names.add(tag.tag)
            key = node_key(tag.node)
            if key in nodes:
                raise ValueError(f"node {tag.node!r} is used by both {nodes[key]!r} and {tag.tag!r}")
            nodes[key] = tag.tag
        return tags

    @model_validator(mode="after")
    def _security(self) -> OpcUaSourceConfig:
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError(
                f"security_policy {self.security_policy!r} does not go with security_mode {self.security_mode!r}: "
                "use None for both, or a policy with Sign or SignAndEncrypt"
            )
        if self.security_policy != "None" and (self.certificate is None) != (self.private_key is None):
            raise ValueError(
                "certificate and private_key go together; leave both out to use the certificate generated "
                "under the data dir (pki/own/plantgate.der)"
            )
        if self.security_policy == "None":
            unused = [
                key for key in ("certificate", "private_key", "server_certificate") if getattr(self, key) is not None
            ]
            if unused:
                raise ValueError(f"{', '.join(unused)} apply only with a security_policy other than None")
        if (self.password_file is not None or self.password is not None) and self.username is None:
            raise ValueError("password_file/password need a username")
        if self.username is not None and self.password_file is None and self.password is None:
            raise ValueError("username needs password_file (or a password from the environment)")
        return self

    def tag_configs(self) -> Sequence[TagConfig]:
        """The variables this server is read for."""
        return self.tags

    def describe(self, context: BuildContext) -> list[str]:
        """One line for the server, one per tag; the password masked."""
        secure = f"{self.security_policy}/{self.security_mode}"
        user = ""
        if self.username:
            user = f" user={self.username} password={mask_secret(self.password, self.password_file)}"
        lines = [f"{self.name} {self.endpoint} security={secure}{user} tags={len(self.tags)}"]
        if self.security_policy != "None":
            lines.extend(self._describe_pki(context))
        for tag in self.tags:
            extra = []
            if tag.deadband is not None:
                extra.append(f"deadband={tag.deadband:g}")
            if tag.aggregate is not None:
                extra.append(f"aggregate={tag.aggregate:g}s")
            if tag.states:
                extra.append(f"states={len(tag.states)}")
            if tag.forward:
                extra.append("forward")
            lines.append(f"  tag    {tag.tag} <- {tag.node} kind={tag.kind} {' '.join(extra)}".rstrip())
        return lines

    def _describe_pki(self, context: BuildContext) -> list[str]:
        """The agent's certificate and the trust list (counted without loading cryptography)."""
        if self.certificate is not None:
            own = str(context.resolve(self.certificate))
        else:
            generated = context.resolve(Path("pki/own/plantgate.der"))
            own = str(generated) if generated.exists() else f"{generated} (generated on first start)"
        lines = [f"  cert   {own}"]
        if self.server_certificate is not None:
            lines.append(f"  trust  pinned: {context.resolve(self.server_certificate)}")
            return lines
        trust = context.resolve(self.trust_dir)
        count = _certificate_files(trust)
        state = f"{count} certificate{'s' if count != 1 else ''}" if count else "empty: any server certificate accepted"
        lines.append(f"  trust  {trust} ({state})")
        return lines

    def warnings_at(self, context: BuildContext) -> list[str]:
        """A secure policy whose trust list is empty: the server's certificate is accepted unverified."""
        if self.security_policy == "None" or self.server_certificate is not None:
            return []
        trust = context.resolve(self.trust_dir)
        if _certificate_files(trust):
            return []
        return [
            f"sources.opcua.{self.name}: the trust list {trust} is empty: any server certificate is accepted "
            f"unverified; after the first connect move the one saved in "
            f"{context.resolve(Path('pki/untrusted'))} into it"
        ]

    def warnings(self) -> list[str]:
        """A password over an unsigned session."""
        if self.username and self.security_mode == "None":
            return [f"sources.opcua.{self.name}: password sent with security_mode None; prefer Sign or SignAndEncrypt"]
        return []

    def build(self, context: BuildContext) -> OpcUaSource:
        """The source this config describes (relative paths resolve against the data dir).

        asyncua and cryptography are imported here, not when the config is read.
        """
        from protocols.opcua.source import OpcUaSource

        return OpcUaSource(self, data_dir=context.data_dir, agent_id=context.agent_id)

    async def preflight(self, context: BuildContext, *, ack_tags: frozenset[str] = frozenset()) -> list[Finding]:
        """Open a session as the source would; check each tag's node (exists, type, writable when an ack)."""
        from protocols.opcua.preflight import preflight

        return await preflight(self, context, ack_tags)
