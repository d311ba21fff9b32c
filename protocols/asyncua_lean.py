"""Import asyncua's client without its server.

``import asyncua`` runs the package ``__init__``, which imports the OPC UA *server*
too (its address space code, pub/sub, certificate generation): about 2 MB of
resident memory in an agent that only ever connects as a client, out of a
70 MB budget on a plant IPC. ``install()`` puts the ``asyncua`` package module in
place itself and runs what its ``__init__`` runs in the same order, except the
server: ``Node``, ``uamethod`` and ``Client`` are there at once, and ``Server`` and
``__version__`` load on first use (PEP 562 module ``__getattr__``), so code that
does ``from asyncua import Server`` (the demo's simulator, tests) keeps working.

It must run before anything imports ``asyncua``; ``protocols/__init__.py`` calls it,
so it runs before any protocol module. When asyncua is already imported it does
nothing, and when asyncua's layout ever disagrees (an import error), it undoes
itself and imports asyncua the ordinary way: the agent only loses the saving.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

_LAZY = {"Server": "asyncua.server"}


def install() -> bool:
    """Import asyncua without its server; True when the lean import is what is in place."""
    if "asyncua" in sys.modules:
        return getattr(sys.modules["asyncua"], "__plantgate_lean__", False) is True
    spec = importlib.util.find_spec("asyncua")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    package = importlib.util.module_from_spec(spec)
    package.__dict__["__getattr__"] = _lazy_attribute
    package.__dict__["__plantgate_lean__"] = True
    sys.modules["asyncua"] = package
    try:
        # The order of asyncua/__init__.py: common, then client (its modules need asyncua.Node).
        from asyncua.common import Node, uamethod

        package.__dict__.update(Node=Node, uamethod=uamethod)
        from asyncua.client import Client

        package.__dict__["Client"] = Client
    except Exception:
        for name in [n for n in sys.modules if n == "asyncua" or n.startswith("asyncua.")]:
            del sys.modules[name]
        importlib.import_module("asyncua")
        return False
    return True


def _lazy_attribute(name: str) -> Any:
    package = sys.modules["asyncua"]
    if name == "__version__":
        from importlib import metadata

        value: Any = metadata.version("asyncua")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'asyncua' has no attribute {name!r}")
    package.__dict__[name] = value
    return value
