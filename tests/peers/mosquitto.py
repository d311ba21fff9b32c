"""A real mosquitto broker on a free loopback port (fixtures)."""
