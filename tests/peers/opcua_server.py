"""A real asyncua server on a free loopback port (fixtures)."""
