"""The shipped systemd unit, checked by systemd's own ``systemd-analyze``.

``verify`` loads the unit the way systemd would and complains about unknown or bad
directives and a missing ExecStart binary; ``security --offline=true`` rates its
sandbox (0 = locked down, 10 = unprotected). The unit's ExecStart names
``/opt/plantgate/.venv/bin/plantgate``, which does not exist on a test machine, so
the unit is checked as a site installs it: copied unchanged into a directory, with a
drop-in in ``plantgate.service.d/`` beside it that resets ExecStart to the same command
run by this venv's ``plantgate`` (``systemd-analyze`` reads drop-ins from the unit's own
directory, as systemd reads them from ``/etc/systemd/system``). Nothing else is
overridden, and a control run without that drop-in must fail on the missing binary
alone: that proves the drop-in is what was read, and that the rest is clean. The
example drop-ins under ``systemd/dropins/`` are checked applied on top of the unit.

``make test`` installs systemd-analyze when it is missing (``make systemd-tools``);
without it, or with systemd older than 252 (no ``--offline``), the checks are skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent import registry
from agent.settings import HttpSection

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "plantgate.service"
DROPINS = sorted((ROOT / "systemd" / "dropins").glob("*.conf"))
INSTALL_GUIDE = ROOT / "docs" / "install.md"
SHIPPED_BINARY = "/opt/plantgate/.venv/bin/plantgate"
CREDENTIALS = "/run/credentials/plantgate.service/"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")


def _systemd_version() -> int:
    if ANALYZE is None:
        return 0
    first = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.match(r"systemd (\d+)", first)
    return int(match.group(1)) if match else 0


VERSION = _systemd_version()
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is missing (make systemd-tools installs it as root)"
)
needs_offline_security = pytest.mark.skipif(
    VERSION < 252, reason=f"systemd-analyze security --offline needs systemd >= 252 (found {VERSION or 'none'})"
)


def _exec_start() -> str:
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, "one ExecStart"
    return lines[0].removeprefix("ExecStart=")


def _unit_dir(tmp_path: Path, dropins: list[Path], *, local_binary: bool = True) -> Path:
    """The unit as installed: the file unchanged, its drop-ins in ``plantgate.service.d/``."""
    unit = tmp_path / "plantgate.service"
    shutil.copyfile(UNIT, unit)
    conf = tmp_path / "plantgate.service.d"
    conf.mkdir()
    for dropin in dropins:
        shutil.copyfile(dropin, conf / dropin.name)
    if local_binary:
        command = _exec_start()
        assert command.startswith(SHIPPED_BINARY + " ")
        here = Path(sys.executable).parent / "plantgate"
        # "zz-" sorts last, so the reset wins over any example drop-in, as `systemctl edit` would.
        (conf / "zz-test-binary.conf").write_text(
            f"[Service]\nExecStart=\nExecStart={here}{command.removeprefix(SHIPPED_BINARY)}\n"
        )
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


DROPIN_SETS = [pytest.param([], id="unit"), pytest.param(DROPINS, id="with-example-dropins")]


@needs_analyze
@pytest.mark.parametrize("dropins", DROPIN_SETS)
def test_verify_is_clean(tmp_path: Path, dropins: list[Path]) -> None:
    unit = _unit_dir(tmp_path, dropins)
    result = _analyze("verify", "--man=no", str(unit))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and complaints == [], complaints


@needs_analyze
def test_verify_without_the_test_dropin_fails_only_on_the_missing_binary(tmp_path: Path) -> None:
    if Path(SHIPPED_BINARY).exists():
        pytest.skip(f"{SHIPPED_BINARY} is installed here: the control cannot fail")
    unit = _unit_dir(tmp_path, [], local_binary=False)
    result = _analyze("verify", "--man=no", str(unit))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(complaints) == 1 and SHIPPED_BINARY in complaints[0] and "not executable" in complaints[0], complaints


@needs_analyze
@needs_offline_security
@pytest.mark.parametrize("dropins", DROPIN_SETS)
def test_security_exposure_is_at_most_2(tmp_path: Path, dropins: list[Path]) -> None:
    unit = _unit_dir(tmp_path, dropins)
    # --threshold is on systemd's internal scale (exposure x 10): a rating above 2.0 fails the command too.
    result = _analyze("security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for plantgate\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def _credential_lines(path: Path) -> tuple[set[str], set[str], dict[str, str]]:
    """(ids loaded, ids shown commented out, credential id -> the config comment naming its key)."""
    loaded: set[str] = set()
    commented: set[str] = set()
    usage: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if match := re.fullmatch(r"(#?)LoadCredential=([\w.-]+):/etc/plantgate/credentials/([\w.-]+)", line.strip()):
            assert match.group(2) == match.group(3), f"{path.name}: credential id and file name differ: {line}"
            (commented if match.group(1) else loaded).add(match.group(2))
        elif line.startswith("#") and CREDENTIALS in line:
            for credential in re.findall(re.escape(CREDENTIALS) + r"([\w.-]+)", line):
                usage[credential] = line
    return loaded, commented, usage


def _fields(model: type[BaseModel]) -> set[str]:
    """Field names of a config model and of the models nested in it (``oauth2 = {...}``)."""
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                names |= _fields(kind)
    return names


SECTIONS: dict[str, type[BaseModel]] = {
    "[http]": HttpSection,
    **{f"[[sources.{key}]]": model for key, model in registry.SOURCES.items()},
    **{f"[[sinks.{key}]]": model for key, model in registry.SINKS.items()},
}


@pytest.mark.parametrize(
    "path", [UNIT, *(d for d in DROPINS if "LoadCredential" in d.read_text())], ids=lambda p: p.name
)
def test_every_credential_names_a_config_key_that_exists(path: Path) -> None:
    loaded, commented, usage = _credential_lines(path)
    assert loaded | commented, f"{path.name} shows no credential"
    for credential in loaded | commented:
        assert credential in usage, f"{path.name}: no comment says which config key reads {credential}"
        comment = usage[credential]
        section = next((name for name in SECTIONS if name in comment), None)
        assert section is not None, f"{path.name}: unknown config section in {comment!r}"
        keys = set(re.findall(r"\b(\w+_file)\b", comment))
        assert keys, comment
        missing = keys - _fields(SECTIONS[section])
        assert not missing, f"{path.name}: {section} has no key {sorted(missing)}"


def test_the_install_guide_creates_every_credential_the_unit_requires() -> None:
    # systemd refuses to start the service when a LoadCredential= file is missing (243/CREDENTIALS).
    loaded, _, _ = _credential_lines(UNIT)
    guide = INSTALL_GUIDE.read_text()
    created = set(re.findall(r">\s*/etc/plantgate/credentials/([\w.-]+)", guide))
    assert loaded <= created, f"the unit loads {sorted(loaded - created)} that docs/install.md never creates"
    assert _exec_start().startswith(SHIPPED_BINARY) and SHIPPED_BINARY.removesuffix("/bin/plantgate") in guide
