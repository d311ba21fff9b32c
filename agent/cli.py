"""``plantgate`` command line: run, check, browse, demo, buffer, trace, reconcile, schema.

Errors are one line on stderr (``plantgate: <file>[:<line>]: <key>: <what>``),
never a traceback, and exit code 2 for bad input. ``check --connect`` exits 1 when
the config is valid but a pre-flight finding is an error (a peer unreachable, a
node missing, credentials refused); ``browse`` exits 1 when the server cannot be
browsed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from agent import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``plantgate`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantgate",
        description="Edge gateway agent: shop-floor sources -> store-and-forward buffer -> cloud sinks.",
    )
    parser.add_argument("--version", action="version", version=f"plantgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            default=None,
            help="config file (default: $PLANTGATE_CONFIG, else /etc/plantgate/plantgate.toml)",
        )

    run = commands.add_parser("run", help="run the daemon")
    config_option(run)
    run.add_argument(
        "--log-format",
        choices=("auto", "json", "text"),
        default="auto",
        help="json lines (journald, containers), key=value text for people; auto: json unless stderr is a terminal",
    )
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser("check", help="validate the config and print a summary (secrets masked)")
    config_option(check)
    check.add_argument(
        "--connect",
        action="store_true",
        help="pre-flight: also reach every OPC UA server, Modbus device, scanner, MES and sink once and check "
        "each node and register (reads only); exit 1 when a finding is an error",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="with --connect: how long each source or sink may take (default 15)",
    )
    check.set_defaults(handler=_cmd_check)

    browse = commands.add_parser("browse", help="list an OPC UA server's variables with node ids, types and access")
    browse.add_argument("endpoint", nargs="?", default=None, help="opc.tcp://host:port of the server")
    browse.add_argument(
        "--source",
        default=None,
        metavar="NAME",
        help="browse the server of this [[sources.opcua]] entry of the config (-c), with its security, "
        "certificates and user (for servers that only offer secure endpoints)",
    )
    config_option(browse)
    browse.add_argument("--node", default="i=85", help="where to start (default: the Objects folder, i=85)")
    browse.add_argument("--depth", type=int, default=8, help="how many levels to descend (default 8)")
    browse.add_argument("--max-nodes", type=int, default=5000, help="stop after this many nodes (default 5000)")
    browse.add_argument("--json", action="store_true", help="machine-readable output (one JSON document)")
    browse.add_argument("--username", default=None, help="user name for a username/password identity")
    browse.add_argument(
        "--password-file", type=Path, default=None, help="file holding the password (with --username)"
    )
    browse.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per request (default 10)")
    browse.set_defaults(handler=_cmd_browse)

    demo = commands.add_parser("demo", help="run the whole pipeline against built-in simulators")
    demo.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: until Ctrl-C)")
    demo.add_argument("--data-dir", type=Path, default=None, help="where the demo keeps its buffer and files")
    demo.add_argument(
        "--simulators-only",
        action="store_true",
        help="run only the built-in simulators (OPC UA press, Modbus filler, scanner, MES), for your own config",
    )
    demo.set_defaults(handler=_cmd_demo)

    buffer = commands.add_parser("buffer", help="inspect and operate the buffer (offline or through the running agent)")
    buffer_commands = buffer.add_subparsers(dest="buffer_command", metavar="ACTION", required=True)
    stats = buffer_commands.add_parser("stats", help="depth, oldest age and size per sink and lane")
    config_option(stats)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=_cmd_buffer_stats)
    dead = buffer_commands.add_parser("dead-letters", help="list dead letters")
    config_option(dead)
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    dead.add_argument("--sink", default=None, help="only this sink's dead letters ('-': before any sink)")
    dead.set_defaults(handler=_cmd_buffer_dead_letters)
    replay = buffer_commands.add_parser(
        "replay", help="send dead letters again (through the config's mappings) under their ids"
    )
    config_option(replay)
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter")
    which.add_argument("--id", dest="ids", action="extend", nargs="+", metavar="ID", help="these event ids")
    which.add_argument("--sink", default=None, help="the dead letters of this sink ('-': before any sink)")
    which.add_argument("--reason", default=None, help="the dead letters whose reason contains TEXT", metavar="TEXT")
    replay.set_defaults(handler=_cmd_buffer_replay)
    purge = buffer_commands.add_parser("purge", help="drop a sink's backlog, or the dead letters")
    config_option(purge)
    purge.add_argument("--json", action="store_true", help="machine-readable output")
    purge.add_argument("--sink", default=None, help="drop this sink's backlog (with --dead-letters: its dead letters)")
    purge.add_argument("--dead-letters", action="store_true", help="delete the dead letters")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(handler=_cmd_buffer_purge)

    trace = commands.add_parser(
        "trace", help="the journey of one event, or of every event of a work order or lot (the delivery journal)"
    )
    trace.add_argument("key", metavar="ID|WORK_ORDER|LOT", help="an event id, a work order or a lot")
    config_option(trace)
    trace.add_argument("--json", action="store_true", help="machine-readable output")
    trace.set_defaults(handler=_cmd_trace)

    reconcile = commands.add_parser(
        "reconcile", help="compare what the plant delivered with the event ids the ERP holds (CSV or JSON lines)"
    )
    reconcile.add_argument(
        "--against",
        type=Path,
        required=True,
        metavar="FILE",
        help="the ERP's ids: CSV (the column named id, else the first column) or JSON lines (objects with "
        '"id", or strings)',
    )
    reconcile.add_argument(
        "--from",
        dest="start",
        default=None,
        metavar="TIME",
        help="delivered at or after TIME (ISO 8601 or Unix seconds; default: all the journal holds)",
    )
    reconcile.add_argument(
        "--to", dest="end", default=None, metavar="TIME", help="delivered before TIME (default: now)"
    )
    reconcile.add_argument("--type", default=None, metavar="NAME", help="only this type (production.completed)")
    reconcile.add_argument(
        "--resend", action="store_true", help="send what the ERP lacks again at once, under the same ids"
    )
    config_option(reconcile)
    reconcile.add_argument("--json", action="store_true", help="machine-readable output")
    reconcile.set_defaults(handler=_cmd_reconcile)

    schema = commands.add_parser("schema", help="print a JSON Schema")
    schema.add_argument("what", choices=["events", "config"], help="canonical events, or the config file")
    schema.set_defaults(handler=_cmd_schema)
    return parser


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"plantgate: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace) -> Any:
    """The validated settings, or None after printing the one-line error."""
    from agent.settings import ConfigError, default_config_path, load_settings

    path = args.config or default_config_path()
    try:
        return load_settings(path)
    except ConfigError as exc:
        _fail(str(exc))
        return None


def _buildable(args: argparse.Namespace, settings: Any) -> bool:
    """Whether every source and sink can be built (its secret and certificate files read).

    Validation cannot see files; building can. Prints the one-line error, with the
    file, the line and the key of the failing source or sink, when one cannot.
    """
    from agent.registry import build_context, build_sinks, build_sources
    from agent.settings import ConfigError, default_config_path, line_of

    path = args.config or default_config_path()
    try:
        context = build_context(settings)
        build_sources(settings, context)
        build_sinks(settings, context)
    except ConfigError as exc:
        try:
            line = line_of(path.read_text(encoding="utf-8"), exc.key)
        except OSError:
            line = None
        _fail(str(ConfigError(path, exc.key, exc.message, line)))
        return False
    return True


def _run_loop(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed (faster sockets and timers), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro_factory())
    return uvloop.run(coro_factory())


# --- run -----------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None or not _buildable(args, settings):
        return EXIT_BAD_INPUT
    from agent.logs import setup_logging

    json_output = {"auto": None, "json": True, "text": False}[args.log_format]
    setup_logging(settings.agent.log_level, json_output)
    from agent.settings import default_config_path

    config_path = args.config or default_config_path()
    return _run_loop(lambda: _run_agent(settings, config_path))


async def _run_agent(settings: Any, config_path: Path | None = None) -> int:
    import prometheus_client

    from agent.http_server import HttpListenError
    from agent.pipeline import Agent
    from buffer import BufferError

    prometheus_client.disable_created_metrics()
    stop = asyncio.Event()
    _on_signals(stop)
    try:
        agent = Agent(settings, config_path=config_path)
        reloads: set[asyncio.Task[None]] = set()
        if config_path is not None:
            _on_reload(agent, settings, config_path, reloads)
        await agent.run(stop)
    except HttpListenError as exc:
        return _fail(str(exc))
    except BufferError as exc:
        return _fail(f"buffer: {exc}", EXIT_FAILURE)
    except ValueError as exc:  # a source or sink refused its config (e.g. an unreadable secret file)
        return _fail(str(exc))
    return EXIT_OK


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)


def _on_reload(agent: Any, settings: Any, config_path: Path, tasks: set[asyncio.Task[None]]) -> None:
    """SIGHUP: reload ``[mappings]`` from the config file (only them; the rest needs a restart)."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        task = loop.create_task(_reload_mappings(agent, settings, config_path))
        tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(tasks.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, reload)


async def _reload_mappings(agent: Any, settings: Any, config_path: Path) -> None:
    from agent.settings import ConfigError, load_mappings

    log = logging.getLogger("agent.cli")
    try:
        mappings = load_mappings(config_path, settings)
    except ConfigError as exc:
        log.error(
            "Mappings not reloaded: the config file is invalid; the running mappings stay",
            extra={"error": str(exc), "config": str(config_path), "line": exc.line, "ratelimit": False},
        )
        return
    try:
        await agent.reload_mappings(mappings, origin=str(config_path))
    except ValueError as exc:
        log.error("Mappings not reloaded; the running mappings stay", extra={"error": str(exc), "ratelimit": False})


# --- check ---------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None or not _buildable(args, settings):
        return EXIT_BAD_INPUT
    from agent.settings import default_config_path

    path = args.config or default_config_path()
    print(f"{path}: valid")
    print(_summary(settings))
    for warning in _warnings(settings):
        print(f"plantgate: warning: {warning}", file=sys.stderr)
    if not args.connect:
        return EXIT_OK
    from agent.logs import setup_logging
    from agent.preflight import run_preflight, summary

    setup_logging("ERROR", False)  # library chatter (reconnects, retries) would drown the findings
    print()
    findings = asyncio.run(run_preflight(settings, per_component=args.timeout))
    for finding in findings:
        print(finding.line())
    print(summary(findings))
    return EXIT_FAILURE if any(finding.level == "error" for finding in findings) else EXIT_OK


def _summary(settings: Any) -> str:
    from agent.config_types import format_duration
    from agent.registry import SINKS, SOURCES, build_context

    agent = settings.agent
    lines = [
        f"agent    site={agent.site} id={agent.id} data_dir={agent.data_dir}",
        f"buffer   {settings.data_path(settings.buffer.path)} max_size_mb={settings.buffer.max_size_mb:g} "
        f"telemetry_max_rows={settings.buffer.telemetry_max_rows} synchronous={settings.buffer.synchronous}",
        f"http     {settings.http.listen}"
        + (f" ingest_token_file={settings.http.ingest_token_file}" if settings.http.ingest_token_file else "")
        + (f" admin_token_file={settings.http.admin_token_file}" if settings.http.admin_token_file else ""),
    ]
    context = build_context(settings)
    for key in SOURCES:
        for source in getattr(settings.sources, key):
            first, *rest = source.describe(context)
            lines.append(f"source   {key} {first}")
            lines.extend(rest)
    for rule in settings.transactions:
        fields = ", ".join(f"{k}={_field_shown(v)}" for k, v in rule.fields.items())
        if rule.when_event:
            trigger = f"event {rule.when_event}" + (f" from {rule.when_source}" if rule.when_source else "")
        elif rule.every is not None:
            trigger = f"every {format_duration(rule.every)}"
        else:
            trigger = (f"{rule.on} " if rule.on else "") + rule.when
        extras = "".join(
            f" {label}={value}"
            for label, value in (
                ("uom", rule.uom),
                ("uom_to", rule.uom_to),
                ("partitionkey", _field_shown(rule.partitionkey) if rule.partitionkey is not None else None),
                ("ack", rule.ack),
            )
            if value
        )
        condition, test = "", rule.condition
        if test is not None:
            wanted = f"in {test.in_}" if test.in_ is not None else f"== {test.equals!r}"
            condition = f" if {test.tag} {wanted}"
        lines.append(
            f"rule     {rule.name}: on {trigger}{condition} -> io.plantgate.{rule.type} {{{fields}}}{extras}"
        )
    mappings = settings.mappings
    if mappings.items or mappings.uom or mappings.plants or mappings.lines or mappings.work_centers:
        lines.append(
            f"mappings items={len(mappings.items)} uom={len(mappings.uom)} plants={len(mappings.plants)} "
            f"lines={len(mappings.lines)} work_centers={len(mappings.work_centers)} "
            f"unknown_items={mappings.unknown_items} unknown_ids={mappings.unknown_ids}"
        )
    for key in SINKS:
        for sink in getattr(settings.sinks, key):
            first, *rest = sink.describe(context)
            lines.append(f"sink     {key} {first}")
            lines.extend(rest)
    if not settings.sink_configs():
        lines.append("sink     (none: events are counted, not stored)")
    return "\n".join(lines)


def _field_shown(value: Any) -> str:
    """A rule field as written: a tag name, ``literal:<value>``, ``template:<text>`` or ``event:<key>``."""
    if isinstance(value, str):
        return value
    for form in ("literal", "template", "event"):
        if hasattr(value, form):
            return f"{form}:{getattr(value, form)!r}"
    return str(value)


def _warnings(settings: Any) -> list[str]:
    from agent.registry import build_context

    warnings = []
    context = build_context(settings)
    for component in [*settings.source_configs(), *settings.sink_configs()]:
        warnings.extend(component.warnings())
        warnings.extend(component.warnings_at(context))
    warnings.extend(_risky_settings(settings))
    sinks = settings.sink_configs()
    if not sinks:
        warnings.append("no sinks configured: nothing is forwarded")
    else:
        taken = {lane for sink in sinks for lane in sink.lanes}
        for lane in ("transaction", "operational", "telemetry"):
            if lane not in taken:
                warnings.append(f"no sink takes the {lane} lane: its events are counted (/status unrouted), not stored")
    return warnings


# Keys ending in _file that hold public material, not secrets.
_PUBLIC_FILES = frozenset({"ca_file", "cert_file", "certificate", "server_certificate"})
# Switches that turn TLS certificate verification off, under the names protocols give them.
_VERIFY_ON = frozenset({"verify", "tls_verify", "verify_tls", "verify_certificate"})
_VERIFY_OFF = frozenset({"insecure", "tls_insecure", "insecure_skip_verify"})


def _risky_settings(settings: Any) -> list[str]:
    """Settings that work but expose the agent: secret files others can read, TLS verification off.

    (Credentials over plain mqtt:// or http:// are each protocol's own ``warnings()``; an ingest
    endpoint beyond loopback without a token is a config error.)
    """
    from agent.config_types import ConfigModel, secret_file_warning

    found: list[str] = []

    def walk(model: ConfigModel, where: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{where}.{name}"
            if isinstance(value, ConfigModel):
                walk(value, key)
            elif isinstance(value, Path) and name not in _PUBLIC_FILES and name.endswith(("_file", "_key")):
                warning = secret_file_warning(settings.data_path(value), key=key)
                if warning is not None:
                    found.append(warning)
            elif isinstance(value, bool) and (
                (name in _VERIFY_ON and not value) or (name in _VERIFY_OFF and value)
            ):
                found.append(
                    f"{key}: TLS certificate verification is off: anyone on the path can pose as the peer "
                    "and read or alter what is sent; trust the peer's CA with ca_file instead"
                )

    for key, section in (("sources", settings.sources), ("sinks", settings.sinks)):
        for protocol in type(section).model_fields:
            for component in getattr(section, protocol):
                walk(component, f"{key}.{protocol}.{component.name}")
    for key, token_file in (
        ("http.ingest_token_file", settings.http.ingest_token_file),
        ("http.admin_token_file", settings.http.admin_token_file),
    ):
        if token_file is not None:
            warning = secret_file_warning(settings.data_path(token_file), key=key)
            if warning is not None:
                found.append(warning)
    return found


# --- browse --------------------------------------------------------------------------------------


def _cmd_browse(args: argparse.Namespace) -> int:
    from agent.browse import BrowseError, browse

    if args.source is not None:
        return _browse_source(args)
    if args.endpoint is None:
        return _fail("browse: name the server (opc.tcp://host:port) or a configured source (--source NAME)")
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            return _fail(f"--password-file: cannot read {args.password_file}: {exc.strerror}")
    if (args.username is None) != (password is None):
        return _fail("browse: --username and --password-file go together")
    from agent.logs import setup_logging

    setup_logging("ERROR", False)
    try:
        tree = asyncio.run(
            browse(
                args.endpoint,
                start=args.node,
                depth=args.depth,
                max_nodes=args.max_nodes,
                username=args.username,
                password=password,
                request_timeout=args.timeout,
            )
        )
    except BrowseError as exc:
        return _fail(f"browse: {exc}", EXIT_FAILURE)
    except ValueError as exc:
        return _fail(f"browse: {exc}")
    return _print_browse(args, tree)


def _print_browse(args: argparse.Namespace, tree: Any) -> int:
    from agent.browse import print_tree

    if args.json:
        print(msgspec.json.encode(tree).decode())
    else:
        print_tree(tree)
    return EXIT_OK


def _browse_source(args: argparse.Namespace) -> int:
    """``browse --source NAME``: the configured server, with the source's security and identity."""
    from agent.browse import BrowseError, browse

    settings = _load(args)
    if settings is None or not _buildable(args, settings):
        return EXIT_BAD_INPUT
    config = next((c for c in settings.sources.opcua if c.name == args.source), None)
    if config is None:
        names = ", ".join(c.name for c in settings.sources.opcua) or "none"
        return _fail(f"browse: no [[sources.opcua]] named {args.source!r} (configured: {names})")
    from agent.logs import setup_logging
    from agent.registry import build_context
    from protocols.opcua.preflight import configured_client

    setup_logging("ERROR", False)

    async def run() -> Any:
        client = await configured_client(config, build_context(settings))
        return await browse(
            config.endpoint, start=args.node, depth=args.depth, max_nodes=args.max_nodes,
            request_timeout=args.timeout, client=client,
        )

    try:
        tree = asyncio.run(run())
    except BrowseError as exc:
        return _fail(f"browse: {exc}", EXIT_FAILURE)
    except ValueError as exc:
        return _fail(f"browse: {exc}")
    return _print_browse(args, tree)


# --- demo ----------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo
    from agent.logs import setup_logging

    setup_logging("WARNING")
    return _run_loop(
        lambda: run_demo(seconds=args.seconds, data_dir=args.data_dir, simulators_only=args.simulators_only)
    )


# --- buffer --------------------------------------------------------------------------------------
#
# A stopped agent's file is opened directly (read-only for stats and dead-letters; read-write, under
# the buffer's lock, for replay and purge). While an agent holds the lock, the request goes to it over
# HTTP at [http].listen (bearer: the ingest token), so only one process ever writes the file.


class _BufferTarget:
    """Where ``plantgate buffer`` acts: the config's buffer file, offline or through the running agent."""

    def __init__(self, settings: Any):
        from buffer import lock_holder

        self.settings = settings
        self.path: Path = settings.data_path(settings.buffer.path)
        self.sinks: dict[str, Any] = {s.name: list(s.lanes) for s in settings.sink_configs()}
        self.holder = lock_holder(self.path)

    @property
    def live(self) -> bool:
        return self.holder is not None

    def remap(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        from agent.rules import map_event

        mappings = self.settings.mappings
        return lambda event: map_event(mappings, event)

    def url(self, endpoint: str) -> str:
        listen: str = self.settings.http.listen
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}{endpoint}"

    def request(self, method: str, endpoint: str, body: Any = None) -> Any:
        """Ask the running agent; ``_AgentUnreachable`` (the message says why) when it does not answer."""
        import urllib.error
        import urllib.request

        headers = {"Accept": "application/json"}
        # The admin token, when there is one, opens reads and changes alike; the ingest token then
        # no longer replays or purges.
        http = self.settings.http
        which, token_file = (
            ("admin", http.admin_token_file) if http.admin_token_file else ("ingest", http.ingest_token_file)
        )
        if token_file is not None:
            token_file = self.settings.data_path(token_file)  # as the agent reads it
            try:
                token = token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise _AgentUnreachable(f"{token_file}: cannot read the {which} token: {exc.strerror}") from exc
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url = self.url(endpoint)
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read() or b"{}").get("error") or exc.reason
            except (ValueError, AttributeError):
                detail = exc.reason
            raise _AgentUnreachable(f"{method} {url}: {exc.code} {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _AgentUnreachable(f"{method} {url}: {reason}") from exc

    def running(self, why: str) -> str:
        return f"agent is running: {self.path} is in use by process {self.holder}; {why}"


class _AgentUnreachable(Exception):
    """The running agent's HTTP API did not give an answer."""


def _buffer_target(args: argparse.Namespace) -> _BufferTarget | int:
    settings = _load(args)
    if settings is None:
        return EXIT_BAD_INPUT
    target = _BufferTarget(settings)
    if not target.path.exists():
        return _fail(f"{target.path}: no buffer file (has the agent run with this config?)")
    return target


def _cmd_buffer_stats(args: argparse.Namespace) -> int:
    target = _buffer_target(args)
    if isinstance(target, int):
        return target
    from buffer import BufferStats, inspect_stats

    stats: BufferStats | None = None
    if target.live:
        with contextlib.suppress(_AgentUnreachable):  # then the file itself: WAL lets a reader in
            stats = msgspec.convert(target.request("GET", "/v1/buffer/stats"), BufferStats)
    if stats is None:
        stats = asyncio.run(inspect_stats(target.path, target.sinks))
    if args.json:
        print(msgspec.json.encode(stats).decode())
        return EXIT_OK
    print(f"buffer {target.path}: {stats.size_bytes / 1e6:.1f} MB, {stats.dead_letters} dead letter(s)")
    rows: list[list[str]] = []
    for name, sink in stats.sinks.items():
        for lane, entry in sink.lanes.items():
            age = "-" if entry.oldest_age_seconds is None else _age(entry.oldest_age_seconds)
            rows.append([name, lane, str(entry.depth), age])
        rows.append([name, "(all)", str(sink.depth), ""])
    for name, depth in stats.orphaned.items():
        rows.append([name, "orphaned", str(depth), f"purge with `plantgate buffer purge --sink {name}`"])
    if stats.held is not None:
        # Held by the sequencing guard: in no sink's backlog until their work order is released.
        for type_, count in stats.held.types.items():
            rows.append(["(held)", type_, str(count), ""])
        oldest = stats.held.oldest_age_seconds
        rows.append(["(held)", "(all)", str(stats.held.count), "-" if oldest is None else _age(oldest)])
    if rows:
        print()
        _print_table(["SINK", "LANE", "DEPTH", "OLDEST"], rows)
    return EXIT_OK


def _age(seconds: float) -> str:
    """A human age: 42s, 17m, 3.5h, 2.1d."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest cell; numbers right-aligned; the last column left as it is."""
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    numeric = [all(row[i].isdigit() or not row[i] for row in rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i == len(cells) - 1:
                out.append(cell)
            else:
                out.append(cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    print(line(headers))
    for row in rows:
        print(line(row))


def _dead_letter_list(target: _BufferTarget, sink: str | None) -> list[Any]:
    from buffer import DeadLetterEntry, inspect_dead_letters

    if target.live:
        import urllib.parse

        query = "" if sink is None else "?" + urllib.parse.urlencode({"sink": sink})
        with contextlib.suppress(_AgentUnreachable):
            return msgspec.convert(target.request("GET", "/v1/buffer/dead-letters" + query), list[DeadLetterEntry])
    return [
        DeadLetterEntry(
            id=d.id, type=d.type, subject=d.subject, sink=d.sink, reason=d.reason, time=d.time, context=d.context
        )
        for d in asyncio.run(inspect_dead_letters(target.path, sink))
    ]


def _cmd_buffer_dead_letters(args: argparse.Namespace) -> int:
    target = _buffer_target(args)
    if isinstance(target, int):
        return target
    letters = _dead_letter_list(target, args.sink)
    if args.json:
        print(msgspec.json.encode(letters).decode())
        return EXIT_OK
    if letters:
        now = time.time()
        # SOURCE and RULE only when some letter knows them (made by this version's rules or sources).
        context = any(d.context for d in letters)
        _print_table(
            ["ID", "TYPE", "SUBJECT", "SINK", *(["SOURCE", "RULE"] if context else []), "AGE", "REASON"],
            [
                [
                    d.id,
                    d.type.removeprefix("io.plantgate."),
                    d.subject or "-",
                    d.sink,
                    *([_context_text(d.context, "source"), _context_text(d.context, "rule")] if context else []),
                    _age(now - d.time),
                    d.reason,
                ]
                for d in letters
            ],
        )
    print(f"{len(letters)} dead letter(s)")
    return EXIT_OK


def _context_text(context: dict[str, Any] | None, key: str) -> str:
    """One name from a dead letter's context for the table; ``-`` when it has none."""
    value = (context or {}).get(key)
    return str(value) if value else "-"


def _offline(target: _BufferTarget, action: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``action(admin)`` on the stopped agent's file; None when an agent took the lock meanwhile."""
    from buffer import BufferLocked, open_admin

    async def run() -> Any:
        # The sequencing guard as the agent runs it: a replayed sequencing dead letter goes back through it.
        async with open_admin(
            target.path, sinks=target.sinks, remap=target.remap(), sequencing=target.settings.sequencing
        ) as admin:
            return await action(admin)

    try:
        return _run_loop(run)
    except BufferLocked:
        return None


_R = TypeVar("_R")


def _change(
    target: _BufferTarget,
    action: Callable[[Any], Coroutine[Any, Any, _R]],
    verb: str,
    request: Any,
    result_type: type[_R],
) -> _R | int:
    """Replay or purge: on the stopped agent's file, else through the running agent's API (exit code on failure)."""
    result: _R | None = None
    if not target.live:
        result = _offline(target, action)
    if result is not None:
        return result
    from buffer import lock_holder

    target.holder = target.holder or lock_holder(target.path) or "?"
    try:
        answer = target.request("POST", f"/v1/buffer/{verb}", msgspec.to_builtins(request))
        return msgspec.convert(answer, result_type)
    except (_AgentUnreachable, msgspec.ValidationError) as exc:
        return _fail(target.running(f"its HTTP API did not {verb}: {exc}"), EXIT_FAILURE)


def _cmd_buffer_replay(args: argparse.Namespace) -> int:
    target = _buffer_target(args)
    if isinstance(target, int):
        return target
    from buffer import ReplayRequest, ReplayResult

    request = ReplayRequest(all=args.all, ids=args.ids or [], sink=args.sink, reason=args.reason)
    result = _change(target, lambda admin: admin.replay(request), "replay", request, ReplayResult)
    if isinstance(result, int):
        return result
    if args.json:
        print(msgspec.json.encode(result).decode())
    else:
        print(f"replayed {result.replayed}, failed {result.failed}")
    return EXIT_OK if result.failed == 0 else EXIT_FAILURE


def _purge_preview(target: _BufferTarget, request: Any) -> tuple[str, int]:
    """What the purge would remove, in words, and how many items."""
    if request.dead_letters:
        count = len(_dead_letter_list(target, request.sink))
        whose = f" of sink {request.sink}" if request.sink is not None else ""
        return f"{count} dead letter(s){whose} from {target.path}", count
    from buffer import BufferStats, inspect_stats

    stats: BufferStats | None = None
    if target.live:
        with contextlib.suppress(_AgentUnreachable):
            stats = msgspec.convert(target.request("GET", "/v1/buffer/stats"), BufferStats)
    if stats is None:
        stats = asyncio.run(inspect_stats(target.path, target.sinks))
    sink = stats.sinks.get(request.sink)
    pending = sink.depth if sink is not None else 0
    orphaned = stats.orphaned.get(request.sink, 0)
    parts = []
    if pending:
        parts.append(f"{pending} undelivered event(s)")
    if orphaned:
        parts.append(f"{orphaned} orphaned event(s)")
    what = " and ".join(parts) or "no events"
    return f"the backlog of sink {request.sink} ({what}) from {target.path}", pending + orphaned


def _cmd_buffer_purge(args: argparse.Namespace) -> int:
    if args.sink is None and not args.dead_letters:
        return _fail("buffer purge: say what to remove: --sink NAME or --dead-letters")
    target = _buffer_target(args)
    if isinstance(target, int):
        return target
    from buffer import PurgeRequest, PurgeResult

    request = PurgeRequest(sink=args.sink, dead_letters=args.dead_letters)
    what, _ = _purge_preview(target, request)
    if not args.yes:
        print(f"This removes {what}.", file=sys.stderr)
        print("Remove it? [y/N] ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline()
        if answer.strip().lower() not in ("y", "yes"):
            return _fail("purge not confirmed; nothing removed (use --yes to skip the question)", EXIT_FAILURE)
    result = _change(target, lambda admin: admin.purge(request), "purge", request, PurgeResult)
    if isinstance(result, int):
        return result
    if args.json:
        print(msgspec.json.encode(result).decode())
    elif request.dead_letters:
        print(f"removed {result.dead_letters} dead letter(s)")
    else:
        lanes = ", ".join(f"{lane} {n}" for lane, n in result.lanes.items()) or "nothing pending"
        print(f"removed the backlog of sink {result.sink}: {result.events} event(s) ({lanes})")
    return EXIT_OK


# --- trace and reconcile -------------------------------------------------------------------------
#
# Like ``plantgate buffer``: a running agent is asked over its HTTP API; a stopped one's file is read
# directly (read-only for trace and the comparison; under the buffer's lock for ``--resend``). When the
# running agent does not answer, the file is read all the same (WAL lets a reader in).


def _journal_target(args: argparse.Namespace) -> _BufferTarget | int:
    target = _buffer_target(args)
    if isinstance(target, int):
        return target
    if not target.settings.journal.enabled:
        return _fail("the delivery journal is off ([journal] enabled = false): nothing to trace or reconcile")
    return target


async def _read_only_buffer(path: Path) -> Any:
    from buffer import Buffer

    buffer = Buffer(path)
    await buffer.open(readonly=True)
    return buffer


def _cmd_trace(args: argparse.Namespace) -> int:
    import urllib.parse

    target = _journal_target(args)
    if isinstance(target, int):
        return target
    entries: list[dict[str, Any]] | None = None
    if target.live:
        with contextlib.suppress(_AgentUnreachable):  # a 404 included: the file then says the same
            answer = target.request("GET", "/v1/trace/" + urllib.parse.quote(args.key, safe=""))
            entries = answer.get("entries") if isinstance(answer, dict) else None
    if entries is None:

        async def read() -> list[dict[str, Any]]:
            buffer = await _read_only_buffer(target.path)
            try:
                found: list[dict[str, Any]] = msgspec.to_builtins(await buffer.trace(args.key))
                return found
            finally:
                await buffer.close()

        entries = asyncio.run(read())
    if args.json:
        print(json.dumps({"key": args.key, "entries": entries}))
        return EXIT_OK if entries else EXIT_FAILURE
    if not entries:
        return _fail(f"trace: nothing known of {args.key!r} in {target.path} (never seen, or trimmed)", EXIT_FAILURE)
    for n, entry in enumerate(entries):
        if n:
            print()
        _print_entry(entry)
    return EXIT_OK


def _when(at: float | None) -> str:
    """Unix seconds as a UTC time to the millisecond, for timelines."""
    if at is None:
        return "-"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _print_entry(entry: dict[str, Any]) -> None:
    """One event's journey: what it is, what triggered it, each step, and what the ERP did."""
    keys = [f"{name}={entry[name]}" for name in ("subject", "work_order", "lot") if entry.get(name) is not None]
    sequence = "-" if entry.get("seq") is None else str(entry["seq"])
    head = [entry["id"], str(entry["type"]).removeprefix("io.plantgate."), *keys]
    print("  ".join(head) + f"  lane={entry.get('lane')} sequence={sequence}")
    where = f"  source {entry.get('source')}"
    if entry.get("source_time"):
        where += f", at the source {entry['source_time']}"
    print(where + f", committed {_when(entry.get('committed'))}")
    trigger = entry.get("trigger")
    if trigger:
        print(f"  trigger: {_trigger_text(trigger)}")
    steps = entry.get("steps") or []
    if steps:
        _print_table(
            ["  TIME", "STEP", "SINK", "STATUS", "REFERENCE", "DETAIL"],
            [
                [
                    "  " + _when(step.get("at")),
                    str(step.get("step")),
                    step.get("sink") or "-",
                    step.get("status") or "-",
                    step.get("reference") or "-",
                    step.get("detail") or "",
                ]
                for step in steps
            ],
        )
    outcome = entry.get("outcome")
    if outcome == "posted":
        print(f"  ERP: posted, reference {entry.get('reference') or '-'} ({_when(entry.get('outcome_at'))})")
    elif outcome == "rejected":
        print(
            f"  ERP: rejected: {entry.get('reason') or '-'} ({_when(entry.get('outcome_at'))}); "
            "a dead letter of sink erp until replayed"
        )
    elif entry.get("delivered") is not None:
        print(f"  ERP: no outcome reported yet (delivered {_when(entry.get('delivered'))})")
    else:
        print("  not delivered yet")


def _trigger_text(trigger: dict[str, Any]) -> str:
    """A rule's trigger (rule, source, raw values, trigger event) or a source's, on one line."""
    parts = []
    if trigger.get("rule"):
        parts.append(f"rule {trigger['rule']}")
    if trigger.get("source"):
        parts.append(f"from {trigger['source']}")
    if trigger.get("originsource"):
        parts.append(f"originally {trigger['originsource']}")
    values = trigger.get("values")
    if isinstance(values, dict) and values:
        shown = []
        for tag, reading in values.items():
            if isinstance(reading, dict):
                quality = reading.get("quality")
                extra = f" ({quality})" if quality and quality != "good" else ""
                shown.append(f"{tag}={reading.get('value')!r}{extra} at {reading.get('time')}")
            else:
                shown.append(f"{tag}=(no reading)")
        parts.append("values " + ", ".join(shown))
    if trigger.get("trigger"):
        parts.append(f"fired by event {trigger['trigger']}")
    if trigger.get("window_end"):
        parts.append(f"window ending {trigger['window_end']}")
    known = ("rule", "source", "originsource", "values", "trigger", "window_end")
    rest = {k: v for k, v in trigger.items() if k not in known}
    if rest:
        parts.append(json.dumps(rest, default=str))
    return "; ".join(parts)


class _HttpJournal:
    """What reconciliation reads (``agent.lineage.JournalReader``), through the running agent's API."""

    def __init__(self, target: _BufferTarget):
        self.target = target

    async def window(self, start: float, end: float, type_: str | None) -> list[dict[str, Any]]:
        import urllib.parse

        query = {"from": repr(start), "to": repr(end), "brief": "1", **({"type": type_} if type_ else {})}
        answer = self.target.request("GET", "/v1/reconciliation?" + urllib.parse.urlencode(query))
        events: list[dict[str, Any]] = answer["events"]
        return events

    async def lookup(self, ids: Any) -> dict[str, dict[str, Any]]:
        answer = self.target.request("POST", "/v1/reconciliation/lookup", {"ids": list(ids)})
        known: dict[str, dict[str, Any]] = answer["known"]
        return known


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from agent.lineage import BufferJournal, Comparison, canonical_type, compare, parse_time, read_ids

    try:
        start = parse_time(args.start) if args.start is not None else 0.0
        end = parse_time(args.end) if args.end is not None else time.time()
    except ValueError as exc:
        return _fail(f"reconcile: --from/--to: {exc}")
    try:
        erp_ids = read_ids(args.against)
    except ValueError as exc:
        return _fail(str(exc))
    target = _journal_target(args)
    if isinstance(target, int):
        return target
    type_ = canonical_type(args.type)
    result: Comparison | None = None
    if target.live:
        with contextlib.suppress(_AgentUnreachable, KeyError, TypeError):
            result = asyncio.run(compare(_HttpJournal(target), erp_ids, start, end, type_))
    if result is None:

        async def offline() -> Comparison:
            buffer = await _read_only_buffer(target.path)
            try:
                return await compare(BufferJournal(buffer), erp_ids, start, end, type_)
            finally:
                await buffer.close()

        result = asyncio.run(offline())
    resent: list[str] | None = None
    failed: list[dict[str, str]] = []
    if args.resend and result.missing_in_erp:
        outcome = _resend(target, [event["id"] for event in result.missing_in_erp])
        if isinstance(outcome, int):
            return outcome
        resent, failed = outcome
    if args.json:
        answer = result.as_json()
        if resent is not None:
            answer["resent"] = resent
            answer["resend_failed"] = failed
        print(json.dumps(answer))
    else:
        _print_comparison(result, args.against, resent, failed)
    return EXIT_OK if not (result.missing_in_erp or result.unknown_to_plant) else EXIT_FAILURE


def _resend(target: _BufferTarget, ids: list[str]) -> tuple[list[str], list[dict[str, str]]] | int:
    """Resend ``ids`` from the journal under their ids: on the stopped agent's file, else through its API."""
    from agent.lineage import MAX_LOOKUP_IDS, resend

    if not target.live:
        from buffer import Buffer, BufferLocked

        async def offline() -> tuple[list[str], list[dict[str, str]]]:
            buffer = Buffer(target.path, sinks=target.sinks)
            await buffer.open()
            try:
                for name, lanes in target.sinks.items():
                    buffer.cursor(name, lanes)  # as at the agent's start: the resent events reach every sink
                return await resend(buffer, ids)
            finally:
                await buffer.close()

        with contextlib.suppress(BufferLocked):
            done = asyncio.run(offline())
            return done
    from buffer import lock_holder

    target.holder = target.holder or lock_holder(target.path) or "?"
    resent: list[str] = []
    failed: list[dict[str, str]] = []
    try:
        for first in range(0, len(ids), MAX_LOOKUP_IDS):
            chunk = ids[first : first + MAX_LOOKUP_IDS]
            answer = target.request("POST", "/v1/reconciliation/resend", {"ids": chunk})
            resent.extend(answer["resent"])
            failed.extend(answer["failed"])
    except (_AgentUnreachable, KeyError, TypeError) as exc:
        return _fail(target.running(f"its HTTP API did not resend: {exc}"), EXIT_FAILURE)
    return resent, failed


def _print_comparison(result: Any, against: Path, resent: list[str] | None, failed: list[dict[str, str]]) -> None:
    from agent.lineage import iso

    since = "the start of the journal" if result.start <= 0 else iso(result.start)
    kind = "" if result.type is None else f" of type {result.type.removeprefix('io.plantgate.')}"
    print(
        f"the plant delivered {result.delivered} event(s){kind} from {since} to {iso(result.end)}; "
        f"{against} holds {result.erp} id(s)"
    )

    def events(title: str, items: list[dict[str, Any]]) -> None:
        print()
        print(f"{title} ({len(items)}):")
        rows = [
            [e["id"], str(e.get("type", "")).removeprefix("io.plantgate."), _when(e.get("delivered")),
             e.get("outcome") or "delivered"]
            for e in items
        ]
        _print_table(["ID", "TYPE", "DELIVERED", "STATE"], rows)

    if result.missing_in_erp:
        events("missing in the ERP: delivered by the plant, not in the file", result.missing_in_erp)
    if result.rejected:
        events("rejected by the ERP (business dead letters: plantgate buffer dead-letters --sink erp)", result.rejected)
    if result.unknown_to_plant:
        print()
        print(f"unknown to the plant: in the file, never delivered by this agent ({len(result.unknown_to_plant)}):")
        for event_id in result.unknown_to_plant:
            print(event_id)
    if not (result.missing_in_erp or result.unknown_to_plant):
        print("the plant and the ERP agree")
    if resent is not None:
        print()
        print(f"resent {len(resent)} event(s) under their ids" + (f"; {len(failed)} could not be:" if failed else ""))
        for item in failed:
            print(f"{item['id']}: {item['reason']}")
    elif result.missing_in_erp:
        print()
        print("send them again under the same ids with --resend")


# --- schema --------------------------------------------------------------------------------------


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.what == "config":
        from agent.settings import Settings

        print(json.dumps(Settings.model_json_schema(), indent=2))
        return EXIT_OK
    from agent.events import events_json_schema

    print(json.dumps(events_json_schema(), indent=2))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    sys.exit(main())
