"""Shared fixtures: real peers on loopback, started and stopped by the tests."""

pytest_plugins = ["tests.peers.mosquitto", "tests.peers.opcua_server"]
