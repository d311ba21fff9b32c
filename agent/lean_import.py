"""Import two libraries without the parts of their package ``__init__`` the agent never runs.

The agent runs on plant IPCs with a memory budget of 70 MB, and two package
``__init__`` modules import far more than the agent uses:

- ``asyncua`` imports the OPC UA *server* (address space code, pub/sub,
  certificate generation) although the agent only connects as a client: ~2 MB.
- ``prometheus_client`` imports its exposition module, which brings HTTP
  servers, ``urllib.request`` and WSGI code, although the agent only keeps
  metrics in a registry and renders them itself (``agent.metrics``): ~1 MB.

``install()`` puts each package module in place itself and runs what its
``__init__`` runs, in the same order, minus those parts. Everything else the
``__init__`` offers still works: it loads on first use (PEP 562 module
``__getattr__``), so ``from asyncua import Server`` in the demo's simulator or in
tests behaves as before. ``agent/__init__.py`` calls ``install()``, so it runs
before any agent, protocol or buffer module imports either library. When a
package is already imported it is left alone, and when a release lays its
modules out differently (an import error) the lean import is undone and the
package imported the ordinary way: the agent then only loses the saving.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

MARK = "__plantgate_lean__"
"""Set on a package module that ``install()`` put in place (tests and diagnostics read it)."""


@dataclass(frozen=True)
class LeanPackage:
    """What to import of ``name`` at once (``eager``) and what on first use (``lazy``)."""

    name: str
    eager: tuple[tuple[str, tuple[str, ...]], ...]
    """``(submodule, names it provides)`` in the order the package's ``__init__`` imports them."""
    lazy: Mapping[str, str] = field(default_factory=dict)
    """Attribute -> submodule defining it, imported when the attribute is first read."""


ASYNCUA = LeanPackage(
    "asyncua",
    eager=(
        # asyncua/__init__.py: common first (the client's modules need asyncua.Node), then client.
        ("asyncua.common", ("Node", "uamethod")),
        ("asyncua.client", ("Client",)),
    ),
    lazy={"Server": "asyncua.server"},
)

_EXPOSITION = (
    "CONTENT_TYPE_LATEST", "CONTENT_TYPE_PLAIN_0_0_4", "CONTENT_TYPE_PLAIN_1_0_0", "delete_from_gateway",
    "generate_latest", "instance_ip_grouping_key", "make_asgi_app", "make_wsgi_app", "MetricsHandler",
    "push_to_gateway", "pushadd_to_gateway", "start_http_server", "start_wsgi_server", "write_to_textfile",
)  # fmt: skip

_METRICS = (
    "Counter", "disable_created_metrics", "enable_created_metrics", "Enum", "Gauge", "Histogram", "Info", "Summary",
)  # fmt: skip

# The process-wide REGISTRY gets the gc and platform collectors only when they are first
# read; the agent keeps metrics in a registry of its own (agent.metrics), so nothing misses them.
PROMETHEUS_CLIENT = LeanPackage(
    "prometheus_client",
    eager=(
        ("prometheus_client.metrics", _METRICS),
        ("prometheus_client.metrics_core", ("Metric",)),
        ("prometheus_client.process_collector", ("PROCESS_COLLECTOR", "ProcessCollector")),
        ("prometheus_client.registry", ("CollectorRegistry", "REGISTRY")),
    ),
    lazy={
        **dict.fromkeys(_EXPOSITION, "prometheus_client.exposition"),
        "GC_COLLECTOR": "prometheus_client.gc_collector",
        "GCCollector": "prometheus_client.gc_collector",
        "PLATFORM_COLLECTOR": "prometheus_client.platform_collector",
        "PlatformCollector": "prometheus_client.platform_collector",
    },
)

PACKAGES = (ASYNCUA, PROMETHEUS_CLIENT)


def install() -> dict[str, bool]:
    """Lean-import every package of ``PACKAGES``; name -> whether the lean import is in place."""
    return {package.name: install_package(package) for package in PACKAGES}


def install_package(package: LeanPackage) -> bool:
    """Import ``package`` the lean way; True when that is what ``sys.modules`` holds now."""
    if package.name in sys.modules:
        return getattr(sys.modules[package.name], MARK, False) is True
    spec = importlib.util.find_spec(package.name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    module = importlib.util.module_from_spec(spec)
    module.__dict__[MARK] = True
    module.__dict__["__getattr__"] = _first_use(module, package)
    sys.modules[package.name] = module
    try:
        for submodule, names in package.eager:
            loaded = importlib.import_module(submodule)
            module.__dict__.update({name: getattr(loaded, name) for name in names})
    except Exception:
        prefix = package.name + "."
        for name in [n for n in sys.modules if n == package.name or n.startswith(prefix)]:
            del sys.modules[name]
        importlib.import_module(package.name)
        return False
    return True


def _first_use(module: ModuleType, package: LeanPackage) -> Any:
    def __getattr__(name: str) -> Any:  # PEP 562: the module's fallback for missing attributes
        if name in package.lazy:
            value = getattr(importlib.import_module(package.lazy[name]), name)
        elif name == "__version__":
            from importlib import metadata

            value = metadata.version(package.name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package.name}.{name}") is not None:
            value = importlib.import_module(f"{package.name}.{name}")
        else:
            raise AttributeError(f"module {package.name!r} has no attribute {name!r}")
        module.__dict__[name] = value
        return value

    return __getattr__
