"""Connection state that every source and sink reports, for /status, /readyz and metrics."""

from __future__ import annotations

import time
from typing import Literal

import msgspec

ConnectionState = Literal["starting", "connected", "reconnecting", "disconnected", "unauthorized", "stopped"]
CONNECTION_STATES: tuple[ConnectionState, ...] = (
    "starting", "connected", "reconnecting", "disconnected", "unauthorized", "stopped"
)


class ComponentStatus(msgspec.Struct):
    """What one source or sink tells monitoring about itself."""

    name: str
    kind: str  # "opcua", "mqtt", ...
    state: ConnectionState = "starting"
    since: float = msgspec.field(default_factory=time.time)
    last_error: str | None = None
    # Per-item problems that degrade without stopping, e.g. {"ns=2;s=X": "BadNodeIdUnknown"}.
    degraded: dict[str, str] = msgspec.field(default_factory=dict)
    # Facts monitoring should see that are not errors, e.g. {"decoder": "fast"} for a speedup in use.
    info: dict[str, str] = msgspec.field(default_factory=dict)

    def set_state(self, state: ConnectionState, error: str | None = None) -> None:
        """Move to ``state``; keeps ``since`` when the state does not change.

        Connecting again clears ``last_error``: an error shown next to "connected" would
        send an operator after a problem that is over (the log keeps it).
        """
        if state != self.state:
            self.state = state
            self.since = time.time()
            if state == "connected":
                self.last_error = None
        if error is not None:
            self.last_error = error

    @property
    def healthy(self) -> bool:
        return self.state == "connected" and not self.degraded
