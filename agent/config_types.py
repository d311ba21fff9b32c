"""Building blocks shared by every config model: strict models, durations, secrets.

Every protocol module defines its own config model from these, beside its code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema, model_validator

from agent.counters import CounterSpec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


_T = TypeVar("_T")


@dataclass
class BuildContext:
    """What a protocol's config needs to build its source or sink, shared by every instance.

    ``shared`` lets instances of one protocol share a resource: several Modbus
    units on one RS-485 line get the one worker that owns the port.
    """

    agent_id: str
    site: str
    version: str
    data_dir: Path
    ingest_token_file: Path | None = None
    """``[http].ingest_token_file`` (resolved): the bearer token sources serving HTTP (the MES webhook) require."""
    _shared: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: Hashable, create: Callable[[], _T]) -> _T:
        """The object registered under ``key``, created by ``create`` on first use."""
        if key not in self._shared:
            self._shared[key] = create()
        found: _T = self._shared[key]
        return found

    def resolve(self, path: Path) -> Path:
        """A configured path, relative ones against ``data_dir``."""
        return path if path.is_absolute() else self.data_dir / path


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def server_url(value: str, schemes: Sequence[str], *, credentials_hint: str = "") -> SplitResult:
    """A peer's url, checked: one of ``schemes``, a host, a valid non-zero port, no credentials in it.

    Raises ``ValueError`` saying what is wrong (the config models turn it into a one-line error).
    """
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        wanted = " or ".join(repr(scheme) for scheme in schemes)
        raise ValueError(f"scheme must be {wanted}, not {parts.scheme or 'missing'!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the url" + credentials_hint)
    if not parts.hostname:
        raise ValueError("the url has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    if port == 0:
        raise ValueError("port 0 is not a server port")
    return parts


def parse_duration(value: Any) -> float:
    """Turn ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"`` into seconds; a number without a unit is an error."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"500ms\", \"10s\" or \"5m\"")
    if isinstance(value, int | float):
        # A bare number is ambiguous: someone meaning 200 ms writes 200 and would get 200 s.
        raise ValueError(f"{value!r} has no unit; write the duration as \"{value:g}s\" or \"{value:g}ms\"")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration; write it as \"500ms\", \"10s\", \"5m\" or \"1h\"")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("expected a duration such as \"500ms\", \"10s\" or \"5m\"")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest config spelling of a duration, for summaries and the JSON Schema."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)$", "examples": ["500ms", "10s", "5m"]}),
]
"""A duration in seconds, written in the config as ``"500ms"``, ``"10s"``, ``"5m"``."""


def mask_secret(secret: Any, path: Path | None) -> str:
    """How a secret appears in summaries: where it comes from, never its value."""
    if path is not None:
        return f"(from file {path})"
    return "******** (from environment)" if secret is not None else "(none)"


def read_secret(path: Path | None, inline: str | None, *, key: str) -> str | None:
    """Resolve a secret from its ``*_file`` form (e.g. a systemd credential) or its env-supplied value.

    The file wins when both are set; trailing newlines are stripped (editors add them).
    """
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"{key}_file: cannot read {path}: {exc.strerror}") from exc
    return inline


def secret_file_warning(path: Path, *, key: str) -> str | None:
    """A warning when the secret file at ``path`` can be read (or written) by every user of the machine.

    None when it is private enough, or cannot be inspected (building reports a missing file).
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & 0o006 == 0:
        return None
    what = "read and written" if mode & 0o002 else "read"
    return (
        f"{key}: {path} can be {what} by every user on this machine (mode {mode & 0o777:04o}); "
        f"run `chmod 600 {path}` (or 640 with the agent's group)"
    )


TagKind = Literal["telemetry", "counter", "state", "value"]


class TagConfig(ConfigModel):
    """What every source's tag shares: its name and how the agent treats its values.

    A protocol's tag model adds its addressing (``node`` for OPC UA, ``register``
    and ``type`` for Modbus) on top of this.
    """

    tag: str = Field(min_length=1, description="Unique tag name, used by rules and in events")
    kind: TagKind = Field("telemetry", description="telemetry | counter | state | value")
    deadband: float | None = Field(
        None, ge=0, description="telemetry: absolute; smaller changes from the last forwarded value are dropped"
    )
    deadband_percent: float | None = Field(
        None,
        ge=0,
        description=(
            "telemetry: percent of the last forwarded value; smaller changes are dropped "
            "(with deadband too, a change must exceed both)"
        ),
    )
    min_interval: Duration | None = Field(
        None,
        description=(
            "telemetry: at most one sample per tag per interval; the latest value of the interval is sent at its end"
        ),
    )
    aggregate: Duration | None = Field(
        None, description="telemetry: forward min/max/mean/last/count per window instead of every change"
    )
    states: dict[str, str] | None = Field(
        None, description="state: value -> name; an unmapped value is reported as \"unknown:<value>\""
    )
    forward: bool = Field(False, description="value: also forward this tag's changes as telemetry samples")

    @property
    def writable(self) -> bool:
        """Whether the agent may write this tag (a PLC handshake ``ack``); a protocol says when not."""
        return True

    def counter_spec(self) -> CounterSpec:
        """How a ``counter`` tag wraps: unknown width (every drop is a reset) unless the protocol knows it."""
        return CounterSpec()

    @model_validator(mode="after")
    def _kind_options(self) -> TagConfig:
        if self.kind != "telemetry":
            for key in ("deadband", "deadband_percent", "min_interval", "aggregate"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies only to kind = \"telemetry\"")
        if self.states is not None and self.kind != "state":
            raise ValueError("states applies only to kind = \"state\"")
        if self.aggregate is not None and self.aggregate <= 0:
            raise ValueError("aggregate must be a positive duration")
        if self.min_interval is not None:
            if self.min_interval <= 0:
                raise ValueError("min_interval must be a positive duration")
            if self.aggregate is not None:
                # An aggregate already sends one value per window: a second throttle would only hide it.
                raise ValueError("min_interval does not apply with aggregate (one value per window already)")
        return self
