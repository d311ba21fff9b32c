"""plantgate agent: the daemon that wires sources, rules, the buffer and sinks."""

__version__ = "0.1.0"
