"""The build context tests give protocol configs."""

from __future__ import annotations

from pathlib import Path

from agent.config_types import BuildContext


def context(data_dir: Path, *, agent_id: str = "test-gw", site: str = "test-site") -> BuildContext:
    """A fresh build context whose relative paths resolve against ``data_dir``."""
    return BuildContext(agent_id=agent_id, site=site, version="test", data_dir=data_dir)
