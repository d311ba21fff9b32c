"""plantgate agent: the daemon that wires sources, rules, the buffer and sinks."""

from agent import lean_import

__version__ = "0.1.0"

# Before any agent, protocol or buffer module imports asyncua or prometheus_client (see lean_import).
lean_import.install()
