"""The install paths a site follows, run for real: the Dockerfile's and docs/install.md's.

No Docker engine here, so the Dockerfile is read and its build stage replayed: its
COPY lines fill a build context (filtered like ``.dockerignore``), its ENV is set and
its RUN lines run as written, with every container path (``/opt``, ``/src``, ``/etc``,
``/var``, ``/run``, ``/root``) moved under a directory of the test standing in for the
image's root. That creates a fresh venv and ``pip install .`` resolves and downloads
every dependency from the index, as ``docker build`` does. The runtime stage's ENV
(``PLANTGATE__HTTP__LISTEN`` on a free loopback port instead of ``0.0.0.0:9480``),
WORKDIR and ENTRYPOINT start the agent from that venv with a site config, run as the
Dockerfile's header documents (config file, ingest token file named by
``PLANTGATE__HTTP__INGEST_TOKEN_FILE``); the HEALTHCHECK command, parsed from the
Dockerfile and run with the venv's ``python``, must pass while the agent runs and fail
once it stopped.

The guide's offline install is replayed the same way from its own command lines:
``pip wheel`` into the bundle (the only step with network), then ``python3 -m venv`` and
``pip install --no-index --find-links`` with pip's config files ignored, so nothing but
the bundle can be used. The build machine and the IPC are one directory here (the
bundle is not copied). Then a transaction is buffered for a sink that cannot deliver,
the guide's upgrade command reinstalls the venv from the bundle, and the upgraded agent
still holds the transaction.

Both need pip's index (pypi.org or the one pip is configured with); without it they
are skipped with the reason. About 15 s per install on 2 cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.peers.mosquitto import free_port
from tests.peers.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
GUIDE = ROOT / "docs" / "install.md"
TOKEN = "install-test-ingest-token"
INSTALL_TIMEOUT = 240

CONFIG = """\
[agent]
site = "plant-install"
id = "gw-install"
data_dir = "{data_dir}"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sinks.mqtt]]
name = "cloud"
url = "mqtt://127.0.0.1:{closed_port}"
lanes = ["transaction"]
"""

EVENT = {
    "specversion": "1.0",
    "id": "install-wo-4711-consumed",
    "source": "mes://plant/erp-bridge",
    "type": "io.plantgate.material.consumed",
    "time": "2026-12-04T08:00:00Z",
    "subject": "WO-4711",
    "data": {"work_order": "WO-4711", "item": "40012345000017", "quantity": {"value": "2.5", "uom": "KGM"}},
}

# Absolute paths of the image (and of the IPC in the guide) that are moved under the test's root.
_CONTAINER_PATH = re.compile(r"(?<![\w./-])/(opt|src|etc|var|run|root)(?=/|\s|$|\")")


def inside(root: Path, text: str) -> str:
    """``text`` with every container path moved under ``root``."""
    return _CONTAINER_PATH.sub(lambda m: f"{root}/{m.group(1)}", text)


# --- the Dockerfile --------------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... stage of the Dockerfile: its instructions in order."""

    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def one(self, instruction: str) -> str:
        found = self.all(instruction)
        assert len(found) == 1, f"one {instruction} expected in stage {self.name}: {found}"
        return found[0]


def dockerfile_stages(text: str) -> list[Stage]:
    """Instructions per stage; continuation lines joined, comment lines dropped (as docker does)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation line ends the file"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        else:
            assert stages, f"{instruction} before FROM"
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def env_of(stage: Stage, base: dict[str, str], root: Path) -> dict[str, str]:
    """``base`` with the stage's ENV applied (``$VAR`` expanded from what is set so far)."""
    env = dict(base)
    for args in stage.all("ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {pair}: only the key=value form is replayed"
            # Container paths first: what $PATH expands to is this machine's, and stays as it is.
            env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), inside(root, value))
    return env


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``relative`` (a path in the repository) out of the build context."""
    return any(
        fnmatch(Path(relative).name, pattern.removeprefix("**/"))
        if pattern.startswith("**/")
        else fnmatch(relative, pattern)
        for pattern in patterns
    )


def copy_context(sources: list[str], destination: Path) -> None:
    """COPY of files and directories of the repository, without what .dockerignore keeps out."""
    patterns = dockerignore_patterns()

    def ignored(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(ROOT)
        return {name for name in names if dockerignored(str(relative / name), patterns)}

    many = len(sources) > 1
    for source in sources:
        assert not dockerignored(source, patterns), f"COPY {source}: .dockerignore keeps it out of the context"
        path = ROOT / source
        target = destination / path.name if many or str(destination).endswith("/") else destination
        if path.is_dir():
            shutil.copytree(path, target, ignore=ignored, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def base_env() -> dict[str, str]:
    """This environment for pip, minus machine-local find-links the image or the IPC would not have."""
    env = {key: value for key, value in os.environ.items() if key not in ("PIP_FIND_LINKS", "VIRTUAL_ENV")}
    # `python` on PATH is a 3.11 interpreter, as in the image (python:3.11-slim).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_step(command: str, *, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def index_reachable() -> None:
    """Skip when pip cannot reach its index: the Dockerfile's and the guide's builds download from it."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "pip"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=base_env(),
    )
    if result.returncode != 0:
        pytest.skip(f"pip's package index is not reachable (no network?): {result.stderr.strip()[-300:]}")


@dataclass
class Image:
    """The Dockerfile replayed under ``root``: its runtime stage's environment and commands."""

    root: Path
    env: dict[str, str]
    workdir: Path
    entrypoint: list[str]
    healthcheck: list[str]
    venv: Path


@pytest.fixture(scope="module")
def image(index_reachable: None, tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("image")
    stages = dockerfile_stages(DOCKERFILE.read_text())
    build = next(stage for stage in stages if stage.name == "build")
    runtime = stages[-1]
    env = env_of(build, base_env(), root)
    workdir = root
    for instruction, args in build.instructions:
        if instruction == "WORKDIR":
            workdir = Path(inside(root, args))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, target = shlex.split(args)
            assert not any(s.startswith("--") for s in sources), f"COPY {args}: options are not replayed"
            destination = Path(inside(root, target)) if target.startswith("/") else workdir / target
            copy_context(sources, Path(str(destination) + ("/" if target.endswith("/") else "")))
        elif instruction == "RUN":
            run_step(inside(root, args), cwd=workdir, env=env)
        elif instruction != "ENV":
            raise AssertionError(f"{instruction} in the build stage is not replayed by this test")

    copied = [shlex.split(args) for args in runtime.all("COPY")]
    assert [c[1:] for c in copied if c[0] == "--from=build"] == [["/opt/plantgate/.venv", "/opt/plantgate/.venv"]], (
        "the runtime stage takes the build stage's venv at the same path"
    )
    venv = root / "opt/plantgate/.venv"
    runtime_env = env_of(runtime, base_env(), root)
    workdir = Path(inside(root, runtime.all("WORKDIR")[-1]))
    entrypoint = json.loads(runtime.one("ENTRYPOINT"))
    check = runtime.one("HEALTHCHECK")
    assert " CMD [" in check, "HEALTHCHECK in exec form"
    healthcheck = json.loads(check[check.index(" CMD [") + len(" CMD ") :])
    return Image(root, runtime_env, workdir, entrypoint, healthcheck, venv)


def resolve(argv: list[str], env: dict[str, str], root: Path) -> list[str]:
    """argv as the image's runtime runs it: the program found on its PATH, container paths under ``root``."""
    program = shutil.which(argv[0], path=env["PATH"])
    assert program is not None, f"{argv[0]} is not on the image's PATH"
    return [program, *(inside(root, arg) for arg in argv[1:])]


# --- a running agent ------------------------------------------------------------------------------


def read(path: Path) -> str:
    return path.read_text(errors="replace")


async def healthz_status(port: int) -> int | None:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code
    except httpx.HTTPError:
        return None


@contextlib.asynccontextmanager
async def running(argv: list[str], *, env: dict[str, str], cwd: Path, port: int, log: Path) -> AsyncIterator[None]:
    """The agent as a child process until the block ends; then SIGTERM, which must exit 0."""
    with log.open("ab") as output:
        agent = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdout=output, stderr=output)
    try:
        await wait_for(
            lambda: healthz_status(port), timeout=30, interval=0.1, message=lambda: f"no /healthz; {read(log)}"
        )
        yield
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(agent.wait(), 60)
    assert returncode == 0, read(log)


async def post_event(port: int) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"http://127.0.0.1:{port}/v1/events",
            content=json.dumps(EVENT),
            headers={"Content-Type": "application/cloudevents+json", "Authorization": f"Bearer {TOKEN}"},
        )


async def status(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        body: dict[str, Any] = (await client.get(f"http://127.0.0.1:{port}/status")).json()
        return body


def health(image: Image, env: dict[str, str]) -> int:
    argv = resolve(image.healthcheck, env, image.root)
    assert Path(argv[0]).parent == image.venv / "bin", "the healthcheck runs the image's python"
    return subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False).returncode


# --- the tests ------------------------------------------------------------------------------------


async def test_dockerfile_install_entrypoint_and_healthcheck(image: Image) -> None:
    assert image.env["PLANTGATE__HTTP__LISTEN"] == "0.0.0.0:9480", "the image listens on every interface"
    assert (image.venv / "bin" / "plantgate").is_file()
    assert list((image.venv / "lib").glob("python3*/site-packages/agent/__pycache__/*.pyc")), "compileall ran"
    port = free_port()
    env = {**image.env, "PLANTGATE__HTTP__LISTEN": f"127.0.0.1:{port}"}
    # As the header's `docker run` line: the site config, the token file named by the environment, the volume.
    config = image.root / "etc/plantgate/plantgate.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG.format(data_dir="/var/lib/plantgate", closed_port=free_port()))
    config.write_text(inside(image.root, config.read_text()))
    token = image.root / "run/secrets/ingest-token"
    token.parent.mkdir(parents=True)
    token.write_text(TOKEN + "\n")
    env["PLANTGATE__HTTP__INGEST_TOKEN_FILE"] = str(token)
    image.workdir.mkdir(parents=True, exist_ok=True)
    argv = resolve(image.entrypoint, env, image.root)
    assert Path(argv[0]).parent == image.venv / "bin", "the entrypoint runs the image's venv"

    async with running(argv, env=env, cwd=image.workdir, port=port, log=image.root / "agent.log"):
        assert await asyncio.to_thread(health, image, env) == 0
        response = await post_event(port)
        assert response.status_code == 202, response.text
        body = await status(port)
        assert body["agent"]["id"] == "gw-install" and set(body["sinks"]) == {"cloud"}
        assert body["buffer"]["path"] == str(image.workdir / "buffer.db")
    assert await asyncio.to_thread(health, image, env) != 0, "the healthcheck fails once the agent is gone"


def guide_command(prefix: str, *, containing: str = "", excluding: str = "") -> str:
    """The one command line of docs/install.md that starts with ``prefix``."""
    lines = [
        line.strip()
        for line in GUIDE.read_text().splitlines()
        if line.strip().startswith(prefix) and containing in line and not (excluding and excluding in line)
    ]
    assert len(lines) == 1, f"docs/install.md: one line starting with {prefix!r} expected, found {lines}"
    return lines[0]


@pytest.fixture(scope="module")
def ipc(index_reachable: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The guide's bundle and offline install under a root standing in for the build machine and the IPC."""
    root = tmp_path_factory.mktemp("ipc")
    checkout = root / "root" / "plantgate"
    copy_context(["pyproject.toml", "README.md", "agent", "protocols", "buffer"], Path(f"{checkout}/"))
    python = shlex.quote(sys.executable)
    wheel = guide_command("python3 -m pip wheel")
    run_step(python + wheel.removeprefix("python3"), cwd=checkout, env=base_env())
    offline = {**base_env(), "PIP_CONFIG_FILE": os.devnull}  # only the command line: no index, no find-links
    for step in (
        guide_command("python3 -m venv /opt/plantgate/.venv"),
        guide_command("/opt/plantgate/.venv/bin/pip install --no-index", excluding="--force-reinstall"),
    ):
        run_step(
            inside(root, step.replace("python3", python, 1) if step.startswith("python3") else step),
            cwd=root,
            env=offline,
        )
    yield root


async def test_offline_install_and_upgrade_keep_the_buffer(ipc: Path, tmp_path: Path) -> None:
    venv = ipc / "opt/plantgate/.venv"
    plantgate = venv / "bin" / "plantgate"
    data_dir = tmp_path / "var/lib/plantgate"
    data_dir.mkdir(parents=True)
    token = tmp_path / "ingest-token"
    token.write_text(TOKEN + "\n")
    config = tmp_path / "plantgate.toml"
    closed_port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PLANTGATE") and key != "VIRTUAL_ENV"}

    def configured(port: int) -> list[str]:
        config.write_text(
            CONFIG.format(data_dir=data_dir, closed_port=closed_port)
            + f'\n[http]\nlisten = "127.0.0.1:{port}"\ningest_token_file = "{token}"\n'
        )
        return [str(plantgate), "run", "-c", str(config)]

    def backlog() -> int:
        result = subprocess.run(
            [str(plantgate), "buffer", "stats", "--json", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        depth: int = json.loads(result.stdout)["sinks"]["cloud"]["lanes"]["transaction"]["depth"]
        return depth

    port = free_port()
    async with running(configured(port), env=env, cwd=data_dir, port=port, log=tmp_path / "before.log"):
        response = await post_event(port)
        assert response.status_code == 202, response.text
    assert await asyncio.to_thread(backlog) == 1, "the transaction waits in the buffer for the sink"

    upgrade = guide_command(
        "/opt/plantgate/.venv/bin/pip install", containing="--force-reinstall", excluding=".previous"
    )
    assert "--no-index" in upgrade
    await asyncio.to_thread(run_step, inside(ipc, upgrade), cwd=ipc, env={**env, "PIP_CONFIG_FILE": os.devnull})
    assert plantgate.is_file(), "the upgrade reinstalled the console script"

    port = free_port()
    async with running(configured(port), env=env, cwd=data_dir, port=port, log=tmp_path / "after.log"):
        body = await status(port)
        assert body["sinks"]["cloud"]["lanes"]["transaction"]["depth"] == 1, "the upgrade kept the buffered transaction"
    assert await asyncio.to_thread(backlog) == 1
