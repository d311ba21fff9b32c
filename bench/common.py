"""Shared pieces of the benchmark harness: process figures, machine info, brokers, agent processes, results.

Everything here runs on loopback only. Every process a scenario starts is
stopped by its PID (SIGTERM, then SIGKILL after a bounded wait), and every wait
has a deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
VENV_BIN = Path(sys.executable).parent
PLANTGATE = VENV_BIN / "plantgate"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --- process figures ----------------------------------------------------------------------------------


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a whole process (all its threads) in seconds, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of the full line


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread (tid) of a process, from ``/proc/<pid>/task/<tid>/stat``."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                out[int(tid)] = cpu_seconds(f"{pid}/task/{tid}")
    return out


def thread_split(pid: int, before: dict[int, float], after: dict[int, float], wall: float) -> dict[str, float]:
    """Cores of the main thread (the event loop) and of all other threads (SQLite, connects) over a window."""
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    others = sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items() if tid != pid)
    return {
        "main_thread_cores": round(main / wall, 4) if wall > 0 else 0.0,
        "other_threads_cores": round(others / wall, 4) if wall > 0 else 0.0,
        "threads": len(after),
    }


def memory_mb(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB as ``top`` counts them (MiB: ``/proc/<pid>/status`` kB / 1024)."""
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


@dataclass
class CpuWindow:
    """CPU of one process between ``start()`` and ``stop()``: cores = CPU seconds / wall seconds."""

    pid: int | str = "self"
    wall_start: float = 0.0
    cpu_start: float = 0.0
    wall: float = 0.0
    cpu: float = 0.0

    def start(self) -> CpuWindow:
        self.wall_start, self.cpu_start = time.monotonic(), cpu_seconds(self.pid)
        return self

    def stop(self) -> CpuWindow:
        self.wall = time.monotonic() - self.wall_start
        self.cpu = cpu_seconds(self.pid) - self.cpu_start
        return self

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall > 0 else 0.0


class MemorySampler:
    """Samples VmRSS of a process every ``interval`` seconds on a daemon thread (bounded by ``stop``)."""

    def __init__(self, pid: int | str, interval: float = 0.5):
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic time, RSS MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), memory_mb(self.pid)[0]))
            self._stop.wait(self.interval)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples

    def between(self, start: float, end: float) -> list[float]:
        """RSS samples (MB) taken in ``[start, end]`` (monotonic)."""
        return [rss for t, rss in self.samples if start <= t <= end]


# --- machine --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, memory, kernel, Python version and the date, for every result file."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_gib": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "git_modified": _git_modified(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _git_modified() -> list[str] | None:
    """Tracked files that differ from the commit (the measured code is the working tree)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until truthy; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what or getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)


# --- child processes --------------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> int | None:
    """SIGTERM this process (by its PID), wait, SIGKILL it if it does not exit in ``timeout``."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


# --- mosquitto ----------------------------------------------------------------------------------------------

BROKER_OPTIONS = [
    # Never drop QoS 1 messages to a subscriber that is behind: no in-flight cap, a queue far
    # larger than any scenario sends. (mosquitto.conf(5): max_inflight_messages 0 = no maximum.)
    "max_inflight_messages 0",
    "max_queued_messages 5000000",
    "max_queued_bytes 0",
    "set_tcp_nodelay true",
]


class Broker:
    """A mosquitto on a free loopback port with the bench options above.

    Uses ``tests.peers.mosquitto.MosquittoBroker`` when importable (the repository's own
    helper, which writes the config and waits for the listener), else a minimal equivalent.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._helper: Any = None
        self._process: subprocess.Popen[bytes] | None = None
        self.host = HOST
        try:
            if str(REPO) not in sys.path:
                sys.path.insert(0, str(REPO))
            from tests.peers.mosquitto import MosquittoBroker

            self._helper = MosquittoBroker(workdir, extra_config=BROKER_OPTIONS)
            self.port: int = self._helper.port
        except BaseException as exc:  # ImportError, or pytest.skip (a BaseException) when mosquitto is missing
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            self._helper = None
            self.port = free_port()
            binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            self._binary = binary
            config = workdir / "mosquitto.conf"
            lines = [
                f"user {os.environ.get('USER') or 'root'}" if os.getuid() == 0 else "",
                "persistence false",
                f"log_dest file {workdir / 'mosquitto.log'}",
                f"listener {self.port} {HOST}",
                "allow_anonymous true",
                *BROKER_OPTIONS,
            ]
            config.write_text("\n".join(line for line in lines if line) + "\n", encoding="utf-8")
            self._config = config

    @property
    def pid(self) -> int | None:
        if self._helper is not None:
            pid: int | None = self._helper.pid
            return pid
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def start(self) -> Broker:
        if self._helper is not None:
            self._helper.start()
            return self
        self._process = subprocess.Popen(
            [self._binary, "-c", str(self._config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def accepting() -> bool:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(accepting, 10, what="mosquitto listening")
        return self

    def stop(self) -> None:
        if self._helper is not None:
            self._helper.stop()
        else:
            stop_process(self._process)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the agent as a subprocess ----------------------------------------------------------------------------


def agent_header(
    data_dir: Path, http_port: int, *, site: str = "bench", agent_id: str = "bench-agent", token_file: str | None = None
) -> list[str]:
    """The ``[agent]`` and ``[http]`` lines every bench agent's config starts with."""
    lines = [
        "[agent]",
        f'site = "{site}"',
        f'id = "{agent_id}"',
        f'data_dir = "{data_dir}"',
        'log_level = "WARNING"',
        "",
        "[http]",
        f'listen = "{HOST}:{http_port}"',
    ]
    if token_file is not None:
        lines.append(f'ingest_token_file = "{token_file}"')
    return [*lines, ""]


def agent_config(
    *,
    data_dir: Path,
    http_port: int,
    broker_port: int,
    lanes: Sequence[str] = ("transaction", "operational", "telemetry"),
    window: int = 500,
    opcua_endpoint: str | None = None,
    tags: int = 100,
    queue_size: int = 100,
    publishing_interval: str = "100ms",
    sink_name: str = "bench",
    site: str = "bench",
    agent_id: str = "bench-agent",
) -> str:
    """The TOML config of a bench agent: optional OPC UA source (``tags`` Double telemetry tags), one MQTT sink."""
    lines = agent_header(data_dir, http_port, site=site, agent_id=agent_id)
    if opcua_endpoint is not None:
        lines += [
            "[[sources.opcua]]",
            'name = "load"',
            f'endpoint = "{opcua_endpoint}"',
            f'publishing_interval = "{publishing_interval}"',
            f"queue_size = {queue_size}",
            "",
        ]
        for i in range(tags):
            lines += [
                "  [[sources.opcua.tags]]",
                f'  tag = "load.t{i:03d}"',
                f'  node = "ns=2;s=Load.T{i:03d}"',
                '  kind = "telemetry"',
                "",
            ]
    lines += [
        "[[sinks.mqtt]]",
        f'name = "{sink_name}"',
        f'url = "mqtt://{HOST}:{broker_port}"',
        f'client_id = "plantgate-{agent_id}"',
        f'topic_prefix = "plantgate/{site}"',
        f"lanes = [{', '.join(json.dumps(lane) for lane in lanes)}]",
        f"window = {window}",
        "",
    ]
    return "\n".join(lines)


def check_config(path: Path) -> None:
    """``plantgate check -c path`` must accept the config (exit 0); RuntimeError with its output otherwise."""
    out = subprocess.run([str(PLANTGATE), "check", "-c", str(path)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"plantgate check rejected {path}: {out.stderr.strip() or out.stdout.strip()}")


class AgentProcess:
    """``plantgate run -c CONFIG`` as a subprocess; its log goes to ``log_path``; /status over HTTP."""

    def __init__(self, config_path: Path, http_port: int, log_path: Path):
        self.config_path = config_path
        self.http_port = http_port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> AgentProcess:
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(PLANTGATE), "run", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The agent's ``GET /status`` document, or None when it does not answer (yet)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {self.proc.returncode}; log: {self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/status", timeout=timeout) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
        except (OSError, ValueError):
            return None

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the agent's ``GET /metrics`` (the first whose labels include ``labels``), or None."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/metrics", timeout=5) as resp:
                text = resp.read().decode("utf-8", "replace")
        except OSError:
            return None
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head, _, value = line.rpartition(" ")
                if head.split("{")[0] == name and all(label in head for label in wanted):
                    return float(value)
        return None

    def histogram(self, name: str, **labels: str) -> dict[str, float]:
        """The cumulative buckets (``le`` -> count) of one histogram series of ``GET /metrics``."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/metrics", timeout=5) as resp:
                text = resp.read().decode("utf-8", "replace")
        except OSError:
            return {}
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        buckets: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "_bucket{") and all(label in line for label in wanted):
                head, _, value = line.rpartition(" ")
                le = head.split('le="', 1)[1].split('"', 1)[0]
                buckets[le] = float(value)
        return buckets

    def wait_running(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until /status says the agent is running."""

        def running() -> dict[str, Any] | None:
            doc = self.status()
            return doc if doc is not None and doc["agent"]["state"] == "running" else None

        doc: dict[str, Any] = wait_until(running, timeout, interval=0.02, what="agent /status running")
        return doc

    def wait_connected(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every source and sink in /status is connected."""

        def connected() -> dict[str, Any] | None:
            doc = self.status()
            if doc is None:
                return None
            parts = list(doc["sources"].values()) + list(doc["sinks"].values())
            return doc if all(p["state"] == "connected" for p in parts) else None

        doc: dict[str, Any] = wait_until(connected, timeout, interval=0.05, what="agent sources and sinks connected")
        return doc

    def stop(self) -> int | None:
        return stop_process(self.proc, timeout=20)

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        return ""


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the printed table: a figure of ours next to its target and the peer's figure."""

    scenario: str
    metric: str
    value: float | None
    unit: str
    target: str = ""
    ok: bool | None = None  # None: no target
    peer: str = ""
    cpu_cores: float | None = None
    rss_mb: float | None = None
    note: str = ""


@dataclass
class ScenarioResult:
    """What a scenario hands back: table rows, and the raw figures for its JSON file."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    quick: bool = False

    def write(self, machine: dict[str, Any]) -> Path:
        """``bench/results/<name>.json`` (``<name>.quick.json`` for ``--quick`` runs)."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / (f"{self.name}.quick.json" if self.quick else f"{self.name}.json")
        doc = {
            "scenario": self.name,
            "title": self.title,
            "quick": self.quick,
            "machine": machine,
            "rows": [asdict(row) for row in self.rows],
            "figures": self.figures,
        }
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        return path


def target_min(value: float | None, minimum: float) -> bool | None:
    """PASS when ``value >= minimum``; None (no verdict) without a value."""
    return None if value is None else value >= minimum


def target_max(value: float | None, maximum: float) -> bool | None:
    """PASS when ``value <= maximum``; None (no verdict) without a value."""
    return None if value is None else value <= maximum


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A fresh temporary directory for one scenario, removed afterwards (kept with BENCH_KEEP=1)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"plantgate-bench-{name}-"))
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"  (kept {path})", file=sys.stderr)


# --- the subscriber process --------------------------------------------------------------------------------


class SubscriberProcess:
    """``python -m bench.subscriber`` as a child process; see that module."""

    def __init__(self, workdir: Path, *, port: int, topic: str, mode: str, expected: int = 0, deadline: float = 900):
        self.out = workdir / f"subscriber-{mode}.json"
        self.progress_path = workdir / f"subscriber-{mode}.progress.json"
        self.log_path = workdir / f"subscriber-{mode}.log"
        self.args = [
            sys.executable, "-m", "bench.subscriber", "--port", str(port), "--topic", topic, "--mode", mode,
            "--out", str(self.out), "--progress", str(self.progress_path), "--expected", str(expected),
            "--deadline", str(deadline),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> SubscriberProcess:
        """Start it and wait for its SUBACK."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.progress().get("subscribed"), timeout, what="subscriber SUBACK")
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def progress(self) -> dict[str, Any]:
        if self.proc is not None and self.proc.poll() is not None and not self.out.exists():
            log = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the subscriber exited with {self.proc.returncode}: {log}")
        try:
            doc: dict[str, Any] = json.loads(self.progress_path.read_text(encoding="utf-8"))
            return doc
        except (OSError, ValueError):
            return {}

    def wait_items(self, expected: int, *, idle: float, timeout: float) -> dict[str, Any]:
        """Until ``expected`` items arrived, or nothing arrived for ``idle`` s, or ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last_items, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            doc = self.progress()
            items = int(doc.get("items", 0))
            if items >= expected:
                return doc
            if items != last_items:
                last_items, last_change = items, time.monotonic()
            elif time.monotonic() - last_change >= idle:
                return doc
            time.sleep(0.2)
        return self.progress()

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM it, wait for its result file, and return the decoded result."""
        from bench.subscriber import load_result

        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, timeout=1)
        if not self.out.exists():
            raise RuntimeError(f"the subscriber wrote no result: {self.log_path.read_text(errors='replace')[-2000:]}")
        return load_result(str(self.out))

    def kill(self) -> None:
        stop_process(self.proc, timeout=5)


# --- profiling (py-spy, optional) ----------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy binary of this virtualenv or on PATH, or None."""
    candidate = VENV_BIN / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def start_profile(pid: int, seconds: float, out: Path, rate: int = 100) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` (all threads, raw collapsed stacks) for ``seconds``; None without py-spy."""
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen(
        [binary, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate),
         "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


# Where a sample's time goes, by the first of these markers found in its stack (checked in order).
PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("rules (classify, build events)", ("Rules.process", "Rules._samples_events")),
    ("buffer append (sequence, encode)", ("Buffer.append",)),
    ("mqtt publish (paho publish, window)", ("publish_batch",)),
    ("mqtt socket callbacks (PUBACKs, writes)", ("_Connection._on_readable", "_Connection._on_writable", "_on_misc")),
    ("delivery loop (buffer read, settle, metrics)", ("_deliver_loop",)),
    ("buffer commit loop (event loop side)", ("_commit_loop", "Buffer.maintain")),
    ("opcua source callback (readings)", ("_publish_loop", "_readings_of")),
    ("asyncua client (receive, decode, session)", ("asyncua",)),
    ("sqlite (aiosqlite worker thread executing SQL)", ("_connection_worker_thread",)),
    ("http server", ("starlette/", "uvicorn/", "h11/", "agent/http_server")),
    ("other threads", ("Thread._bootstrap",)),
]


def _idle_leaves() -> set[str]:
    """Leaf frames that are a thread blocked waiting, which py-spy does not recognise as idle.

    aiosqlite's worker thread waits in ``SimpleQueue.get()`` (a C call, no Python frame
    below it), so py-spy reports it as running on that line.
    """
    leaves: set[str] = set()
    with contextlib.suppress(Exception):
        import inspect

        import aiosqlite.core

        lines, first = inspect.getsourcelines(aiosqlite.core._connection_worker_thread)
        for offset, text in enumerate(lines):
            if "tx.get()" in text:
                leaves.add(f"_connection_worker_thread (aiosqlite/core.py:{first + offset})")
    return leaves


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function, and a breakdown by category, from a py-spy raw file.

    Shares are of the samples in which a thread was running (py-spy drops idle ones; the
    aiosqlite worker's wait for work is dropped here): wall-clock activity, not CPU. The
    agent's CPU split by thread is in ``thread_cpu`` figures.
    """
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    categories: dict[str, int] = {}
    total = 0
    waiting = 0
    idle = _idle_leaves()
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1] in idle:
            waiting += count
            continue
        total += count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            total_counts[frame] = total_counts.get(frame, 0) + count
        category = "other"
        if frames[-1].startswith("Runner.run"):
            category = "event loop C code (uvloop: I/O, callbacks, polling)"
        for name, markers in PROFILE_CATEGORIES:
            if any(marker in stack for marker in markers):
                category = name
                break
        categories[category] = categories.get(category, 0) + count

    def table(counts: dict[str, int]) -> list[dict[str, Any]]:
        ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [{"function": name, "samples": n, "share": round(n / total, 4)} for name, n in ranked]

    return {
        "samples": total,
        "dropped_waiting_samples": waiting,
        "categories": table(categories),
        "self": table(self_counts),
        "inclusive": table(total_counts),
    }


def _pressure_total(resource: str) -> float | None:
    """Seconds some task stalled on ``resource`` (``io``, ``cpu``) since boot, from PSI; None without PSI."""
    try:
        with open(f"/proc/pressure/{resource}", encoding="ascii") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None


class SystemCpu:
    """Busy cores of the whole machine between ``start()`` and ``stop()`` (``/proc/stat``): to see contention.

    Also the share of the window in which some task was stalled on I/O or CPU (Linux PSI):
    a shared machine's disk or CPU contention shows there.
    """

    def __init__(self) -> None:
        self.busy = 0.0
        self.wall = 0.0
        self._start: tuple[float, float] = (0.0, 0.0)
        self._pressure_start: dict[str, float | None] = {}
        self.pressure: dict[str, float | None] = {}

    @staticmethod
    def _read() -> tuple[float, float]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / CLK_TCK, time.monotonic()

    def start(self) -> SystemCpu:
        self._start = self._read()
        self._pressure_start = {r: _pressure_total(r) for r in ("io", "cpu")}
        return self

    def stop(self) -> SystemCpu:
        busy, now = self._read()
        self.busy, self.wall = busy - self._start[0], now - self._start[1]
        for resource, before in self._pressure_start.items():
            after = _pressure_total(resource)
            stalled = None if before is None or after is None or self.wall <= 0 else (after - before) / self.wall
            self.pressure[f"{resource}_some_share"] = None if stalled is None else round(stalled, 4)
        return self

    @property
    def cores(self) -> float:
        return self.busy / self.wall if self.wall > 0 else 0.0


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg", encoding="ascii") as f:
        return [float(x) for x in f.read().split()[:3]]
