"""The agent imports asyncua's client without its server, and falls back to the full import."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the tests' own process imported asyncua's server already)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_agent_imports_the_client_without_the_server() -> None:
    out = run_python(
        """
        import sys
        import agent.pipeline, agent.cli, protocols.opcua
        import asyncua
        loaded = sorted(m for m in sys.modules if m.startswith(("asyncua.server", "asyncua.pubsub")))
        print(asyncua.__plantgate_lean__, asyncua.Client.__name__, asyncua.Node.__name__, loaded)
        """
    )
    assert out == "True Client Node []"


def test_server_and_version_load_on_first_use() -> None:
    out = run_python(
        """
        import sys
        import protocols.opcua
        from asyncua import Server, __version__
        from importlib import metadata
        print(Server.__module__, "asyncua.server" in sys.modules, __version__ == metadata.version("asyncua"))
        """
    )
    assert out == "asyncua.server.server True True"


def test_an_unexpected_layout_falls_back_to_the_ordinary_import() -> None:
    # A module asyncua cannot import stands for a future release laid out differently.
    out = run_python(
        """
        import sys
        sys.modules["asyncua.client"] = None
        import protocols.opcua
        import asyncua
        print(getattr(asyncua, "__plantgate_lean__", False), "asyncua.server" in sys.modules, asyncua.Client.__name__)
        """
    )
    assert out == "False True Client"


def test_nothing_changes_when_asyncua_was_imported_first() -> None:
    out = run_python(
        """
        import sys
        import asyncua
        from protocols import asyncua_lean
        print(asyncua_lean.install(), "asyncua.server" in sys.modules)
        """
    )
    assert out == "False True"
