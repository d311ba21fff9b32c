"""One module per protocol: sources (OPC UA, ...) and sinks (MQTT, JSON Lines, ...)."""
