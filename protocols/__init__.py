"""One module per protocol: sources (OPC UA, ...) and sinks (MQTT, JSON Lines, ...)."""

from protocols import asyncua_lean

# Before any protocol module imports asyncua: its client without its server (see asyncua_lean).
asyncua_lean.install()
