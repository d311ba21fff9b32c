"""Files and directories only the agent may read: the buffer, keys, certificates, plant data."""

from __future__ import annotations

from pathlib import Path


def private_directory(path: Path) -> None:
    """Create ``path`` and its missing parents 0700.

    Directories that exist already (e.g. made by systemd's ``StateDirectory=``) keep their mode.
    """
    missing: list[Path] = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        directory.chmod(0o700)  # explicit: mkdir's mode went through the umask
